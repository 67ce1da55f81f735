"""Run-directory logging: metrics.jsonl (always), train.log, the environment record, and a
progress bar on a terminal (plain lines otherwise)."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch


def tensorboard_writer_class():
    """torch's SummaryWriter, or one clear error when the optional tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        from ..core.errors import ConfigError

        raise ConfigError(
            'train.tensorboard=true needs the tensorboard package: pip install "gapkd[tensorboard]" '
            "(or set train.tensorboard=false; metrics.jsonl is written either way)."
        ) from None
    return SummaryWriter


class MetricsLog:
    """One JSON object per line; on resume, lines past the checkpoint's epoch are dropped.
    With ``tensorboard_dir``, every number of every record also goes to TensorBoard, at step = epoch
    (on resume, the events past the checkpoint's epoch are purged)."""

    def __init__(self, path: Path, keep_epochs: int, tensorboard_dir: Path | None = None):
        self.path = path
        self.writer = None
        if tensorboard_dir is not None:
            self.writer = tensorboard_writer_class()(str(tensorboard_dir), purge_step=keep_epochs + 1 if keep_epochs else None)
        lines = []
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by a crash
                if record.get("epoch", 0) <= keep_epochs:
                    lines.append(line)
        path.write_text("".join(line + "\n" for line in lines))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as out:
            out.write(json.dumps(record) + "\n")
        if self.writer is not None:
            step = record.get("epoch")
            for key, value in record.items():
                if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, global_step=step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class TextLog:
    """Plain lines to train.log and (unless quiet) stdout."""

    def __init__(self, path: Path, echo: bool = True):
        self.path = path
        self.echo = echo

    def __call__(self, message: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        with open(self.path, "a") as out:
            out.write(line + "\n")
        if self.echo:
            print(line, flush=True)


def progress_bar(total: int, description: str, enabled: bool):
    """A tqdm bar on a terminal; None elsewhere (logs stay plain lines)."""
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=description, leave=False, dynamic_ncols=True)


def environment(device: torch.device) -> dict:
    from ..core.version import __version__

    info = {
        "gapkd": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "commit": None,
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    try:
        here = Path(__file__).resolve().parent
        info["commit"] = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    info["hostname"] = os.uname().nodename if hasattr(os, "uname") else None
    return info
