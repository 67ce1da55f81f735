"""Crash-safe checkpoint files: write to a temporary file, fsync, rename, fsync the folder.
A reader therefore sees the previous complete file or the new complete file, never a torn one.
Loading is weights-only: no code in a checkpoint ever runs (``.safetensors`` files hold no pickle at all)."""
from __future__ import annotations

import errno
import functools
import io
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError
from .safetensors_io import is_safetensors, load_safetensors


@functools.cache
def _file_mode() -> int:
    """The mode open() gives a new file (0666 less the umask): mkstemp's temporaries are 0600, and the
    checkpoints and summaries renamed from them must be as readable as the run's other files."""
    try:
        umask = int(next(line.split()[1] for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError):
        umask = 0o022
    return 0o666 & ~umask


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save ``obj`` to ``path`` atomically. It is serialised in memory first and then written with a
    plain write: torch.save writing to a file turns the disk's own error (ENOSPC, EIO) into a bare
    'RuntimeError: unexpected pos', and the user must be told the disk is full."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            buffer = io.BytesIO()
            torch.save(obj, buffer)
            out.write(buffer.getbuffer())
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, _file_mode())  # mkstemp makes it 0600; run files are created 0644 (less the umask)
        os.replace(temporary, path)
    except BaseException as error:
        if os.path.exists(temporary):
            os.unlink(temporary)
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            kept = "the previous checkpoint is intact" if path.exists() else "no previous checkpoint existed"
            raise CheckpointError(
                f"no space left on the device while writing {path}; {kept}. Free some space and run the same "
                "command again to resume."
            ) from None
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Delete temporary files left by a writer that was killed mid-write; returns how many."""
    removed = 0
    for stale in Path(folder).glob(".*.tmp"):
        stale.unlink(missing_ok=True)
        removed += 1
    return removed


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically (temporary file, fsync, rename): a reader sees the old or the new text."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, _file_mode())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def check_file(path: Path, what: str, error: type[Exception], inside: Path, where: str) -> None:
    """One error for a missing ``what`` file, or a folder given in its place (then naming ``inside`` when it exists:
    the file or folder the user probably meant, introduced by ``where``)."""
    if path.is_dir():
        hint = f" ({where} {inside})" if inside.exists() else ""
        raise error(f"{what} {path} is a folder; give the path of a file{hint}.")
    if not path.is_file():
        raise error(f"{what} {path} does not exist.")


def safe_load(path: str | os.PathLike) -> Any:
    """torch.load with weights_only=True and a clear message for every way it can fail. A
    ``.safetensors`` file is read without pickle (:mod:`gapkd.core.safetensors_io`). (``zoo:SET/NAME``
    teacher references are resolved by :func:`gapkd.methods.checkpoint.model_from_checkpoint`.)"""
    if is_safetensors(path):
        return load_safetensors(path)
    path = Path(path)
    check_file(path, "checkpoint", CheckpointError, path / "checkpoints", "a run's are in")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): a write that never finished; use another checkpoint or train it again.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        detail = _unpickler_reason(error)
        if "GLOBAL" in detail:  # a pickled object or function: code that weights-only loading refuses to run
            raise CheckpointError(
                f"{path} holds objects other than tensors and plain containers ({detail}), so it was not loaded "
                "(weights-only loading never runs code from a file). Re-save it as a plain state dict: "
                "torch.save(model.state_dict(), path)."
            ) from None
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (corrupt, or another format: {detail}).") from None
    except Exception as error:  # every other way torch.load fails on a damaged file (EOFError, KeyError, RuntimeError, ...)
        first = (str(error).splitlines() or [""])[0]
        raise CheckpointError(f"{path} is truncated or not a PyTorch checkpoint ({type(error).__name__}: {first}).") from None


def _unpickler_reason(error: Exception) -> str:
    """The weights-only unpickler's own reason, without torch's advice (to load with weights_only=False,
    or to allow-list globals): gapkd never gives that advice."""
    advice = ("weights only load failed", "weights_only", "check the documentation", "please file an issue", "(1)", "(2)")
    kept = []
    for line in str(error).splitlines():
        line = line.replace("WeightsUnpickler error:", "").split(" Please use")[0].strip()
        if line and not any(marker in line.lower() for marker in advice):
            kept.append(line)
    return " ".join(kept)[:300] or "unreadable"
