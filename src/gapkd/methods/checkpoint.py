"""The one way to get a model out of a checkpoint file.

It lives with the methods because a checkpoint may hold a method's deployable model rather than
the plain student (SimKD's: the student with its projector and the teacher's classifier), which
only that method knows how to rebuild."""
from __future__ import annotations

import os
from typing import Any

from torch import nn

from ..core.errors import CheckpointError, ConfigError
from ..core.io import safe_load
from ..core.rundir import is_model_payload
from ..models import create_model, extract_state_dict, load_state_dict_strict
from .base import METHODS


def model_from_checkpoint(checkpoint: str | os.PathLike, num_classes: int, in_channels: int = 3, *, name: str | None = None,
                          options: dict[str, Any] | None = None, role: str = "model", reset_head: bool = False,
                          dataset: str = "this dataset", name_hint: str | None = None) -> tuple[nn.Module, str]:
    """The model a checkpoint holds, built for ``num_classes`` / ``in_channels``, and its architecture's name.

    Our checkpoints (a run's ``best.pt`` / ``last.pt``) record the architecture, its options and,
    for a method's deployable model, how to rebuild it; foreign state dicts (RepDistiller,
    mdistiller, torchvision, ...) need ``name``. Weights load exactly or not at all; with
    ``reset_head`` every weight but the classifier's loads and the classifier keeps its fresh
    initialisation. ``role`` (model, student, teacher, reference) and ``dataset`` only word errors;
    ``name_hint`` says how to name the architecture when the file does not record it."""
    payload = safe_load(checkpoint)
    ours = is_model_payload(payload)
    name = name or (payload.get("model") if ours else None)
    if not name:
        flag = "--model" if role == "model" else f"--{role}-model"
        raise ConfigError(f"{checkpoint} does not record its architecture; {name_hint or f'pass {flag} NAME'}.")
    if options is None:
        options = payload.get("options", {}) if ours else {}
    model = create_model(name, num_classes=num_classes, in_channels=in_channels, **options)
    source = f"{role} checkpoint {checkpoint}"
    if role == "teacher":
        fix = (f"a teacher must be trained for {dataset}: train one first, starting from this file (gapkd train -c <the "
               f"teacher's recipe> student.name={name} student.checkpoint={checkpoint} student.init_head=reset).")
    else:
        fix = f"set {role}.init_head=reset to start from its other weights with a fresh {num_classes}-class classifier."
    if ours:
        model = _checked_deployable(model, payload, name, role, source, fix, num_classes, dataset, reset_head)
    load_state_dict_strict(model, extract_state_dict(payload), source=source, reset_head=reset_head, head_hint=fix[0].upper() + fix[1:])
    return model, name


def _checked_deployable(model: nn.Module, payload: dict, name: str, role: str, source: str, fix: str, num_classes: int,
                        dataset: str, reset_head: bool) -> nn.Module:
    """Check our payload against the model asked for; rebuild a method's deployable around the model."""
    if payload.get("num_classes") not in (None, num_classes) and not reset_head:
        raise CheckpointError(f"{source} was trained for {payload['num_classes']} classes but {dataset} has {num_classes}; {fix}")
    if payload.get("model", name).lower() != name.lower():
        raise CheckpointError(f"{source} holds a {payload['model']!r}, but {role}.name is {name!r}; set {role}.name={payload['model']}.")
    if payload.get("deployable"):  # the student wrapped by its method (SimKD: projector + teacher classifier)
        spec = payload["deployable"]
        if reset_head:
            raise CheckpointError(
                f"{source} is a {spec['method']} deployable model (the student wrapped with its method's parts), "
                f"which {role}.init_head=reset cannot start from; use a plainly trained {name} checkpoint."
            )
        model = METHODS.get(spec["method"]).rebuild_deployable(model, spec["options"])
    return model
