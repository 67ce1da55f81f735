"""Weights as ``.safetensors`` files: plain tensors and a JSON header, no pickle at all.

A checkpoint dict with a ``state_dict`` entry (a run's model payload, whose format
:mod:`gapkd.core.rundir` owns) is written with those tensors as the file's tensors and every other
field, as JSON, under the header's ``gapkd`` metadata key; it reads back to the same dict, and
:func:`gapkd.core.io.safe_load` reads ``.safetensors`` files this way, so every command that accepts a
checkpoint accepts the ``.safetensors`` file too. A foreign ``.safetensors`` file (a bare state
dict, as Hugging Face and timm publish them) reads back as that state dict.

Needs the ``safetensors`` package (``pip install "gapkd[safetensors]"``; transformers brings it too)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import CheckpointError, GapkdError

SUFFIX = ".safetensors"
_META_KEY = "gapkd"


def is_safetensors(path: str | os.PathLike) -> bool:
    return str(path).endswith(SUFFIX)


def _package():
    try:
        import safetensors.torch
    except ImportError:
        raise GapkdError('reading or writing .safetensors files needs the safetensors package: pip install "gapkd[safetensors]"') from None
    return safetensors.torch


def save_safetensors(payload: dict[str, Any], path: str | os.PathLike) -> None:
    """Write a checkpoint dict with a ``state_dict`` entry (a model payload, :func:`gapkd.core.rundir.read_model_payload`)
    or a bare state dict to ``path``, atomically (a temporary file beside it, then a rename)."""
    st = _package()
    if isinstance(payload.get("state_dict"), dict):
        tensors = payload["state_dict"]
        meta = {k: v for k, v in payload.items() if k != "state_dict"}
        metadata = {_META_KEY: json.dumps(meta)}
    else:
        tensors, metadata = payload, None
    # safetensors stores each tensor once: copies break any storage two entries share
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        st.save_file(tensors, str(temporary), metadata=metadata)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def load_safetensors(path: str | os.PathLike) -> dict[str, Any]:
    """What :func:`save_safetensors` wrote: the checkpoint dict (a model payload), or the bare state
    dict of a foreign file."""
    st = _package()
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = st.load_file(str(path), device="cpu")
    except Exception as error:  # the package raises its own (Rust) error types for a damaged header or body
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path} is truncated or not a safetensors file ({first}).") from None
    if _META_KEY not in metadata:
        return tensors
    try:
        meta = json.loads(metadata[_META_KEY])
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: its '{_META_KEY}' metadata is not valid JSON; the file was damaged or not written by gapkd.") from None
    return {**meta, "state_dict": tensors}

