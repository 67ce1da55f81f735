"""Evidence for DFPT-KD on the CIFAR-10 JPEG copy: resnet56 -> resnet20, four methods, three seeds.

Runs the student from scratch, with vanilla KD, DFPT-KD and DFPT-KD+ for each seed through
gapkd.api.run (finished runs are skipped, interrupted ones resume), then prints a Markdown
table: test accuracy at the best-validation epoch (mean ± sample std over seeds), mean best
validation accuracy, and the step time of each distillation method relative to KD (timed
separately on a few training steps, and from the runs' train_seconds).

    python benchmarks/evidence_dfpt.py --teacher-checkpoint runs/teacher-r56/checkpoints/best.pt \\
        --epochs 30 --train-subset 10000
    python benchmarks/evidence_dfpt.py --smoke      # digits, seconds: checks the script works
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from gapkd.api import resolve_device, run
from gapkd.config import build_config, merge, parse_overrides
from gapkd.data import load_dataset
from steps import time_steps  # benchmarks/steps.py

REPO = Path(__file__).resolve().parents[1]
CIFAR10_JPG = REPO.parent / "shared" / "data" / "cifar10-jpg" / "cifar10-jpg-q75.tar.gz"

#: label -> method config; every distiller uses the same temperature and the same total KD weight
METHODS = {
    "scratch": {"name": "ce"},
    "kd": {"name": "kd", "temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9},
    "dfpt-kd": {"name": "dfpt-kd", "temperature": 4.0},
    "dfpt-kd+": {"name": "dfpt-kd+", "temperature": 4.0},
}


def base_config(args) -> dict:
    """The CIFAR-10 capacity-study protocol (specs/capacity-study.md), at the chosen budget."""
    if args.smoke:
        data = {"name": "digits", "batch_size": 64, "augment": {"crop_padding": 1, "flip": False}}
    else:
        data = {"name": "cifar10-jpg", "path": str(args.data), "batch_size": 128, "train_subset": args.train_subset,
                "augment": {"crop_padding": 4, "flip": True}}
    tree = {
        "out_dir": str(args.out_dir),
        "data": data,
        "student": {"name": args.student},
        "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
        "schedule": {"name": "cosine", "min_lr": 1e-4},
        "train": {"epochs": args.epochs, "grad_clip": 1.0, "device": args.device},
    }
    return merge(tree, parse_overrides(args.overrides))  # e.g. train.amp=bf16 data.test_subset=2000


def method_config(args, label: str, seed: int) -> dict:
    overrides = {"name": f"{label}_s{seed}", "seed": seed, "method": METHODS[label]}
    if label != "scratch":
        overrides["teacher"] = {"name": args.teacher, "checkpoint": str(args.teacher_checkpoint)}
    return overrides


def smoke_teacher(args, base: dict, data) -> Path:
    """A 1-epoch teacher on digits, so --smoke needs nothing on disk."""
    cfg = build_config(base, overrides={"name": "teacher", "student": {"name": args.teacher}, "method": {"name": "ce"}})
    run(cfg, echo=False, data=data)
    return Path(cfg.out_dir) / "teacher" / "checkpoints" / "best.pt"


def mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    spread = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):.2f} ± {spread:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-checkpoint", type=Path, help="trained resnet56 on cifar10-jpg (gapkd train ...)")
    parser.add_argument("--data", type=Path, default=CIFAR10_JPG, help="the CIFAR-10 JPEG tarball")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--train-subset", type=int, default=None, help="training images kept (default: all 45,000)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--teacher", default="resnet56")
    parser.add_argument("--student", default="resnet20")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--timing-steps", type=int, default=20, help="timed steps per method and round (5 rounds) for the step-time ratio")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/evidence_dfpt"))
    parser.add_argument("--smoke", action="store_true", help="digits, 1 epoch, resnet14 -> resnet8, 2 seeds: seconds")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run (train.amp=bf16 ...)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.epochs, args.seeds, args.teacher, args.student, args.timing_steps = 1, args.seeds[:2], "resnet14", "resnet8", 3
        if args.out_dir == parser.get_default("out_dir"):
            args.out_dir = Path("runs/evidence_dfpt_smoke")
    elif args.teacher_checkpoint is None:
        parser.error("--teacher-checkpoint is required (or pass --smoke)")

    base = base_config(args)
    data = load_dataset(build_config(base).data)
    if args.smoke and args.teacher_checkpoint is None:
        args.teacher_checkpoint = smoke_teacher(args, base, data)

    summaries: dict[str, list[dict]] = {label: [] for label in METHODS}
    for seed in args.seeds:
        for label in METHODS:
            print(f"== {label} seed {seed}", flush=True)
            summaries[label].append(run(build_config(base, overrides=method_config(args, label, seed)), echo=False, data=data))

    timing_configs = {label: build_config(base, overrides=method_config(args, label, args.seeds[0])) for label in METHODS if label != "scratch"}
    step_seconds = time_steps(timing_configs, data, args.timing_steps)
    run_seconds = {label: statistics.mean(s["train_seconds"] / s["epochs"] for s in rows) for label, rows in summaries.items()}

    teacher = summaries["kd"][0]
    budget = "smoke (digits)" if args.smoke else f"{args.epochs} epochs, train subset {args.train_subset or 'all'}"
    if args.overrides:
        budget += f", overrides {' '.join(args.overrides)}"
    lines = [
        f"DFPT-KD evidence: {args.teacher} -> {args.student} on {base['data']['name']}, budget {budget}, "
        f"seeds {args.seeds}, device {resolve_device(args.device)}.",
        f"Teacher: val {teacher.get('teacher_val_acc', float('nan')):.2f}, test {teacher.get('teacher_test_acc', float('nan')):.2f}. "
        "Test accuracy is read at each run's best-validation epoch (mean ± sample std over seeds).",
        "",
        "| method | runs | test @ best val | best val (mean) | step time / KD (timed) | epoch time / KD (runs) |",
        "|---|---|---|---|---|---|",
    ]
    for label, rows in summaries.items():
        timed = f"{step_seconds[label] / step_seconds['kd']:.2f}" if label in step_seconds else "–"
        lines.append(
            f"| {label} | {len(rows)} | {mean_std([r['test_acc_at_best_val'] for r in rows])} | "
            f"{statistics.mean(r['best_val_acc'] for r in rows):.2f} | {timed} | {run_seconds[label] / run_seconds['kd']:.2f} |"
        )
    lines.append("")
    lines.append(f"Step time: fastest of 5 interleaved rounds of {args.timing_steps} steps on one batch; KD {1000 * step_seconds['kd']:.1f} ms/step.")
    report = "\n".join(lines)
    print(report)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "evidence_dfpt.md").write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
