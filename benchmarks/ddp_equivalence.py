"""DDP through the real launcher: the same `gapkd train` run on one process and, under torchrun,
on N processes with the same global batch; then the N-process run again, with one worker
SIGKILLed halfway (torchrun stops the rest) and the command relaunched, which must resume it.

Prints how far the N-process weights are from the single-process ones, both runs' accuracies,
and whether the killed-and-resumed run is bit-identical to the uninterrupted N-process run.

    python benchmarks/ddp_equivalence.py                                   # 2 CPU processes, gloo
    python benchmarks/ddp_equivalence.py --device cuda --nproc 2 --student resnet20 --data cifar10-jpg \\
        --extra data.path=../shared/data/cifar10-jpg/cifar10-jpg-q75.tar.gz data.train_subset=5000

On CPUs each process normalises its own slice (no SyncBatchNorm there), so models with BatchNorm
differ from the single-process run by more than rounding; on GPUs SyncBatchNorm should bring
them to rounding. Writes nothing outside --workdir (default: a temporary folder)."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SRC = Path(__file__).resolve().parents[1] / "src"


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["state_dict"]


def _worker_pids(launcher_pid: int, rank: int) -> list[int]:
    """Processes started by torchrun whose environment says RANK=rank (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat[1]) == launcher_pid and f"RANK={rank}".encode() in environ:
            found.append(int(entry.name))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--student", default="resnet8")
    parser.add_argument("--data", default="digits")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--extra", nargs="*", default=[], help="more key=value overrides")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gapkd-ddp-"))
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    common = [f"student.name={args.student}", f"data.name={args.data}", f"train.epochs={args.epochs}",
              f"train.device={args.device}", f"data.batch_size={args.batch_size}", "schedule.name=cosine",
              f"out_dir={workdir}", "--quiet", *args.extra]
    single = [sys.executable, "-m", "gapkd.cli", "train", *common]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                "-m", "gapkd.cli", "train", *common]
    timings = {}
    for name, command in (("single", single), ("ddp", torchrun)):
        started = time.perf_counter()
        subprocess.run([*command, f"name={name}"], env=env, check=True, stdout=subprocess.DEVNULL)
        timings[name] = round(time.perf_counter() - started, 1)

    killed_dir = workdir / "killed"
    launcher = subprocess.Popen([*torchrun, "name=killed"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while len(_metrics(killed_dir)) < max(1, args.epochs // 2) and launcher.poll() is None:
        time.sleep(0.2)
    victims = _worker_pids(launcher.pid, args.nproc - 1)
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    launcher.wait()
    state = torch.load(killed_dir / "checkpoints" / "state.pt", map_location="cpu", weights_only=True)
    killed_after = state["epoch"]
    subprocess.run([*torchrun, "name=killed"], env=env, check=True, stdout=subprocess.DEVNULL)

    one, many, resumed = _weights(workdir / "single"), _weights(workdir / "ddp"), _weights(killed_dir)
    floating = [k for k in one if one[k].is_floating_point()]
    report = {
        "nproc": args.nproc, "device": args.device, "student": args.student, "data": args.data, "epochs": args.epochs,
        "max_abs_weight_difference": max(float((one[k] - many[k]).abs().max()) for k in floating),
        "max_relative_weight_difference": max(float((one[k] - many[k]).norm() / one[k].norm().clamp_min(1e-12)) for k in floating),
        "single_last_val_test": [_metrics(workdir / "single")[-1][key] for key in ("val_acc", "test_acc")],
        "ddp_last_val_test": [_metrics(workdir / "ddp")[-1][key] for key in ("val_acc", "test_acc")],
        "killed_rank": args.nproc - 1, "killed_workers": len(victims), "killed_after_epoch": killed_after,
        "resumed_bit_identical": all(torch.equal(many[k], resumed[k]) for k in many),
        "epochs_logged": [record["epoch"] for record in _metrics(killed_dir)],
        "seconds": timings, "workdir": str(workdir),
    }
    print(json.dumps(report, indent=2))
    return 0 if report["resumed_bit_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
