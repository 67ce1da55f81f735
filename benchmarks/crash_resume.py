"""Crash test: SIGKILL a training run at random moments, check the last good checkpoint
always loads, then let it finish and compare its final weights bit for bit with an
uninterrupted run of the same config (CPU, deterministic mode).

    python benchmarks/crash_resume.py --kills 20 --seed 0

Writes nothing outside --workdir (default: a temporary folder)."""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ARGS = ["data.name=digits", "student.name=resnet8", "train.epochs=12", "data.batch_size=32", "data.train_subset=400",
        "train.device=cpu", "train.deterministic=true", "train.threads=1", "schedule.name=cosine", "data.augment.flip=false",
        "--quiet"]


def _command(out_dir: Path, name: str) -> list[str]:
    return [sys.executable, "-m", "gapkd.cli", "train", *ARGS, f"out_dir={out_dir}", f"name={name}"]


def _weights(run_dir: Path) -> dict:
    from gapkd.engine.checkpoint import safe_load

    return safe_load(run_dir / "checkpoints" / "last.pt")["state_dict"]


def crash_resume(kills: int, seed: int, workdir: Path) -> dict:
    from gapkd.engine.checkpoint import safe_load

    rng = random.Random(seed)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    subprocess.run(_command(workdir, "straight"), check=True, env=env, stdout=subprocess.DEVNULL)
    duration = time.perf_counter() - started
    run_dir = workdir / "killed"
    stats = {"kills": 0, "killed_during_checkpoint_write": 0, "checkpoint_loads": 0, "no_checkpoint_yet": 0, "finished_before_kill": 0}
    for _ in range(kills):
        process = subprocess.Popen(_command(workdir, "killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.2, duration * 0.6))
        if process.poll() is not None:
            stats["finished_before_kill"] += 1
            break
        process.send_signal(signal.SIGKILL)
        process.wait()
        stats["kills"] += 1
        checkpoints = run_dir / "checkpoints"
        if checkpoints.is_dir() and any(checkpoints.glob(".*.tmp")):
            stats["killed_during_checkpoint_write"] += 1
        if (checkpoints / "state.pt").exists():
            safe_load(checkpoints / "state.pt")  # raises if torn
            stats["checkpoint_loads"] += 1
        else:
            stats["no_checkpoint_yet"] += 1
    subprocess.run(_command(workdir, "killed"), check=True, env=env, stdout=subprocess.DEVNULL)
    a, b = _weights(workdir / "straight"), _weights(run_dir)
    stats["bit_identical"] = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    stats["metrics_epochs"] = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    stats["uninterrupted_seconds"] = round(duration, 1)
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gapkd-crash-"))
    print(json.dumps(crash_resume(args.kills, args.seed, workdir), indent=2))


if __name__ == "__main__":
    main()
