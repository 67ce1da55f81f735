"""Mean ± std over seeds of the runs benchmarks/evidence_methods.py wrote (one run folder per method
and seed under its --out-dir): test accuracy at the best-validation epoch, and best validation.

    python benchmarks/evidence_seeds.py --out-dir runs/evidence/methods --seeds 0 1 2 --methods kd sp cc

std is the sample standard deviation (n - 1); a method with runs missing for some seeds is shown
with the seeds it has, and says so."""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def summaries(out_dir: Path, method: str, teacher: str, student: str, seeds: list[int]) -> dict[int, dict]:
    found = {}
    for seed in seeds:
        path = out_dir / f"{method}_{teacher}-{student}_s{seed}" / "summary.json"
        if path.is_file():
            found[seed] = json.loads(path.read_text())
    return found


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--methods", nargs="+", required=True)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--teacher", default="resnet56")
    parser.add_argument("--student", default="resnet20")
    args = parser.parse_args()
    print("| method | seeds | test @ best val | best val |")
    print("|---|---|---|---|")
    for method in args.methods:
        runs = summaries(args.out_dir, method, args.teacher, args.student, args.seeds)
        if not runs:
            print(f"| {method} | none finished | – | – |")
            continue
        tests = [s["test_acc_at_best_val"] for s in runs.values()]
        vals = [s["best_val_acc"] for s in runs.values()]
        print(f"| {method} | {' '.join(map(str, runs))} | {mean_std(tests)} | {mean_std(vals)} |")


if __name__ == "__main__":
    main()
