"""Every KD method at one common budget on the CIFAR-10 JPEG copy: teacher -> student with the
same data, schedule and epochs for all, selection on the validation split, test reported.
Prints a Markdown table with best-validation accuracy, test accuracy at that epoch, last-epoch
test accuracy and each run's train seconds per epoch (from summary.json).

    python benchmarks/evidence_methods.py --teacher-checkpoint runs/evidence/cpu-teacher-resnet56/checkpoints/best.pt \\
        data.train_subset=5000 train.epochs=5 train.amp=bf16 train.channels_last=true
    python benchmarks/evidence_methods.py --smoke      # digits, seconds: checks the script

Runs are ordinary run folders under --out-dir: run the script again to resume or re-print."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gapkd.api import run
from gapkd.config import build_config, merge, parse_overrides
from gapkd.pipelines import PIPELINES

CIFAR10_JPG = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpg" / "cifar10-jpg-q75.tar.gz"
METHODS = ["ce", "kd", "logit-kd", "dkd", "dist", "ctkd", "fitnet", "at", "feature-kd", "simkd", "crd", "reviewkd",
           "dfpt-kd", "dfpt-kd+", "takd", "eskd", "ab", "ft", "fsp", "ofd", "kd-ls", "nkd", "wttm", "sdd", "mlkd", "dgkd"]
# initialisation phases scaled to the budget: RepDistiller's 30 of 240 epochs, at least 1, inside the same epochs
INIT_PHASE = ("ab", "ft", "fsp")
# labels that are a method with settings of their own: (method section, other config keys)
VARIANTS = {
    "kd-ls": ({"name": "kd", "logit_standardize": True, "temperature": 2.0, "kd_weight": 9.0}, {}),  # the authors' 2 / 9
    "mlkd": ({"name": "mlkd"}, {"data": {"augment": {"strong": True}}}),  # its strong view
}


def base_tree(args) -> dict:
    if args.smoke:
        tree = {"data": {"name": "digits", "batch_size": 32, "train_subset": 300, "augment": {"crop_padding": 1, "flip": False}, "drop_last": True},
                "train": {"epochs": 1, "device": "cpu"}}
    else:
        tree = {"data": {"name": "cifar10-jpg", "path": str(args.data_path), "batch_size": 128, "eval_batch_size": 1000},
                "train": {"epochs": 5}}
    tree.update({"optim": {"lr": 0.05}, "schedule": {"name": "cosine"}, "out_dir": str(args.out_dir), "seed": args.seed,
                 "student": {"name": args.student}, "teacher": {"name": args.teacher, "checkpoint": args.teacher_checkpoint}})
    return merge(tree, parse_overrides(args.overrides))


def run_method(method: str, tree: dict, args) -> dict:
    tree = merge(tree, {"name": f"{method}_{args.teacher}-{args.student}_s{args.seed}"})
    if method == "ce":
        tree = {k: v for k, v in tree.items() if k != "teacher"}
    if method in VARIANTS:
        section, extra = VARIANTS[method]
        return run(build_config(merge(merge(tree, extra), {"method": section})), echo=False)
    if method in PIPELINES:  # takd: assistant resnet32 distilled with kd; eskd: teacher stopped at 40% of its epochs
        tree = merge(tree, {"method": {"name": "dgkd" if method == "dgkd" else "kd"}})
        options = {"takd": {"assistant": args.assistant}, "dgkd": {"assistant": args.assistant},
                   "eskd": {"stop_epoch": max(1, int(0.4 * tree["train"]["epochs"]))}}
        return PIPELINES.get(method)(None, merge(tree, {method: options.get(method, {})}), echo=False)["student"]
    hyper = {"init_epochs": max(1, round(tree["train"]["epochs"] * 30 / 240))} if method in INIT_PHASE else {}
    return run(build_config(merge(tree, {"method": {"name": method, **hyper}})), echo=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="resnet56")
    parser.add_argument("--student", default="resnet20")
    parser.add_argument("--assistant", default="resnet32", help="TAKD's and DGKD's assistant")
    parser.add_argument("--teacher-checkpoint")
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-path", type=Path, default=CIFAR10_JPG)
    parser.add_argument("--out-dir", type=Path, default=Path("runs/evidence/methods"))
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    from gapkd.methods import METHODS as REGISTRY

    unknown = [m for m in args.methods if m not in PIPELINES and m not in REGISTRY and m not in VARIANTS]
    if unknown:  # e.g. overrides written after --methods, which takes every word after it
        parser.error(f"unknown method(s) {unknown}: put key=value overrides before --methods")
    if args.smoke and not args.teacher_checkpoint:
        tree = base_tree(args)
        teacher = build_config({**{k: v for k, v in tree.items() if k != "teacher"}, "name": "smoke_teacher",
                                "student": {"name": args.teacher}, "method": {"name": "ce"}})
        run(teacher, echo=False)
        args.teacher_checkpoint = str(Path(teacher.out_dir) / "smoke_teacher" / "checkpoints" / "best.pt")
    if not args.teacher_checkpoint:
        sys.exit("--teacher-checkpoint is required (train one with gapkd train first)")
    tree = base_tree(args)
    rows = []
    for method in args.methods:
        summary = run_method(method, tree, args)
        rows.append((method, summary))
        print(f"{method}: val {summary['best_val_acc']:.2f} test@best {summary['test_acc_at_best_val']:.2f}", flush=True)
    print(f"\n{args.teacher} -> {args.student}, seed {args.seed}, overrides: {' '.join(args.overrides) or 'none'}")
    # train seconds as measured: a ratio of them means something only if the machine's load did not
    # change between runs; step times vs KD come from benchmarks/step_options.py (interleaved)
    print("| method | best val | epoch | test @ best val | last test | train s/epoch |")
    print("|---|---|---|---|---|---|")
    for method, s in rows:
        seconds = f"{s['train_seconds'] / s['epochs']:.1f}" if method not in PIPELINES else "–"
        print(f"| {method} | {s['best_val_acc']:.2f} | {s['best_epoch']} | {s['test_acc_at_best_val']:.2f} | {s['last_test_acc']:.2f} | {seconds} |")


if __name__ == "__main__":
    main()
