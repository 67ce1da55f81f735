"""Tune AID's adaptation (our reading of the published abstract of Qian, Le & Harandi, ICCV 2025) on the
VALIDATION split only: for each configuration, the adaptation stage of the AID pipeline (teacher T0 adapted
against a given reference student S_ref) and how it moved L_inner(T ‖ S_ref) and the teacher's validation
accuracy; with --distill, also the student's best validation accuracy after KD from the adapted teacher
(and from T0). Test accuracy is never printed here: the runs record it, the choice must not look at it.

    python benchmarks/evidence_aid_tune.py --teacher resnet20 --teacher-checkpoint T0.pt --student resnet8 \\
        --reference-checkpoint S_ref.pt --data-path cifar10-jpg-q75.tar.gz --epochs 8 --seed 100 [--only NAME]... [--distill NAME]... [key=value ...]

Every stage is an ordinary run folder under --out-dir (run it again to resume or re-print).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gapkd.api import run
from gapkd.config import build_config, merge, parse_overrides
from gapkd.data import load_dataset
from gapkd.pipelines.aid import adapted_teacher_report, aid, parse_aid_config, pipeline_dir_for, stage_configs

#: the configurations tried (aid.* options); "as before" is the pipeline's defaults before issue 16
CONFIGS = {
    "as before (no τ², batch means, β=1, 10% epochs, lr/10)": {"temperature_scaling": False, "class_means": "batch", "beta": 1.0},
    "τ², batch means, β=1": {"temperature_scaling": True, "class_means": "batch", "beta": 1.0},
    "τ², running means, β=1": {"temperature_scaling": True, "class_means": "running", "beta": 1.0},
    "τ², running means, β=0.3": {"temperature_scaling": True, "class_means": "running", "beta": 0.3},
    "τ², running means, β=3": {"temperature_scaling": True, "class_means": "running", "beta": 3.0},
    "τ², running means, β=1, 25% epochs": {"temperature_scaling": True, "class_means": "running", "beta": 1.0, "adapt_epochs_fraction": 0.25},
    "τ², running means, β=1, lr/5": {"temperature_scaling": True, "class_means": "running", "beta": 1.0, "adapt_lr_fraction": 0.2},
}


def pipeline_tree(args, options: dict) -> dict:
    options = dict(options)
    fraction = options.pop("adapt_epochs_fraction", 0.1)
    lr_fraction = options.pop("adapt_lr_fraction", 0.1)
    tree = {
        "seed": args.seed, "out_dir": str(args.out_dir),
        "data": {"name": "cifar10-jpg", "path": str(args.data_path), "batch_size": 64},
        "student": {"name": args.student}, "teacher": {"name": args.teacher, "checkpoint": args.teacher_checkpoint},
        "method": {"name": "kd"}, "optim": {"lr": args.lr}, "schedule": {"name": "cosine"}, "train": {"epochs": args.epochs},
    }
    tree = merge(tree, parse_overrides(args.overrides))
    tree["aid"] = {"reference_checkpoint": args.reference_checkpoint, "max_teacher_drop": 100.0,
                   "adapt_epochs": max(1, round(fraction * args.epochs)), "adapt_lr": lr_fraction * args.lr, **options}
    return tree


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--teacher-checkpoint", required=True)
    parser.add_argument("--student", required=True)
    parser.add_argument("--reference-checkpoint", required=True, help="S_ref (e.g. the CE baseline of the student)")
    parser.add_argument("--epochs", type=int, default=8, help="the distillation budget (adaptation budgets are fractions of it)")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=100, help="the tuning seed (not an evaluation seed)")
    parser.add_argument("--data-path", type=Path, required=True, help="the CIFAR-10 JPEG tarball (cifar10-jpg-q75.tar.gz)")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/evidence_aid_tune"))
    # repeatable single-value flags: a list flag would swallow the key=value overrides that follow it
    parser.add_argument("--only", action="append", metavar="NAME", help="run only this configuration (repeat the flag for more)")
    parser.add_argument("--distill", action="append", default=[], metavar="NAME",
                        help="distil the student from this configuration's teacher too ('T0' = KD from T0; repeatable)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    data = None
    rows, students = [], {}
    for name, options in CONFIGS.items():
        if args.only and name not in args.only:
            continue
        tree = pipeline_tree(args, options)
        cfg, opts, hyper = parse_aid_config(overrides=tree)
        data = data or load_dataset(cfg.data)
        pipeline_dir = pipeline_dir_for(cfg, opts, hyper)
        stages = stage_configs(cfg, opts, hyper, pipeline_dir)
        pipeline_dir.mkdir(parents=True, exist_ok=True)
        run(stages["adapt"], echo=False, data=data)
        report = adapted_teacher_report(stages["adapt"], pipeline_dir, data)
        metrics = [json.loads(x) for x in open(pipeline_dir / "2-adapt" / "metrics.jsonl")]
        rows.append((name, stages["adapt"], report, metrics))
        if name in args.distill:
            students[name] = aid(overrides=tree, echo=False, data=data)["student_best_val_acc"]
        print(f"{name} done", file=sys.stderr)
    if "T0" in args.distill:
        tree = pipeline_tree(args, {})
        tree.pop("aid")
        tree["name"] = f"kd_from_T0_s{args.seed}"
        students["KD from T0 (no adaptation)"] = run(build_config(tree), echo=False, data=data)["best_val_acc"]
    lines = [f"# AID tuning (validation split only): {args.teacher} -> {args.student}, distillation budget {args.epochs} epochs, "
             f"tuning seed {args.seed}", "",
             "| configuration | adapt epochs | adapt lr | teacher val acc T0 -> T | L_inner val T0 -> T (change) | "
             "L_class(T0 ‖ T) val | last epoch: CE / β·L_inner / γ·L_class (train) |", "|---|---:|---:|---|---|---:|---|"]
    for name, adapt, report, metrics in rows:
        val, last = report["val"], metrics[-1]
        inner = val["inner"]
        change = 100 * (inner["after"] - inner["before"]) / inner["before"]
        lines.append(f"| {name} | {adapt.train.epochs} | {adapt.optim.lr:g} | {val['teacher_acc']['before']:.2f} -> "
                     f"{val['teacher_acc']['after']:.2f} | {inner['before']:.4f} -> {inner['after']:.4f} ({change:+.1f}%) | "
                     f"{val['class_to_original']:.4f} | {last['loss/ce']:.3f} / {last['loss/inner']:.4f} / {last['loss/class']:.4f} |")
    if students:
        lines += ["", "| student | best val acc (%) |", "|---|---:|"]
        lines += [f"| {name} | {acc:.2f} |" for name, acc in students.items()]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
