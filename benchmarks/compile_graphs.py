"""How many graphs torch.compile makes of each method's training step: a few short runs on digits
with ``train.compile=eager`` (Dynamo's capture without code generation, so it is quick) and the
count of distinct graphs Dynamo built. One or two per method (the full batch and the smaller last
batch) means the step compiles whole; more means graph breaks or recompiles, which cost speed and
keep CUDA graphs (``train.compile_mode=reduce-overhead``) from covering the step.

    python benchmarks/compile_graphs.py --methods kd dkd dfpt-kd --epochs 4
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch._dynamo
import torch._dynamo.utils

from gapkd.api import run
from gapkd.config import build_config
from gapkd.methods import METHODS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=[m for m in METHODS.names() if m not in ("ce", "aid-adapt")])
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = {"out_dir": tmp, "data": {"name": "digits", "batch_size": 64, "augment": {"crop_padding": 1, "flip": False}},
                "train": {"epochs": args.epochs, "device": "cpu", "amp": "off"}, "student": {"name": "resnet8"}}
        run(build_config(base, overrides=["name=teacher", "train.epochs=1"]), echo=False)
        teacher = Path(tmp) / "teacher" / "checkpoints" / "best.pt"
        print(f"| method | graphs in {args.epochs} epochs |\n|---|---|")
        for method in args.methods:
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
            cfg = build_config(base, overrides=[f"name={method}", f"method.name={method}", "teacher.name=resnet8",
                                                f"teacher.checkpoint={teacher}", "train.compile=eager"])
            run(cfg, echo=False)
            print(f"| {method} | {torch._dynamo.utils.counters['stats']['unique_graphs']} |", flush=True)


if __name__ == "__main__":
    main()
