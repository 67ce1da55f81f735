"""The arithmetic floor of DFPT-KD's step time relative to KD's, from FLOP counts.

A KD step is one teacher forward (no autograd) plus a student forward and backward (~3x its
forward). DFPT-KD adds the prompt path: the teacher stages after the first prompt insertion run
again with autograd, forward and backward to their inputs (~2x their forward; the frozen
weights get no gradient). Prompt and fusion blocks are small and left out, so this is a lower
bound on the ratio that any implementation of the method can reach.

    python benchmarks/dfpt_flops.py
"""
from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from gapkd.models import create_model
from gapkd.models.info import count_flops


def forward_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="+", default=["resnet56:resnet20", "resnet32x4:resnet8x4"])
    parser.add_argument("--first-insert", type=int, default=0, help="stage after which the first prompt sits (default 0)")
    args = parser.parse_args()
    x = torch.zeros(1, 3, 32, 32)
    print("| pair | teacher GFLOPs | re-run stages GFLOPs | student GFLOPs | KD step | DFPT-KD step | floor of DFPT/KD |")
    print("|---|---|---|---|---|---|---|")
    for pair in args.pairs:
        t_name, s_name = pair.split(":")
        teacher, student = create_model(t_name, num_classes=10).eval(), create_model(s_name, num_classes=10).eval()
        t, s = count_flops(teacher, 32), count_flops(student, 32)
        with torch.no_grad():
            h = teacher.forward_stem(x)
            for stage in teacher.stages[: args.first_insert + 1]:
                h = stage(h)

        def rerun(h=h):
            for stage in teacher.stages[args.first_insert + 1:]:
                h = stage(h)
            return teacher.forward_head(h)

        r = forward_flops(rerun)
        kd, dfpt = t + 3 * s, t + 3 * s + 2 * r
        print(f"| {pair} | {t / 1e9:.3f} | {r / 1e9:.3f} | {s / 1e9:.3f} | {kd / 1e9:.3f} | {dfpt / 1e9:.3f} | {dfpt / kd:.2f} |")


if __name__ == "__main__":
    main()
