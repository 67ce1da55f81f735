"""Loading weights into zoo models: our own checkpoints and the common foreign layouts
(RepDistiller / mdistiller / SimKD state dicts, bare or inside {'model': ...} / {'state_dict': ...},
with or without DDP's ``module.`` prefix; torchvision ResNet and MobileNetV2 state dicts).
With ``reset_head`` everything but the classifier loads, to start from weights trained on other classes.
Zoo models keep those codebases' parameter names, so most load as they are; where names differ
for the same network, the model declares the renaming (``StagedNet.foreign_key_layouts``).
Never a silent partial load, never code from the file."""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from ..core.errors import CheckpointError
from ..core.io import safe_load
from ..core.rundir import is_model_payload

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net", "student")


def extract_state_dict(payload) -> dict[str, torch.Tensor]:
    """The tensor mapping inside a checkpoint: ours, bare, or inside the usual wrappers."""
    if is_model_payload(payload):
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


def _fit_problems(model: nn.Module, state: dict[str, torch.Tensor], skip: frozenset[str] = frozenset()) -> tuple[list[str], list[str], dict]:
    own = {k: v for k, v in model.state_dict().items() if k not in skip}
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    mismatched = {k: (tuple(state[k].shape), tuple(own[k].shape)) for k in own if k in state and state[k].shape != own[k].shape}
    return missing, unexpected, mismatched


def rename_keys(state: dict[str, torch.Tensor], rules: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """``state`` with every regex rule (pattern, replacement) applied to each key, in order."""
    renamed = {}
    for key, value in state.items():
        for pattern, replacement in rules:
            key = re.sub(pattern, replacement, key)
        renamed[key] = value
    return renamed


def classifier_keys(model: nn.Module) -> frozenset[str]:
    """The state-dict keys of ``model.classifier`` (matched by tensor identity, so wrappers that
    rename their keys, such as :class:`~gapkd.models.WrappedModel`, are covered); empty if the
    model names no classifier."""
    try:
        head = model.classifier
    except (AttributeError, NotImplementedError):
        return frozenset()
    if not isinstance(head, nn.Module):
        return frozenset()
    ids = {id(t) for t in head.state_dict(keep_vars=True).values()}
    return frozenset(k for k, v in model.state_dict(keep_vars=True).items() if id(v) in ids)


def _head_only_mismatch(problems: tuple[list[str], list[str], dict], head: frozenset[str]) -> dict | None:
    """The mismatched classifier keys when they are the only problem (a different class count), else None."""
    missing, unexpected, mismatched = problems
    return mismatched if mismatched and not missing and not unexpected and set(mismatched) <= head else None


def load_state_dict_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint", *,
                           reset_head: bool = False, head_hint: str = "") -> None:
    """Load all of ``state`` into ``model`` or fail listing missing, unexpected and mismatched keys.

    When the keys do not fit as they are, the other codebases' names the model declares
    (``foreign_key_layouts``) are tried; one is used only if it fits exactly.

    ``reset_head``: every weight but the classifier's (``model.classifier``) loads as above; the
    classifier keeps its current (fresh) weights and the file's classifier, whatever its class
    count, is not used. ``head_hint``: a sentence added when only the classifier's shape differs."""
    head = classifier_keys(model)
    if reset_head and not head:
        raise CheckpointError(f"{type(model).__name__} names no classifier module, so its classifier cannot be reset; load {source} whole.")
    skip = head if reset_head else frozenset()
    candidates = [state] + [rename_keys(state, rules) for rules in getattr(model, "foreign_key_layouts", {}).values()]
    candidates = [{k: v for k, v in candidate.items() if k not in skip} for candidate in candidates]
    for candidate in candidates:
        if not any(_fit_problems(model, candidate, skip)):
            model.load_state_dict(candidate, strict=False)
            return
    missing, unexpected, mismatched = _fit_problems(model, candidates[0], skip)
    parts = []
    if mismatched:
        parts.append(f"shape mismatches ({len(mismatched)}): " + "; ".join(f"{k}: file {f} vs model {m}" for k, (f, m) in list(mismatched.items())[:6]))
    if missing:
        parts.append(f"missing keys ({len(missing)}): " + ", ".join(missing[:8]))
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): " + ", ".join(unexpected[:8]))
    hint = model.checkpoint_hint(mismatched) if hasattr(model, "checkpoint_hint") else ""
    prefixes = sorted({k.split(".", 1)[0] for k in unexpected if k.split(".", 1)[0] in ("student", "teacher")})
    if prefixes and len(unexpected) == len(state):
        hint += f" The file holds a whole distiller ({', '.join(prefixes)}): pass prefix='student.' (or 'teacher.') to load_checkpoint."
    head_mismatch = None if reset_head else next((m for c in candidates if (m := _head_only_mismatch(_fit_problems(model, c), head))), None)
    if head_mismatch:
        file_shape, model_shape = next(iter(head_mismatch.values()))
        hint += (f" Only the classifier differs: the file's is for {file_shape[0]} classes, the model's for {model_shape[0]} "
                 "(weights trained on another label set). " + head_hint)
    if reset_head:
        hint += " The classifier was left out (it is reset), so these problems are in the other weights."
    raise CheckpointError(
        f"{source} does not fit {type(model).__name__}: " + " | ".join(parts)
        + ". Check the model name and num_classes (a class-count mismatch shows up in the classifier's shape)."
        + (" " + hint.strip() if hint.strip() else "")
    )


def load_checkpoint(model: nn.Module, path: str | Path, prefix: str = "") -> nn.Module:
    """Load weights from ``path`` into ``model`` exactly (see module docstring); returns the model.

    ``prefix`` selects the keys under it (e.g. ``'student.'`` in a checkpoint of a whole
    distiller) and strips it."""
    state = extract_state_dict(safe_load(path))
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not state:
            raise CheckpointError(f"{path} holds no keys starting with {prefix!r}.")
    load_state_dict_strict(model, state, source=str(path))
    return model
