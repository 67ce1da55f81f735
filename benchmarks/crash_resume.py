"""Crash test: SIGKILL gapkd at random moments, check that the last good checkpoint always
loads, then let the work finish and compare with an uninterrupted run of the same config
(CPU, deterministic mode): final weights bit-identical, no epoch lost or logged twice.

Targets:
  train  one training run (`gapkd train`)
  takd   a multi-stage pipeline (`gapkd pipeline takd`: teacher checkpoint -> assistant -> student)
  study  a study grid run by TWO concurrent workers on one SQLite database, both killed at random:
         afterwards every run is in the database exactly once and matches its run directory

    python benchmarks/crash_resume.py --target train --kills 20 --write-kills 6 --epochs 30
    python benchmarks/crash_resume.py --target takd --kills 10
    python benchmarks/crash_resume.py --target study --kills 10

Writes nothing outside --workdir (default: a temporary folder)."""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

COMMON = ["data.name=digits", "train.device=cpu", "train.deterministic=true", "train.threads=1", "schedule.name=cosine",
          "data.augment.flip=false", "data.batch_size=32", "data.drop_last=true"]
TRAIN = ["student.name=resnet8", "train.epochs=8", "data.train_subset=300"]
TAKD = ["student.name=resnet8", "teacher.name=resnet20", "method.name=kd", "train.epochs=4", "data.train_subset=300", "takd.assistant=resnet14"]
STUDY = {
    "name": "crash",
    "base": {"data": {"name": "digits", "train_subset": 150, "batch_size": 32, "drop_last": True, "augment": {"crop_padding": 1, "flip": False}},
             "schedule": {"name": "cosine"}, "train": {"device": "cpu", "deterministic": True, "threads": 1}},
    "teacher_config": {"train": {"epochs": 2}},
    "student_config": {"train": {"epochs": 2}},
    "pairs": [{"teacher": "resnet14", "student": "resnet8"}],
    "methods": {"scratch": {"name": "ce"}, "kd": {"grid": {"temperature": [2.0, 4.0]}}},
    "seeds": [0, 1],
    "budgets": {"smoke": {"note": "digits, crash test"}},
}


def _python(*args: str) -> list[str]:
    return [sys.executable, "-m", "gapkd.cli", *args]


def _state_dicts(folder: Path) -> dict[str, dict]:
    """Every last.pt below ``folder``, by path relative to it."""
    from gapkd.engine.checkpoint import safe_load

    return {str(p.relative_to(folder)): safe_load(p)["state_dict"] for p in sorted(folder.rglob("checkpoints/last.pt"))}


def _equal(a: dict[str, dict], b: dict[str, dict]) -> bool:
    return a.keys() == b.keys() and all(x.keys() == b[k].keys() and all(torch.equal(x[n], b[k][n]) for n in x) for k, x in a.items())


def _temporaries(folder: Path) -> set[Path]:
    """Checkpoint temporaries: they exist only while atomic_save writes (or after a kill during it)."""
    return set(folder.rglob("checkpoints/.*.tmp"))


def _check_checkpoints(folder: Path, stats: dict, before: set[Path]) -> None:
    from gapkd.engine.checkpoint import safe_load

    for state in folder.rglob("checkpoints/state.pt"):
        safe_load(state)  # raises if torn
        stats["checkpoint_loads"] += 1
    if _temporaries(folder) - before:  # a new one: this kill landed inside a checkpoint write
        stats["killed_during_checkpoint_write"] += 1


def _epochs_logged(folder: Path) -> dict[str, list[int]]:
    return {str(p.parent.relative_to(folder)): [json.loads(line)["epoch"] for line in p.read_text().splitlines()]
            for p in sorted(folder.rglob("metrics.jsonl"))}


def commands(target: str, workdir: Path, name: str) -> tuple[list[list[str]], Path]:
    """The command(s) one attempt runs concurrently, and the folder holding their results."""
    if target == "train":
        return [_python("train", *COMMON, *TRAIN, f"out_dir={workdir}", f"name={name}", "--quiet")], workdir / name
    if target == "takd":
        teacher = workdir / "teacher"
        if not (teacher / "summary.json").exists():
            subprocess.run(_python("train", *COMMON, "student.name=resnet20", "train.epochs=2", "data.train_subset=300",
                                   f"out_dir={workdir}", "name=teacher", "--quiet"), check=True, stdout=subprocess.DEVNULL)
        ckpt = teacher / "checkpoints" / "best.pt"
        return [_python("pipeline", "takd", *COMMON, *TAKD, f"teacher.checkpoint={ckpt}", f"out_dir={workdir}", f"name={name}",
                        "--quiet")], workdir / name
    spec = workdir / "study.yaml"
    spec.write_text(yaml.safe_dump(STUDY))
    study_dir = workdir / name
    worker = _python("study", "run", str(spec), "--budget", "smoke", "--dir", str(study_dir), "--quiet")
    return [worker, worker], study_dir


def _kill_when_writing(processes: list[subprocess.Popen], folder: Path, timeout: float) -> bool:
    """Watch ``folder`` for a checkpoint temporary (``checkpoints/.NAME.*.tmp``, which exists only while
    atomic_save writes) and SIGKILL the job the moment one appears; False if none appeared in time."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline and any(p.poll() is None for p in processes):
        if any(folder.rglob("checkpoints/.*.tmp")):
            for process in processes:
                if process.poll() is None:
                    process.send_signal(signal.SIGKILL)
            return True
        time.sleep(0.0002)
    return False


def crash_resume(target: str, kills: int, seed: int, workdir: Path, epochs: int | None = None, write_kills: int = 0) -> dict:
    """Kill ``kills`` times, each after a random time from half the uninterrupted job's time to its
    first state.pt up to a share of its training time after that (so kills land in start-up and
    all through training), then finish and compare. ``write_kills`` of the kills (spread
    among them at random) are instead sent the moment a checkpoint write is seen under way; those that
    land before the rename are counted in killed_during_checkpoint_write. ``epochs`` sets every run's epochs."""
    if epochs is not None:
        global TRAIN, TAKD
        TRAIN = [a for a in TRAIN if not a.startswith("train.epochs=")] + [f"train.epochs={epochs}"]
        TAKD = [a for a in TAKD if not a.startswith("train.epochs=")] + [f"train.epochs={epochs}"]
        for stage in ("teacher_config", "student_config"):
            STUDY[stage] = {"train": {"epochs": epochs}}
    rng = random.Random(seed)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "env": env}
    straight_cmds, straight_dir = commands(target, workdir, "straight")
    started, first_checkpoint = time.perf_counter(), None
    for command in straight_cmds[:1]:
        process = subprocess.Popen(command, **quiet)
        while process.poll() is None:  # when the first state.pt appears: start-up plus one epoch
            if first_checkpoint is None and any(straight_dir.rglob("checkpoints/state.pt")):
                first_checkpoint = time.perf_counter() - started
            time.sleep(0.01)
        if process.returncode:
            raise SystemExit(f"the uninterrupted job failed ({' '.join(command)})")
    duration = time.perf_counter() - started
    first_checkpoint = first_checkpoint or duration
    stats = {"target": target, "kills": 0, "killed_during_checkpoint_write": 0, "checkpoint_loads": 0, "finished_before_kill": 0}
    killed_cmds, killed_dir = commands(target, workdir, "killed")
    at_write = set(rng.sample(range(kills), min(write_kills, kills)))
    stats["kills_aimed_at_writes"] = 0
    for attempt in range(kills):
        before = _temporaries(killed_dir)  # left by an earlier kill, until the next run clears them
        processes = [subprocess.Popen(command, **quiet) for command in killed_cmds]
        if attempt in at_write:
            time.sleep(rng.uniform(0.0, 2.0))  # then the next checkpoint write, whichever it is
            stats["kills_aimed_at_writes"] += _kill_when_writing(processes, killed_dir, timeout=4.0 * duration + 30)
        else:
            # from mid start-up to a share of the training after it: kills land in start-up and in training
            time.sleep(rng.uniform(0.5 * first_checkpoint, first_checkpoint + 1.5 * (duration - first_checkpoint) / kills))
        if all(p.poll() is not None for p in processes) and attempt not in at_write:
            stats["finished_before_kill"] += 1
            break
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
            process.wait()
        stats["kills"] += 1
        _check_checkpoints(killed_dir, stats, before)
    for command in killed_cmds[:1]:
        subprocess.run(command, check=True, **quiet)
    stats["bit_identical"] = _equal(_state_dicts(straight_dir), _state_dicts(killed_dir))
    stats["runs_compared"] = len(_state_dicts(killed_dir))
    stats["epochs_logged_identically"] = _epochs_logged(straight_dir) == _epochs_logged(killed_dir)
    if target == "study":
        stats.update(_study_rows(straight_dir, killed_dir))
    stats["uninterrupted_seconds"] = round(duration, 1)
    stats["uninterrupted_first_checkpoint_seconds"] = round(first_checkpoint, 1)
    return stats


def _study_rows(straight: Path, killed: Path) -> dict:
    def rows(folder: Path) -> list[tuple]:
        database = next(folder.rglob("*.sqlite*"), None) or next(folder.rglob("*.db"))
        with sqlite3.connect(database) as connection:
            return connection.execute("SELECT config_hash, status FROM runs ORDER BY config_hash").fetchall()

    a, b = rows(straight), rows(killed)
    return {"study_rows": len(b), "study_rows_unique": len({h for h, _ in b}) == len(b),
            "study_rows_match_uninterrupted": a == b}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", choices=["train", "takd", "study"], default="train")
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--epochs", type=int, default=None, help="epochs of each run (defaults: train 8, takd 4, study 2)")
    parser.add_argument("--write-kills", type=int, default=0, help="how many of the kills are sent during a checkpoint write")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gapkd-crash-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(json.dumps(crash_resume(args.target, args.kills, args.seed, workdir, args.epochs, args.write_kills), indent=2))


if __name__ == "__main__":
    main()
