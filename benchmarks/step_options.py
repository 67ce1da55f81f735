"""Step time of one method under several config variants, timed interleaved in one process (the
compute bound of benchmarks/throughput.py): what each speed option is worth on this machine.

    python benchmarks/step_options.py --pair resnet56:resnet20 --method kd \\
        default: fp32=train.amp=off,train.channels_last=false nofold=train.fold_teacher_bn=false compile=train.compile=true

Each variant is NAME=OVERRIDE[,OVERRIDE...] (NAME: alone for the defaults). With --profile, the
first variant's step is profiled instead (torch.profiler, operators by self CPU time)."""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from steps import make_step, time_steps  # benchmarks/steps.py
from throughput import benchmark_data, make_config  # benchmarks/throughput.py


def profile(cfg, data, steps: int) -> None:
    """Share of CPU time per operator over ``steps`` training steps (after 3 warm-up steps)."""
    import torch

    step, _ = make_step(cfg, data)
    for _ in range(3):
        step()
    with torch.profiler.profile() as prof:
        for _ in range(steps):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", default="resnet56:resnet20", help="teacher:student")
    parser.add_argument("--method", default="kd")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="instead of timing: torch.profiler's top operators of the first variant")
    parser.add_argument("variants", nargs="+", help="NAME=OVERRIDE[,OVERRIDE...] or NAME:")
    args = parser.parse_args()
    teacher, student = args.pair.split(":")
    data = benchmark_data(args.batch * 4)
    configs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants:
            name, _, overrides = variant.rstrip(":").partition("=")
            configs[name] = make_config(Path(tmp), teacher, student, args.method, args.batch, "cpu",
                                        [o for o in overrides.split(",") if o], data)
        if args.profile:
            return profile(next(iter(configs.values())), data, args.steps)
        started = time.perf_counter()
        seconds = time_steps(configs, data, args.steps, rounds=args.rounds)
    first = next(iter(seconds))
    print(f"{args.pair} {args.method}, batch {args.batch}, fastest of {args.rounds} interleaved rounds of {args.steps} steps "
          f"({time.perf_counter() - started:.0f} s including set-up and compilation)")
    print("| variant | overrides | img/s | step time vs " + first + " |")
    print("|---|---|---|---|")
    for variant, (name, value) in zip(args.variants, seconds.items()):
        print(f"| {name} | {variant.partition('=')[2] or '(defaults)'} | {args.batch / value:.0f} | {value / seconds[first]:.2f} |")


if __name__ == "__main__":
    main()
