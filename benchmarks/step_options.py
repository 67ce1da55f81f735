"""Step time of one method under several config variants, timed interleaved in one process (the
compute bound of benchmarks/throughput.py): what each speed option is worth on this machine.

    python benchmarks/step_options.py --pair resnet56:resnet20 --method kd \\
        default: fp32=train.amp=off,train.channels_last=false nofold=train.fold_teacher_bn=false compile=train.compile=true

Each variant is NAME=OVERRIDE[,OVERRIDE...] (NAME: alone for the defaults)."""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from steps import time_steps  # benchmarks/steps.py
from throughput import benchmark_data, make_config  # benchmarks/throughput.py


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", default="resnet56:resnet20", help="teacher:student")
    parser.add_argument("--method", default="kd")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
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
