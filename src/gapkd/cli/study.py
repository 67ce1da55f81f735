"""`gapkd study run|report|status`: the study subcommands."""
from __future__ import annotations

import argparse
import json
import textwrap

EXAMPLES = {
    "run": """
        examples:
          gapkd study run capacity-cifar10 --budget smoke               # seconds, on digits
          gapkd study run capacity-cifar10 --budget cpu data.name=cifar10-jpg data.path=/data/cifar10-jpg-q75.tar.gz
          gapkd study run gap-ladder --budget full --phase teachers --shard 2/8 --dir /shared/studies/ladder
          gapkd study run my-study.yaml --budget short --dry-run        # list this shard's runs and stop
    """,
    "report": """
        examples:
          gapkd study report capacity-cifar10 --budget cpu            # -> studies/capacity-cifar10-cpu/report/report.md
          gapkd study report gap-ladder --budget full --dir /shared/studies/ladder --out ladder-report
    """,
    "status": """
        examples:
          gapkd study status capacity-cifar10 --budget full --dir /shared/studies/c10
    """,
}


class _IntermixedParser(argparse.ArgumentParser):
    """Lets key=value overrides come after options (`study run S --budget cpu data.root=D`): plain
    argparse gives every positional its share at the first one and then refuses later ones."""

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):
        if self._intermixing:  # parse_known_intermixed_args calls back here (Python < 3.13)
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def add_study_parser(sub) -> None:
    """Register `study` and its subcommands on the top-level subparsers object."""
    from .common import plugin_option

    study = sub.add_parser("study", help="Capacity-gap studies: run a grid of runs, report it, see where it stands.",
                           description="Grids over datasets x teacher->student pairs x methods x hyper-parameters x seeds, "
                                       "with an SQLite result store and Markdown/HTML reports (docs/studies.md).")
    commands = study.add_subparsers(dest="study_command", metavar="{run,report,status}", parser_class=_IntermixedParser)
    commands.required = True
    helps = {
        "run": "Run (or resume) a study: teachers once, then students; finished runs are skipped.",
        "report": "Write report.md / report.html with tables (mean ± std, Welch t-test) and plots.",
        "status": "How far a study is: runs done / total, running and failed runs, time left.",
    }
    for name, text in helps.items():
        parser = commands.add_parser(name, help=text, description=text, epilog=textwrap.dedent(EXAMPLES[name]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter, parents=[plugin_option()])
        parser.add_argument("study", help="a built-in study (capacity-ladder-cpu, capacity-cifar10, gap-ladder) or a study YAML file")
        parser.add_argument("overrides", nargs="*", metavar="key=value",
                            help="run-config overrides for every run, e.g. data.root=DIR train.device=cuda train.threads=8")
        parser.add_argument("--budget", help="budget preset of the study: full, short, cpu or smoke for the built-in ones")
        parser.add_argument("--dir", help="study directory (default: studies/<study>-<budget>)")
        if name == "run":
            parser.add_argument("--shard", default="1/1", help="K/N: this worker's share of the grid (default 1/1)")
            parser.add_argument("--phase", choices=["all", "teachers", "students"], default="all",
                                help="teachers only, students only (their teachers must be finished), or all (default)")
            parser.add_argument("--dry-run", action="store_true", help="list this shard's runs (todo or done) and stop")
            parser.add_argument("--quiet", action="store_true", help="no per-epoch lines (each run's train.log has them)")
        elif name == "report":
            parser.add_argument("--out", help="report folder (default: <dir>/report)")
        else:
            parser.add_argument("--json", action="store_true", help="print JSON")


def study_command(args) -> int:
    from ..study.spec import parse_shard
    from ..study.study import Study

    study = Study.load(args.study, args.budget, directory=args.dir, overrides=args.overrides)
    if args.study_command == "run":
        k, n = parse_shard(args.shard)
        if args.dry_run:
            selected = study.plan((k, n), args.phase)
            for run in selected:
                print(f"{run.index:>5}  {run.role:<7}  {'done' if study.finished(run) else 'todo':<4}  {run.name}")
            print(f"{len(selected)} of {len(study.plan())} runs in shard {k}/{n} ({args.phase}); "
                  f"study directory {study.dir}")
            return 0
        result = study.run((k, n), args.phase, echo=not args.quiet)
        print(f"shard {k}/{n} ({args.phase}): {len(result.trained)} trained, {len(result.skipped)} already finished, "
              f"{len(result.failed)} failed; results in {study.dir}")
        return 1 if result.failed else 0
    if args.study_command == "report":
        paths = study.report(args.out)
        print(f"{paths['md']}\n{paths['html']}" + "".join(f"\n{p}" for p in paths["plots"]))
        return 0
    status = study.status()
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(f"{status['study']} [{status['budget']}] in {status['dir']}: {status['done']}/{status['total']} runs done")
    for role, counts in status["counts"].items():
        print(f"  {role}s: " + (", ".join(f"{state} {count}" for state, count in sorted(counts.items())) or "none"))
    if status.get("teacher_cache"):  # data.views > 0: runs sharing a teacher share its cached logits
        print("  teacher cache: " + ", ".join(f"{count} {how}" for how, count in sorted(status["teacher_cache"].items())))
    if status["eta"]:
        print(f"  time left for one worker (mean wall time of finished runs x runs left): {status['eta']}")
    for item in status["unfinished"][:20]:
        extra = f"  ({item['worker']})" if item["state"] == "running" else f"  {item['error']}" if item["error"] else ""
        if item["state"] == "stale":
            extra = f"  (worker {item['worker']} is gone: killed or crashed; `gapkd study run` resumes it)"
        print(f"  {item['state']:<11} {item['run']}{extra}")
    if len(status["unfinished"]) > 20:
        print(f"  ... and {len(status['unfinished']) - 20} more")
    return 0
