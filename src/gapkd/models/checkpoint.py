"""Loading weights into zoo models: our own checkpoints and the common foreign layouts.
Never a silent partial load, never code from the file."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..engine.checkpoint import safe_load
from ..errors import CheckpointError

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net", "student")


def extract_state_dict(payload) -> dict[str, torch.Tensor]:
    """The tensor mapping inside a checkpoint: ours, bare, or inside the usual wrappers."""
    if isinstance(payload, dict) and payload.get("format") == "gapkd-model":
        payload = payload["state_dict"]
    for _ in range(3):
        if isinstance(payload, dict) and payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
            break
        inner = next((payload[k] for k in _WRAPPER_KEYS if isinstance(payload, dict) and isinstance(payload.get(k), dict)), None)
        if inner is None:
            break
        payload = inner
    if not isinstance(payload, dict) or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise CheckpointError("the checkpoint holds no state dict (a mapping of parameter names to tensors).")
    if payload and all(k.startswith("module.") for k in payload):
        payload = {k[len("module."):]: v for k, v in payload.items()}
    return payload


def load_state_dict_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load all of ``state`` into ``model`` or fail listing missing, unexpected and mismatched keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append(f"shape mismatches ({len(mismatched)}): " + "; ".join(mismatched[:6]))
        if missing:
            parts.append(f"missing keys ({len(missing)}): " + ", ".join(missing[:8]))
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): " + ", ".join(unexpected[:8]))
        raise CheckpointError(
            f"{source} does not fit {type(model).__name__}: " + " | ".join(parts)
            + ". Check the model name and num_classes (a class-count mismatch shows up in the classifier's shape)."
        )
    model.load_state_dict(state, strict=False)


def load_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load weights from ``path`` into ``model`` exactly (see module docstring); returns the model."""
    load_state_dict_strict(model, extract_state_dict(safe_load(path)), source=str(path))
    return model
