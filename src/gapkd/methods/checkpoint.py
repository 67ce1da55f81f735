"""The one way to get a model out of a checkpoint file.

It lives with the methods because a checkpoint may hold a method's deployable model rather than
the plain student (SimKD's: the student with its projector and the teacher's classifier), which
only that method knows how to rebuild."""
from __future__ import annotations

import os
from typing import Any, Callable

from torch import nn

from ..core.errors import CheckpointError, ConfigError
from ..core.io import safe_load
from ..core.rundir import is_model_payload
from ..core.runguard import diverged_tensor
from ..models import create_model, extract_state_dict, load_state_dict_strict
from ..teachers.catalogue import parse_reference
from ..teachers.manifest import checkpoint_path
from .base import METHODS


def model_from_checkpoint(checkpoint: str | os.PathLike, num_classes: int, in_channels: int = 3, *, name: str | None = None,
                          options: dict[str, Any] | None = None, role: str = "model", reset_head: bool = False,
                          dataset: str = "this dataset", name_hint: str | None = None,
                          factory: Callable[[str, dict[str, Any]], nn.Module] | None = None) -> tuple[nn.Module, str]:
    """The model a checkpoint holds, built for ``num_classes`` / ``in_channels``, and its architecture's name.

    Our checkpoints (a run's ``best.pt`` / ``last.pt``) record the architecture, its options and,
    for a method's deployable model, how to rebuild it; foreign state dicts (RepDistiller,
    mdistiller, torchvision, ...) need ``name``. Weights load exactly or not at all; with
    ``reset_head`` every weight but the classifier's loads and the classifier keeps its fresh
    initialisation. ``role`` (model, student, teacher, reference) and ``dataset`` only word errors;
    ``name_hint`` says how to name the architecture when the file does not record it.

    ``checkpoint`` may be a ``.safetensors`` file (read without pickle) or ``zoo:SET/NAME``, a teacher
    installed with ``gapkd teachers fetch|import``: its file is checked against its recorded sha256
    and its architecture comes from the catalogue. ``factory(name, options)`` builds the architecture
    (default: :func:`~gapkd.models.create_model` for ``num_classes`` / ``in_channels``; a Hugging
    Face model's is :func:`gapkd.teachers.hf.hf_model`)."""
    if str(checkpoint).startswith("zoo:"):  # a teacher installed in the store: the catalogue names its architecture
        name = name or parse_reference(str(checkpoint))[1].arch
    payload = safe_load(checkpoint_path(checkpoint))
    ours = is_model_payload(payload)
    name = name or (payload.get("model") if ours else None)
    if not name:
        flag = "--model" if role == "model" else f"--{role}-model"
        raise ConfigError(f"{checkpoint} does not record its architecture; {name_hint or f'pass {flag} NAME'}.")
    if options is None:
        options = payload.get("options", {}) if ours else {}
    if factory is None:
        model = create_model(name, num_classes=num_classes, in_channels=in_channels, **options)
    else:
        model = factory(name, options)
    source = f"{role} checkpoint {checkpoint}"
    if role == "teacher":
        fix = (f"a teacher must be trained for {dataset}: train one first, starting from this file (gapkd train -c <the "
               f"teacher's recipe> student.name={name} student.checkpoint={checkpoint} student.init_head=reset).")
    elif role == "student":
        fix = f"set {role}.init_head=reset to start from its other weights with a fresh {num_classes}-class classifier."
    else:  # a checkpoint evaluated or analysed as it is: a fresh classifier would score chance, and eval takes no init_head
        fix = ("evaluate it on the dataset it was trained for (data.name=...), or train a model for "
               f"{dataset} starting from it (gapkd train ... student.checkpoint=FILE student.init_head=reset).")
    if ours:
        model = _checked_deployable(model, payload, name, role, source, fix, num_classes, dataset, reset_head)
    load_state_dict_strict(model, extract_state_dict(payload), source=source, reset_head=reset_head, head_hint=fix[0].upper() + fix[1:])
    bad = diverged_tensor(model.state_dict())
    if bad is not None:  # else a distillation from it fails on NaN losses, blamed on the learning rate
        raise CheckpointError(f"{source}: {bad}; it was saved by a run that diverged. Use a checkpoint of a run that "
                              "trained (its best.pt), or train it again with a lower optim.lr or train.grad_clip.")
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
