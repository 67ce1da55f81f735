"""What a study will cost on this machine before it runs: a short pilot of every distinct kind of run in
its plan, multiplied out.

Each distinct (role, method, teacher, student) of the study's plan is built as the loop builds it
(gapkd.build.prepare_distiller: teacher BatchNorm folded, channels_last, autocast) on the study's real
data and timed for a few training steps (steps.time_steps: interleaved rounds, fastest kept) and for the
evaluation forward of one batch. A run's cost is then

    epochs x (steps per epoch x step time + (validation + test images) / batch x evaluation time per batch)

Stand-ins, stated in the output: a teacher checkpoint that does not exist yet is a random-weight teacher
of the same architecture (benchmarks/throughput.py's calibrated_teacher); methods with several
configurations are timed at their first (a tuned method's choice is not known before its tuning runs);
a pipeline counts its stages (TAKD: teacher -> assistant, assistant -> student, each KD; AID: the
reference student and the final KD; its short teacher-adaptation stage is left out and said so).
Machine load inflates every time alike; quote the load with the estimate.

    python benchmarks/study_cost.py capacity-ladder-cpu data.path=PATH/cifar10-jpg-q75.tar.gz --json cost.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gapkd.config import build_config, parse_overrides  # noqa: E402
from gapkd.core.io import atomic_save  # noqa: E402
from gapkd.data import build_data, load_dataset  # noqa: E402
from gapkd.study import expand, resolve_study  # noqa: E402
from steps import time_steps  # noqa: E402  (benchmarks/steps.py)
from throughput import calibrated_teacher  # noqa: E402  (benchmarks/throughput.py)


def stages(run) -> list[tuple[str, str | None, str, dict]]:
    """(method, teacher, student, extra method keys) of each training stage of a planned run."""
    teacher = run.tree.get("teacher", {}) or {}
    method = {"name": run.method_name, **run.hparams}
    if run.pipeline == "takd":
        assistant = run.pipeline_options.get("assistant")
        return [(run.method_name, teacher["name"], assistant, method), (run.method_name, assistant, run.model, method)]
    if run.pipeline == "aid":
        return [("ce", None, run.model, {"name": "ce"}), (run.method_name, teacher["name"], run.model, method)]
    return [(run.method_name, teacher.get("name"), run.model, method)]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study")
    parser.add_argument("overrides", nargs="*", help="key=value run-config overrides, as for gapkd study run")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    overrides = parse_overrides(args.overrides)
    spec = resolve_study(args.study)
    plan = expand(spec, overrides, choose=lambda key, runs: 0)  # stand-in: each tuned method at its first configuration
    base = plan[0].tree
    data = load_dataset(build_config(base).data)
    started = time.perf_counter()
    kinds: dict[tuple, dict] = {}
    for run in plan:
        for method, teacher, student, hparams in stages(run):
            kinds.setdefault((method, teacher, student, json.dumps(hparams, sort_keys=True)), {"runs": 0, "tree": run.tree})
            kinds[(method, teacher, student, json.dumps(hparams, sort_keys=True))]["runs"] += 1
    with tempfile.TemporaryDirectory() as tmp:
        configs = {}
        for (method, teacher, student, hparams), kind in kinds.items():
            tree = {k: v for k, v in kind["tree"].items() if k not in ("teacher", "method", "student")}
            tree.update(student={"name": student}, method=json.loads(hparams), out_dir=tmp)
            if teacher is not None:
                path = Path(tmp) / f"{teacher}.pt"
                if not path.is_file():
                    model = calibrated_teacher(teacher, data)
                    atomic_save({"format": "gapkd-model", "model": teacher, "num_classes": data.num_classes,
                                 "in_channels": data.in_channels, "state_dict": model.state_dict()}, path)
                tree["teacher"] = {"name": teacher, "checkpoint": str(path)}
            configs[(method, teacher, student, hparams)] = build_config(tree)
        labels = {key: f"{key[0]} {key[1] + '->' if key[1] else ''}{key[2]} #{i}" for i, key in enumerate(configs)}
        seconds = time_steps({labels[k]: cfg for k, cfg in configs.items()}, data, args.steps, args.rounds)
        eval_seconds = {labels[k]: eval_time(cfg, data) for k, cfg in configs.items()}
    rows, total = [], 0.0
    for key, cfg in configs.items():
        bundle_sizes = split_sizes(cfg, data)
        steps_per_epoch = math.ceil(bundle_sizes["train"] / cfg.data.batch_size)
        eval_batches = (bundle_sizes["val"] + bundle_sizes["test"]) / cfg.data.batch_size
        per_run = cfg.train.epochs * (steps_per_epoch * seconds[labels[key]] + eval_batches * eval_seconds[labels[key]])
        runs = kinds[key]["runs"]
        total += runs * per_run
        rows.append({"kind": labels[key], "runs": runs, "epochs": cfg.train.epochs, "images": bundle_sizes,
                     "batch": cfg.data.batch_size, "step_s": seconds[labels[key]],
                     "eval_batch_s": eval_seconds[labels[key]], "run_s": per_run, "all_s": runs * per_run})
    report = {
        "study": spec.name, "runs": len(plan), "kinds": rows, "total_hours": total / 3600,
        "pilot_seconds": time.perf_counter() - started, "load_average": os.getloadavg(), "threads": torch.get_num_threads(),
        "stand_ins": ["random-weight teachers of the same architectures", "tuned methods at their first configuration",
                      "AID's teacher-adaptation stage not counted"],
    }
    for row in sorted(rows, key=lambda r: -r["all_s"]):
        print(f"{row['kind']:<48} runs {row['runs']:>3}  step {1000 * row['step_s']:7.1f} ms  run {row['run_s'] / 60:6.1f} min  "
              f"all {row['all_s'] / 3600:6.2f} h")
    print(f"{spec.name}: {len(plan)} runs, about {total / 3600:.1f} h on this machine at load {os.getloadavg()[0]:.1f} "
          f"({torch.get_num_threads()} threads); pilot took {report['pilot_seconds']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


def split_sizes(cfg, data) -> dict[str, int]:
    bundle = build_data(cfg.data, torch.device("cpu"), cfg.seed, False, data=data)
    return {"train": bundle.train.num_samples, "val": bundle.val.num_samples if bundle.val is not None else 0,
            "test": bundle.test.num_samples}


@torch.no_grad()
def eval_time(cfg, data) -> float:
    """Seconds of the evaluation forward (every head the method evaluates) on one batch."""
    from gapkd.build import prepare_distiller
    from gapkd.engine.runtime import Runtime

    runtime = Runtime.from_train(cfg.train)
    bundle = build_data(cfg.data, runtime.device, cfg.seed, runtime.channels_last, data=data)
    distiller = prepare_distiller(cfg, bundle, runtime.device, runtime).eval()
    images = next(iter(bundle.train.epoch(0))).images
    best = math.inf
    for _ in range(3):
        started = time.perf_counter()
        with runtime.autocast():
            distiller.eval_heads(images)
        best = min(best, time.perf_counter() - started)
    return best


if __name__ == "__main__":
    main()
