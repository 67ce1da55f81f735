"""Evidence for AID (our reading of the published abstract of Qian, Le & Harandi, ICCV 2025):
KD from the original teacher vs KD from an AID-adapted teacher, and AID at several adaptation
strengths beta, over several seeds, on the CIFAR-10 JPEG copy.

Per seed: a from-scratch student (CE; it is also AID's reference student S_ref), KD from T0, and
the AID pipeline (adapt the teacher against S_ref, then KD) for every beta. Prints Markdown tables:
mean ± sample std of the test accuracy at the best-validation epoch, and the decomposition of
teacher vs S_ref on the validation split before / after adaptation. Every run is an ordinary run
folder under --out-dir: run the script again to resume or to re-print the tables. The sweep warns
instead of stopping when an adaptation costs the teacher more than aid.max_teacher_drop (the table
shows the teacher's accuracy); pass aid.on_teacher_drop=error to stop.

    python benchmarks/evidence_aid.py --teacher-checkpoint runs/teacher-r56/checkpoints/best.pt \\
        --epochs 240 train.device=cuda           # the evidence (hours on a GPU)
    python benchmarks/evidence_aid.py --smoke    # digits, tiny budget: checks the script end to end
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from gapkd.api import run, run_dir_for
from gapkd.config import build_config, merge, parse_overrides
from gapkd.data import load_dataset
from gapkd.pipeline_aid import NOTE, aid

CIFAR10_JPG = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpg" / "cifar10-jpg-q75.tar.gz"


def mean_std(values: list[float]) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.2f} (n=1)"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def base_config(args) -> dict:
    """The shared recipe: CIFAR's SGD recipe with step decay at 62.5/75/87.5% of the budget (or the smoke preset)."""
    if args.smoke:
        tree = {
            "data": {"name": "digits", "batch_size": 32, "train_subset": 200, "test_subset": 100, "augment": {"crop_padding": 1, "flip": False}},
            "optim": {"lr": 0.05}, "schedule": {"name": "cosine"}, "train": {"epochs": args.epochs, "device": "cpu"},
        }
    else:
        e = args.epochs
        tree = {
            "data": {"name": "cifar10-jpg", "path": str(args.data_path), "batch_size": 64},
            "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
            "schedule": {"name": "step", "milestones": [0.625 * e, 0.75 * e, 0.875 * e], "gamma": 0.1},
            "train": {"epochs": e},
        }
    tree["out_dir"] = str(args.out_dir)
    return merge(tree, parse_overrides(args.overrides))


def smoke_teacher(base: dict, teacher: str) -> str:
    """--smoke without a teacher checkpoint: a quick CE teacher on digits."""
    cfg = build_config(base, overrides={"name": "smoke_teacher", "student": {"name": teacher}, "method": {"name": "ce"}})
    run(cfg, echo=False)
    return str(run_dir_for(cfg) / "checkpoints" / "best.pt")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher-checkpoint", help="the trained teacher T0 (required unless --smoke)")
    parser.add_argument("--teacher", default=None, help="teacher architecture (default resnet56; resnet14 with --smoke)")
    parser.add_argument("--student", default=None, help="student architecture (default resnet20; resnet8 with --smoke)")
    parser.add_argument("--epochs", type=int, default=None, help="distillation / scratch budget (default 240; 1 with --smoke)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (0 1 with --smoke)")
    parser.add_argument("--betas", type=float, nargs="+", default=[0.3, 1.0, 3.0], help="adaptation strengths")
    parser.add_argument("--data-path", type=Path, default=CIFAR10_JPG, help="the CIFAR-10 JPEG tarball")
    parser.add_argument("--out-dir", type=Path, default=None, help="default runs/evidence_aid (runs/evidence_aid_smoke)")
    parser.add_argument("--smoke", action="store_true", help="digits and a tiny budget: seconds, checks the script only")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="applied to every run, e.g. train.device=cuda; aid.* keys go to the AID pipelines only")
    args = parser.parse_args(argv)
    args.teacher = args.teacher or ("resnet14" if args.smoke else "resnet56")
    args.student = args.student or ("resnet8" if args.smoke else "resnet20")
    args.epochs = args.epochs or (1 if args.smoke else 240)
    args.seeds = args.seeds if args.seeds is not None else ([0, 1] if args.smoke else [0, 1, 2])
    args.out_dir = args.out_dir or Path("runs/evidence_aid_smoke" if args.smoke else "runs/evidence_aid")
    base = base_config(args)
    aid_options = base.pop("aid", {})  # aid.* overrides (e.g. aid.temperature_scaling=true) go to the AID pipelines only
    if args.teacher_checkpoint is None:
        if not args.smoke:
            parser.error("--teacher-checkpoint is required (train one with `gapkd train student.name=resnet56 ...`).")
        args.teacher_checkpoint = smoke_teacher(base, args.teacher)
    data = load_dataset(build_config(base, overrides={"student": {"name": args.student}}).data)
    teacher = {"name": args.teacher, "checkpoint": str(args.teacher_checkpoint)}

    accuracy: dict[str, list[float]] = {}
    adaptation: dict[float, list[dict]] = {beta: [] for beta in args.betas}
    teacher_acc: list[float] = []
    for seed in args.seeds:
        common = {"seed": seed, "student": {"name": args.student}}
        scratch = build_config(base, overrides={**common, "name": f"scratch_s{seed}", "method": {"name": "ce"}})
        accuracy.setdefault("scratch (CE)", []).append(run(scratch, echo=False, data=data)["test_acc_at_best_val"])
        reference = str(run_dir_for(scratch) / "checkpoints" / "best.pt")
        kd = build_config(base, overrides={**common, "name": f"kd_s{seed}", "method": {"name": "kd"}, "teacher": teacher})
        summary = run(kd, echo=False, data=data)
        accuracy.setdefault("KD from T0", []).append(summary["test_acc_at_best_val"])
        teacher_acc.append(summary["teacher_test_acc"])
        for beta in args.betas:
            pipeline = merge(base, {**common, "name": f"aid_b{beta:g}_s{seed}", "method": {"name": "kd"}, "teacher": teacher,
                                    "aid": {"on_teacher_drop": "warn", **aid_options, "beta": beta, "reference_checkpoint": reference}})
            result = aid(overrides=pipeline, echo=False, data=data)
            accuracy.setdefault(f"AID (beta={beta:g}) + KD", []).append(result["student_test_acc_at_best_val"])
            adaptation[beta].append(result["adapted_teacher"])
        print(f"seed {seed} done", file=sys.stderr)

    lines = [
        f"# AID evidence: {args.teacher} -> {args.student} on {base['data']['name']}, {args.epochs} epochs, seeds {args.seeds}",
        "", f"_{NOTE}_", "",
        f"Teacher T0 test accuracy: {mean_std(teacher_acc)} (same checkpoint for every seed).", "",
        "| student | test acc at best val (%), mean ± sample std | n |", "|---|---:|---:|",
    ]
    lines += [f"| {name} | {mean_std(values)} | {len(values)} |" for name, values in accuracy.items()]
    lines += ["", "Teacher vs S_ref on the validation split, before -> after adaptation (mean over seeds):", "",
              "| beta | teacher val acc | D_T | L_class(T ‖ S_ref) | L_inner(T ‖ S_ref) | L_class(T0 ‖ T) |", "|---:|---|---|---|---|---:|"]
    for beta, reports in adaptation.items():
        def change(key: str) -> str:
            before = statistics.mean(r["val"][key]["before"] for r in reports)
            after = statistics.mean(r["val"][key]["after"] for r in reports)
            return f"{before:.4f} -> {after:.4f}"
        drift = statistics.mean(r["val"]["class_to_original"] for r in reports)
        lines.append(f"| {beta:g} | {change('teacher_acc')} | {change('spread_teacher')} | {change('class')} | {change('inner')} | {drift:.4f} |")
    table = "\n".join(lines)
    print(table)
    (args.out_dir / "evidence_aid.md").write_text(table + "\n")
    (args.out_dir / "evidence_aid.json").write_text(json.dumps({"accuracy": accuracy, "teacher_test_acc": teacher_acc,
                                                                "adaptation": {str(b): r for b, r in adaptation.items()}}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
