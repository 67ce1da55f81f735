"""Crash-safe checkpoint files: write to a temporary file, fsync, rename, fsync the folder.
A reader therefore sees the previous complete file or the new complete file, never a torn one.
Loading is weights-only: no code in a checkpoint ever runs."""
from __future__ import annotations

import errno
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            torch.save(obj, out)
            out.flush()
            os.fsync(out.fileno())
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
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(handle, "w") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, path)


def safe_load(path: str | os.PathLike) -> Any:
    """torch.load with weights_only=True and a clear message for every way it can fail."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path} holds objects other than tensors and plain containers, so it was not loaded "
            f"(weights-only loading never runs code from a file): {str(error).splitlines()[0]}. "
            "Re-save it as a plain state dict: torch.save(model.state_dict(), path)."
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as error:
        raise CheckpointError(f"{path} is truncated or not a PyTorch checkpoint ({str(error).splitlines()[0]}).") from None
