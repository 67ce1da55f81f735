"""What keeps a run directory safe from its own user: ``--overwrite`` deletes only a gapkd run (or
pipeline) folder; one process at a time works in a run directory (a lock naming its holder); weights
that diverged are never checkpointed; JSON files torn by an old crash are read as absent."""
from __future__ import annotations

import json
import math
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError, GapkdError
from .rundir import RunDir, check_run_name, read_json_or_none  # noqa: F401  (part of this module's API)

LOCK_FILE = ".lock"
#: what a run directory holds (see README: config.yaml, env.json, metrics.jsonl, train.log, checkpoints/, summary.json)
RUN_ENTRIES = {RunDir.CONFIG, RunDir.ENV, RunDir.METRICS, RunDir.LOG, RunDir.SUMMARY, RunDir.TEACHER_ACC, RunDir.TENSORBOARD,
               RunDir.EXPORT, RunDir.CHECKPOINTS, LOCK_FILE}
#: files a pipeline folder holds besides its stages' run folders
PIPELINE_FILES = {"pipeline.json", "aid_config.json", "aid_summary.json", "adapted_teacher_report.json", "adapted_teacher_report.md"}
#: a weight or statistic larger than this is exploded: its square overflows float32 (the next norm or variance is Inf)
EXPLODED = 1.8e19


def _run_folder_problem(path: Path) -> str | None:
    """Why ``path`` is not a gapkd run folder (None when it is one, or is empty)."""
    if path.is_symlink():
        return "it is a symbolic link"
    if not path.is_dir():
        return "it is not a folder"
    entries = {entry.name for entry in path.iterdir()}
    foreign = sorted(e for e in entries - RUN_ENTRIES if not (e.startswith(".") and e.endswith(".tmp")))
    if foreign:
        return f"it holds files a run does not write ({', '.join(foreign[:5])})"
    if entries and not entries & {RunDir.CONFIG, LOCK_FILE}:
        return "it has no config.yaml"
    return None


def _pipeline_folder_problem(path: Path) -> str | None:
    if path.is_symlink():
        return "it is a symbolic link"
    for entry in path.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            if _run_folder_problem(entry) is not None:
                return f"{entry.name}/ is not a run folder ({_run_folder_problem(entry)})"
        elif entry.name not in PIPELINE_FILES and not (entry.name.startswith(".") and entry.name.endswith(".tmp")):
            return f"it holds files a pipeline does not write ({entry.name})"
    return None


def check_overwritable(path: str | os.PathLike, kind: str = "run") -> None:
    """Refuse ``--overwrite`` of anything but a gapkd ``kind`` folder (run or pipeline), naming what is in the way."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    problem = _run_folder_problem(path) if kind == "run" else _pipeline_folder_problem(path)
    if problem is not None:
        raise ConfigError(f"--overwrite refuses to delete {path}: {problem}, so it is not a gapkd {kind} folder. "
                          "Move it away or choose another name (out_dir=..., name=...).")


def remove_for_overwrite(path: str | os.PathLike, kind: str = "run") -> None:
    """``--overwrite``: empty ``path`` if it is a gapkd ``kind`` folder (see :func:`check_overwritable`).
    A run's lock file is kept (this process holds it)."""
    path = Path(path)
    check_overwritable(path, kind)
    if not path.exists():
        return
    for entry in path.iterdir():
        if entry.name == LOCK_FILE:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


class RunLock:
    """An exclusive lock on a run directory (``.lock``, flock): held while a process trains there, released
    by the kernel when the process dies, so a killed run never leaves it stale. The file names its holder."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # no flock on this platform: unlocked, as before
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise GapkdError(f"{self.path.parent} is in use by another gapkd process ({self.holder()}); wait for it to "
                             "finish, stop it, or choose another run.name.") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}).encode())
        self._fd = fd
        return self

    def holder(self) -> str:
        try:
            info = json.loads(self.path.read_text())
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"]))
            return f"pid {info['pid']} on {info['host']}, started {started}"
        except (OSError, ValueError, KeyError, TypeError):
            return "holder unknown"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the file releases the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def diverged_tensor(state: dict[str, Any]) -> str | None:
    """The first floating tensor of a state dict that is NaN/Inf or exploded (|x| > 1.8e19), described; None when
    all are sane. One device sync for the whole state dict (its peaks are gathered first)."""
    named = [(name, value) for name, value in state.items()
             if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel() > 0]
    if not named:
        return None
    device = named[0][1].device
    peaks = torch.stack([value.detach().abs().max().float().to(device) for _, value in named]).cpu()  # a NaN anywhere makes its peak NaN
    bad = ~torch.isfinite(peaks) | (peaks > EXPLODED)
    if not bool(bad.any()):
        return None
    index = int(torch.nonzero(bad)[0])
    name, peak = named[index][0], float(peaks[index])
    return f"{name} holds NaN/Inf" if not math.isfinite(peak) else f"{name} reached {peak:.3g}"
