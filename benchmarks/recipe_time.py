"""Wall-clock time of a full training recipe (issue 8: the 240-epoch CIFAR recipe of
resnet32x4 -> resnet8x4 KD at batch 64, target 5 minutes on one H100), measured through
gapkd's real entry point (gapkd.api.run: data loading, training, per-epoch validation and test
evaluation, checkpoints).

Runs the recipe for ``--epochs`` epochs (default: all of them) and reports the measured wall
clock, the training time, the steady-state time per batch and per whole epoch (training,
evaluation and checkpoint; epochs after the first) and, when fewer epochs ran than the recipe
has, the recipe's wall clock projected at that rate (said so; ``--epochs`` of 2 or more).

What this machine lacks is stood in for, and the report says which:
- a teacher checkpoint that is not there -> a random-weight teacher of the same architecture,
  calibrated as in throughput.py (timing does not depend on the weights' values);
- ``--data-stand-in cifar10-jpg``: the CIFAR-10 JPEG copy (50,000 train images of 32x32, as
  CIFAR-100) instead of the recipe's data set; only the classifier's width differs.

    python benchmarks/recipe_time.py configs/cifar100/resnet32x4-resnet8x4/kd.yaml \\
        --data-stand-in cifar10-jpg --epochs 2 train.device=cuda
"""
from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import torch

from gapkd.api import resolve_device, run, run_dir_for
from gapkd.config import build_config
from gapkd.data import build_data, load_dataset
from gapkd.engine.checkpoint import atomic_save
from gapkd.engine.runlog import read_metrics
from throughput import CIFAR10_JPG, calibrated_teacher  # benchmarks/throughput.py

STAND_INS = {"cifar10-jpg": ["data.name=cifar10-jpg", f"data.path={CIFAR10_JPG}"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path, help="a recipe YAML")
    parser.add_argument("--epochs", type=int, help="epochs to run (default: the recipe's); fewer are projected to the recipe's")
    parser.add_argument("--data-stand-in", choices=sorted(STAND_INS), help="data set to use in place of the recipe's")
    parser.add_argument("--json", type=Path, help="also write the result as JSON")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.device=cuda train.compile=true")
    args = parser.parse_intermixed_args()

    recipe = build_config(path=args.config)
    stand_ins = []
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [*(STAND_INS[args.data_stand_in] if args.data_stand_in else []), *args.overrides, f"out_dir={tmp}", "name=timed"]
        if args.epochs:
            overrides.append(f"train.epochs={args.epochs}")
        cfg = build_config(path=args.config, overrides=overrides)
        if args.data_stand_in:
            stand_ins.append(f"data: {args.data_stand_in} in place of {recipe.data.name}")
        data = load_dataset(cfg.data)  # read once: the run and the teacher stand-in share it
        batches = len(build_data(cfg.data, torch.device("cpu"), cfg.seed, data=data).train)
        if cfg.teacher is not None and not Path(cfg.teacher.checkpoint).is_file():
            teacher_path = Path(tmp) / "teacher.pt"
            model = calibrated_teacher(cfg.teacher.name, data)
            atomic_save({"format": "gapkd-model", "model": cfg.teacher.name, "num_classes": data.num_classes,
                         "state_dict": model.state_dict()}, teacher_path)
            cfg = build_config(path=args.config, overrides=[*overrides, f"teacher.checkpoint={teacher_path}"])
            stand_ins.append(f"teacher: random-weight {cfg.teacher.name} ({recipe.teacher.checkpoint} is not here)")
        epoch_ends = []  # after each epoch's training, evaluation and checkpoint
        started = time.perf_counter()
        summary = run(cfg, echo=False, data=data, on_epoch=lambda *_: epoch_ends.append(time.perf_counter()))
        wall = time.perf_counter() - started
        records = read_metrics(run_dir_for(cfg) / "metrics.jsonl")
    device = resolve_device(cfg.train.device)
    steady = [r["epoch_seconds"] for r in records[1:]] or [records[0]["epoch_seconds"]]
    ms_per_batch = 1000 * sum(steady) / len(steady) / batches
    ran, planned = len(records), recipe.train.epochs
    result = {
        "recipe": str(args.config), "device": str(device), "epochs_run": ran, "recipe_epochs": planned,
        "batch_size": cfg.data.batch_size, "batches_per_epoch": batches,
        "wall_seconds": wall, "train_seconds": summary["train_seconds"], "steady_ms_per_batch": ms_per_batch,
        "first_epoch_seconds": records[0]["epoch_seconds"], "stand_ins": stand_ins, "overrides": args.overrides,
        "peak_cuda_memory_mib": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if len(epoch_ends) > 1:  # a whole epoch in the steady state: training, evaluation, checkpoint
        result["steady_epoch_wall_seconds"] = (epoch_ends[-1] - epoch_ends[0]) / (len(epoch_ends) - 1)
    if ran < planned and len(epoch_ends) > 1:  # the rest of the recipe at that rate (on the data as configured)
        result["projected_recipe_wall_seconds"] = wall + (planned - ran) * result["steady_epoch_wall_seconds"]
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
