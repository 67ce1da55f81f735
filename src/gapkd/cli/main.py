"""The ``gapkd`` command: thin; parses arguments and calls the Python API."""
from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap

from ..core.errors import GapkdError
from .common import add_common as _add_common
from .common import command_overrides as _overrides
from .common import plugin_option

EXAMPLES = {
    "train": """
        examples:
          gapkd train student.name=resnet56 data.name=cifar10-jpg data.path=/data/cifar10-jpg-q75.tar.gz \\
              data.train_subset=2000 train.epochs=1 run.name=teacher-r56
          gapkd train -c configs/cifar100/teachers/resnet56.yaml train.epochs=240
          gapkd train -c configs/cub200/teachers/resnet34.yaml optim.lr=0.01 \\
              student.checkpoint=weights/resnet34-b627a593.pth student.init_head=reset   # ImageNet weights, fresh 200-class head
    """,
    "distill": """
        examples:
          gapkd distill teacher.name=resnet56 teacher.checkpoint=runs/teacher-r56/checkpoints/best.pt \\
              student.name=resnet20 method.name=kd method.temperature=4 data.name=cifar10-jpg train.epochs=1
          gapkd distill -c configs/cifar100/resnet56-resnet20/kd.yaml seed=1
    """,
    "eval": """
        examples:
          gapkd eval runs/teacher-r56/checkpoints/best.pt data.name=cifar10-jpg
          gapkd eval resnet56_cifar100.pth --model resnet56 data.name=cifar100 --json
    """,
    "analyze": """
        examples:
          gapkd analyze runs/teacher-r56/checkpoints/best.pt runs/kd-r20/checkpoints/best.pt data.name=cifar10-jpg
          gapkd analyze resnet56_cifar100.pth runs/s/checkpoints/best.pt --teacher-model resnet56 data.name=cifar100 --split test --json
    """,
    "export": """
        The exported file is written only when its logits on real test images of the run's dataset
        match PyTorch's (onnxruntime runs the ONNX file; the TorchScript file is loaded back). A
        sidecar <file>.json records the input shape, the normalisation, the class names and the
        measured difference. ONNX needs: pip install "gapkd[export]"; safetensors (the weights and
        how to rebuild them; loaded by every command that takes a checkpoint) needs
        pip install "gapkd[safetensors]". TorchScript is traced at the
        run's image size (torch.jit is deprecated upstream in favour of torch.export, but libtorch
        still loads it).

        examples:
          gapkd export runs/kd-r20 --format onnx                      # -> runs/kd-r20/export/best.onnx
          gapkd export runs/simkd-r20 --format torchscript --checkpoint last --out simkd.pt
          gapkd export runs/kd-r20 --format safetensors              # -> runs/kd-r20/export/best.safetensors
    """,
    "aid": """
        The same as `gapkd pipeline aid` (kept as a shorter spelling).
        AID is our reading of the published abstract of Qian, Le & Harandi, "A Good Teacher Adapts
        Their Knowledge for Distillation" (ICCV 2025); the paper's formulas and code are not public.
        Stages (each a run folder inside the pipeline folder; finished ones are skipped, interrupted
        ones resume): 1-reference (CE student, or aid.reference_checkpoint=PATH), 2-adapt (teacher
        fine-tuned with L_AID = CE + beta*L_inner(T||S_ref) + gamma*L_class(T0||T); writes
        adapted_teacher_report.json/.md; prints L_inner and the teacher's validation accuracy before and
        after, and stops if that accuracy fell by more than aid.max_teacher_drop points), 3-distill
        (method.name: kd, dkd, dist, ...).
        aid.* keys: beta (1), gamma (1), temperature (4), ce_weight (1), temperature_scaling (true),
        class_means (running|batch), running_decay (0.99), adapt_epochs (10% of train.epochs),
        adapt_lr (optim.lr/10), adapt_schedule (cosine|constant), ref_epochs (train.epochs),
        max_teacher_drop (1.0), on_teacher_drop (error|warn), reference_checkpoint, reference_model.

        examples:
          gapkd aid teacher.name=resnet56 teacher.checkpoint=runs/teacher-r56/checkpoints/best.pt \\
              student.name=resnet20 data.name=cifar10-jpg train.epochs=240 aid.beta=1 run.name=aid-r56-r20
          gapkd aid -c configs/cifar100/resnet56-resnet20/kd.yaml method.name=dkd aid.reference_checkpoint=runs/r20/checkpoints/best.pt
    """,
    "data check": """
        Streamed datasets (imagenet, cub200, image-folder-stream): every file the loader would use
        is decoded whole, as the loader decodes it, in --workers processes. Decoded datasets are
        loaded as a run loads them. Exit status 0 when clean; 2 with one line naming each problem
        and its fix. Nothing is written but the --json report (and the decoded cache a run of a
        tarball of small images writes too).

        examples:
          gapkd data check data.name=imagenet data.path=/data/imagenet --workers 16 --json imagenet-check.json
          gapkd data check data.name=image-folder-stream data.path=/data/my-tree --limit 2000   # a quick random sample
          gapkd data check data.name=cifar10-jpg data.path=/data/cifar10-jpg-q75.tar.gz
    """,
    "list": """
        examples:
          gapkd list models
          gapkd list methods --verbose
          gapkd list methods --plugin ./my_method.py     # with the methods a module of your own registers
    """,
    "pipeline": """
        examples:
          gapkd pipeline takd -c configs/cifar100/resnet110-resnet32/kd.yaml takd.assistant=resnet56
          gapkd pipeline takd -c configs/cifar100/resnet110-resnet32/kd.yaml 'takd.assistant=[resnet56, resnet44]'
          gapkd pipeline eskd -c configs/cifar100/resnet56-resnet20/kd.yaml eskd.stop_epoch=60 eskd.teacher_epochs=240
          gapkd pipeline dgkd -c configs/cifar100/resnet110-resnet20/dgkd.yaml 'dgkd.assistant=[resnet56, resnet32]'
    """,
    "quickstart": """
        examples:
          gapkd quickstart                     # digits, a few minutes on 2 CPU cores
          gapkd quickstart --dataset fashion-mnist --epochs 3
    """,
}


def _add_checkpoint_commands(add) -> None:
    """eval, analyze and export: the commands that read checkpoints."""
    ev = add("eval", "Evaluate a model checkpoint on the validation and test splits of a dataset.")
    ev.add_argument("checkpoint")
    ev.add_argument("overrides", nargs="*", metavar="key=value", help="data.* keys, e.g. data.name=cifar10-jpg")
    ev.add_argument("--model", help="architecture, when the checkpoint does not record it (foreign checkpoints)")
    ev.add_argument("--data-root")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--json", action="store_true", help="print JSON only")

    an = add("analyze", "Compare a teacher and a student checkpoint on one split: KD-loss decomposition (class-wise vs "
                        "inner-class), DKD's TCKD/NCKD, top-1 agreement, ECE, inner-class spreads.")
    an.add_argument("teacher_checkpoint")
    an.add_argument("student_checkpoint")
    an.add_argument("overrides", nargs="*", metavar="key=value", help="data.* keys, e.g. data.name=cifar10-jpg")
    an.add_argument("--split", choices=["val", "test"], default="val", help="which split (default: the held-out validation split)")
    an.add_argument("--temperature", type=float, default=4.0, help="softmax temperature of the decomposition (default 4)")
    an.add_argument("--teacher-model", help="teacher architecture, when its checkpoint does not record it")
    an.add_argument("--student-model", help="student architecture, when its checkpoint does not record it")
    an.add_argument("--data-root")
    an.add_argument("--device", default="auto")
    an.add_argument("--json", action="store_true", help="print JSON only (with per-class spreads)")

    ex = add("export", "Export a run's deployable model (ONNX, TorchScript or safetensors), checked against PyTorch on real inputs.")
    ex.add_argument("run_dir", help="a run directory (holds config.yaml and checkpoints/)")
    ex.add_argument("--format", default="onnx", help="onnx (default), torchscript or safetensors (weights only, no pickle)")
    ex.add_argument("--out", help="output file (default: RUN_DIR/export/<checkpoint>.onnx or .torchscript.pt)")
    ex.add_argument("--checkpoint", default="best", help="best (best validation epoch, default) or last")
    ex.add_argument("--samples", type=int, default=8, help="test images the check runs on (default 8)")
    ex.add_argument("--tolerance", type=float, default=1e-3, help="largest max-abs logit difference accepted (default 1e-3)")
    ex.add_argument("--data-root", help="where the run's dataset is, when not where the run found it")
    ex.add_argument("--json", action="store_true", help="print JSON only")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gapkd",
        description="Knowledge distillation across the teacher-student capacity gap.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `gapkd COMMAND --help` for each command's options and examples.",
        parents=[plugin_option("global_plugins")],  # its own dest: a subcommand's --plugin list would replace it
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text, epilog=textwrap.dedent(EXAMPLES.get(name, "")),
                              formatter_class=argparse.RawDescriptionHelpFormatter, parents=[plugin_option()])

    _add_common(add("train", "Train a model with labels only (a teacher or a from-scratch baseline)."))
    _add_common(add("distill", "Distil a student from a trained teacher with any method (default kd)."))

    pl = add("pipeline", "Multi-stage recipes: TAKD (teacher -> assistant -> student), DGKD (every larger model guides each smaller one), "
                      "ESKD (early-stopped teacher), AID (adapted teacher).")
    pl.add_argument("kind", help="takd, dgkd, eskd or aid (options under takd.* / dgkd.* / eskd.* / aid.*, see docs/pipelines.md, docs/aid.md)")
    _add_common(pl)

    _add_checkpoint_commands(add)

    data = sub.add_parser("data", help="Dataset tools: `gapkd data check` reads a whole dataset before a long run.",
                          description="Dataset tools.")
    data_commands = data.add_subparsers(dest="data_command", metavar="{check}")
    data_commands.required = True
    text = "Check a dataset up front: decode every image a run would read; counts per split and class; problems with their fix."
    dc = data_commands.add_parser("check", help=text, description=text, epilog=textwrap.dedent(EXAMPLES["data check"]),
                                  formatter_class=argparse.RawDescriptionHelpFormatter, parents=[plugin_option()])
    dc.add_argument("overrides", nargs="*", metavar="key=value", help="data.* keys, e.g. data.name=imagenet data.path=/data/imagenet")
    dc.add_argument("--workers", type=int, help="decoding processes (default data.workers, else min(8, CPU cores)); 0 decodes here")
    dc.add_argument("--limit", type=int, help="decode only this many images, drawn at random (counts still cover every file)")
    dc.add_argument("--json", metavar="FILE", help="also write the whole report to FILE as JSON")
    dc.add_argument("--data-root")

    _add_common(add("aid", "AID pipeline (our reading of the published abstract): reference student -> adapted teacher -> distillation."))

    ls = add("list", "List registered models, methods or datasets (one name per line first).")
    ls.add_argument("what", choices=["models", "methods", "datasets", "pipelines"])
    ls.add_argument("--verbose", "-v", action="store_true", help="add details after each name")

    qs = add("quickstart", "Offline demo on real data: teacher, from-scratch student and distilled students, with a table.")
    qs.add_argument("--dataset", default="digits", help="digits (default) or fashion-mnist (when installed)")
    qs.add_argument("--epochs", type=int, default=None, help="student epochs (default depends on the dataset)")
    qs.add_argument("--out-dir", default="runs/quickstart")
    qs.add_argument("--data-root")

    from .study import add_study_parser
    from .teachers import add_teachers_parser

    add_study_parser(sub)
    add_teachers_parser(sub, parents=[plugin_option()])
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options (argparse stops the positional list at an option)
    if extra and hasattr(args, "overrides") and all("=" in item and not item.startswith("-") for item in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.version:
        from ..core.version import __version__

        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun with several processes
        if args.command not in ("train", "distill"):
            print(f"gapkd {args.command}: error: only `gapkd train` and `gapkd distill` run under torchrun (DDP); "
                  "run this command without torchrun.", file=sys.stderr)
            return 2
        if int(os.environ.get("RANK", "0")) > 0:
            sys.stdout = open(os.devnull, "w")  # rank 0 alone reports; errors still reach stderr from every rank
    from ..core.plugins import command_line_plugins, trust_plugins

    if args.command in LONG_COMMANDS:
        sys.stdout = _OutliveReader(sys.stdout)

    try:
        with command_line_plugins([*args.global_plugins, *getattr(args, "plugins", [])]), \
                trust_plugins(getattr(args, "trust_plugins", False)):
            return COMMANDS[args.command](args)
    except GapkdError as error:
        print(f"gapkd {args.command}: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `gapkd list models | head`: the reader went away
        sys.stderr.close()
        return 0 if args.command == "list" else 141  # a training command that could not report must not look successful
    except OSError as error:  # the file system refused (read-only folder, full disk): the file and the fix, no traceback
        from ..core.errors import os_error_message

        print(f"gapkd {args.command}: error: {os_error_message(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume from the last checkpoint.", file=sys.stderr)
        return 130


class _OutliveReader:
    """stdout for commands that train: when its reader goes away (`gapkd distill ... | head -2`), the
    rest of the output goes to /dev/null and the run goes on to its end, instead of stopping at the
    next epoch line and exiting 0 as if it had finished."""

    def __init__(self, stream):
        self._stream = stream

    def _gone(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())  # what is still buffered flushes into /dev/null, at exit too
        os.close(devnull)

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._gone()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._gone()

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _train(args) -> int:
    from .. import api

    summary = api.train(args.config, _overrides(args), echo=not args.quiet, overwrite=args.overwrite)
    print(json.dumps(summary, indent=2))
    return 0


def _distill(args) -> int:
    from .. import api

    summary = api.distill(args.config, _overrides(args), echo=not args.quiet, overwrite=args.overwrite)
    print(json.dumps(summary, indent=2))
    return 0


def _pipeline(args) -> int:
    from ..pipelines import PIPELINES

    summary = PIPELINES.get(args.kind)(args.config, _overrides(args), echo=not args.quiet, overwrite=args.overwrite)
    print(json.dumps(summary, indent=2))
    return 0


def _eval(args) -> int:
    from .. import api

    result = api.evaluate_checkpoint(args.checkpoint, _data_config(args), args.model, args.device)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>12}: {value:.2f}" if isinstance(value, float) else f"{key:>12}: {value}")
    return 0


def _data_config(args):
    """The DataConfig of commands that take only data.* overrides."""
    from ..api import data_config

    return data_config(_overrides(args), args.command)


def _analyze(args) -> int:
    from .. import api
    from ..analysis import format_report

    report = api.analyze_checkpoints(args.teacher_checkpoint, args.student_checkpoint, _data_config(args), args.split,
                                     teacher_model=args.teacher_model, student_model=args.student_model,
                                     temperature=args.temperature, device=args.device)
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"teacher {report['teacher']} ({report['teacher_checkpoint']}) vs student {report['student']} "
          f"({report['student_checkpoint']}) on {report['dataset']} {report['split']}, temperature {report['temperature']:g}")
    print(format_report(report))
    return 0


def _export(args) -> int:
    from ..deploy import export

    result = export(args.run_dir, args.format, args.out, checkpoint=args.checkpoint, samples=args.samples,
                    tolerance=args.tolerance, data_root=args.data_root)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"wrote {result['path']} ({result['format']}, {result['model']} from {result['checkpoint']}) and {result['metadata']}")
        print(f"max abs difference of logits vs PyTorch on {result['samples']} test images: {result['max_abs_diff']:.3g} "
              f"(tolerance {result['tolerance']:g})")
    return 0


def _data(args) -> int:
    from .. import api
    from ..core.errors import DataError
    from ..data.check import format_report

    report = api.check_data(_data_config(args), workers=args.workers, limit=args.limit, echo=True)
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)
    if not report["ok"]:
        raise DataError(f"{len(report['problems'])} problem(s): {'; '.join(report['problems'])}.")
    return 0


def _aid(args) -> int:
    """`gapkd aid ...` is `gapkd pipeline aid ...`: one pipeline, one handler."""
    args.kind = "aid"
    return _pipeline(args)


def _list(args) -> int:
    if args.what == "models":
        from ..models import MODELS

        for name in MODELS.names():
            if not args.verbose:
                print(name)
                continue
            from ..models.info import describe_model

            print(describe_model(name))
    elif args.what == "methods":
        from ..methods import METHODS

        for name in METHODS.names():
            cls = METHODS.get(name)
            # teacher: what a step needs from it; "logits" (+cache): with data.views > 0 its cached logits replace its forward
            need = cls.teacher_need() + ("+cache" if cls.uses_teacher_cache() and cls.teacher_need() != "logits" else "")
            print(f"{name:<12} teacher: {need:<15} {cls.describe()}  {cls.hparam_defaults()}" if args.verbose else name)
            if args.verbose and (cls.loss_terms or cls.extra_modules):
                modules = "; ".join(f"{attr} ({what})" for attr, what in cls.extra_modules.items()) or "none"
                print(f"    losses: {', '.join(cls.loss_terms) or '?'}; trained modules beside the student: {modules}")
            if args.verbose:
                docs = cls.hparam_docs()
                for key, default in cls.hparam_defaults().items():
                    print(f"    {key} = {default!r}" + (f"  # {docs[key]}" if docs[key] else ""))
    else:
        if args.what == "pipelines":
            from ..pipelines import PIPELINES as registry
        else:
            from ..data import DATASETS as registry

        for name in registry.names():
            doc = (registry.get(name).__doc__ or "").strip().splitlines()
            print(f"{name:<14} {doc[0] if doc else ''}" if args.verbose else name)
    return 0


def _quickstart(args) -> int:
    from ..quickstart import quickstart

    quickstart(dataset=args.dataset, epochs=args.epochs, out_dir=args.out_dir, data_root=args.data_root)
    return 0


def _study(args) -> int:
    from .study import study_command

    return study_command(args)


def _teachers(args) -> int:
    from .teachers import teachers_command

    return teachers_command(args)


#: commands that train; they keep going when stdout's reader goes away (see _OutliveReader)
LONG_COMMANDS = ("train", "distill", "pipeline", "aid", "quickstart", "study")

COMMANDS = {"train": _train, "distill": _distill, "pipeline": _pipeline, "aid": _aid, "eval": _eval, "analyze": _analyze,
            "export": _export, "data": _data, "list": _list, "quickstart": _quickstart, "study": _study,
            "teachers": _teachers}

if __name__ == "__main__":
    sys.exit(main())
