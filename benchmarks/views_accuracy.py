"""The accuracy cost of fixed augmented views: KD at data.views = 0 (fresh augmentation every step)
and K = 4, 8, 16 (K fixed views per image, the teacher's logits cached), several seeds each, mean and
sample std of the test accuracy at the best-validation epoch (the test split is never selected on).

One teacher is trained first (CE, on the same training subset); every student distils from it with
the same recipe, only data.views and the seed change. Runs resume (finished ones are skipped).

    python benchmarks/views_accuracy.py --images 3000 --teacher-epochs 20 --epochs 15 --out runs/views-acc \\
        data.name=cifar10-jpg data.path=../shared/data/cifar10-jpg/cifar10-jpg-q75.tar.gz
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from gapkd.api import run, run_dir_for
from gapkd.config import build_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3000, help="training subset (stratified; 10%% more are held out for validation)")
    parser.add_argument("--student-images", type=int, help="the students' training subset (default: --images)")
    parser.add_argument("--test-images", type=int, default=2000)
    parser.add_argument("--teacher", default="resnet20")
    parser.add_argument("--student", default="resnet8")
    parser.add_argument("--teacher-epochs", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--views", type=int, nargs="+", default=[0, 4, 8, 16])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/views-acc")
    parser.add_argument("--json", help="write the table here")
    parser.add_argument("extra", nargs="*", help="config overrides for every run (data.name=..., train.threads=1, ...)")
    args = parser.parse_intermixed_args()
    out = Path(args.out)
    common = {
        "out_dir": str(out), "data": {"train_subset": args.images, "test_subset": args.test_images, "batch_size": 64},
        "schedule": {"name": "cosine"}, "optim": {"lr": 0.05}, "train": {"log_every": 1000},
    }
    teacher = build_config({**common, "name": "teacher", "student": {"name": args.teacher},
                                      "train": {"epochs": args.teacher_epochs, "log_every": 1000}}, overrides=args.extra)
    teacher_summary = run(teacher, echo=False)
    checkpoint = str(run_dir_for(teacher) / "checkpoints" / "best.pt")
    print(f"teacher {args.teacher}: test {teacher_summary['test_acc_at_best_val']:.2f} at its best validation epoch", flush=True)
    rows = []
    for views in args.views:
        tests, seconds = [], []
        for seed in args.seeds:
            cfg = build_config(
                {**common, "name": f"kd-views{views}-s{seed}", "seed": seed, "student": {"name": args.student},
                 "data": {**common["data"], "train_subset": args.student_images or args.images},
                 "teacher": {"name": args.teacher, "checkpoint": checkpoint}, "method": {"name": "kd"},
                 "train": {"epochs": args.epochs, "log_every": 1000}},
                overrides=[*args.extra, f"data.views={views}", f"data.teacher_cache_dir={out / 'teacher-cache'}"])
            summary = run(cfg, echo=False)
            tests.append(summary["test_acc_at_best_val"])
            seconds.append(summary["train_seconds"])
            print(f"views {views} seed {seed}: test {tests[-1]:.2f} at best val (epoch {summary['best_epoch']}), "
                  f"{seconds[-1]:.0f}s", flush=True)
        rows.append({"views": views, "seeds": len(tests), "test_mean": statistics.mean(tests),
                     "test_std": statistics.stdev(tests) if len(tests) > 1 else 0.0, "tests": tests,
                     "train_seconds_mean": statistics.mean(seconds)})
    print("\n| data.views | seeds | test acc at best val (mean ± std) | train s / run |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['views']} | {row['seeds']} | {row['test_mean']:.2f} ± {row['test_std']:.2f} | {row['train_seconds_mean']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"teacher_test_acc": teacher_summary["test_acc_at_best_val"], "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
