"""Hugging Face image classifiers (``AutoModelForImageClassification``) as teachers and students:
``teacher.hf=PATH_OR_NAME`` (``student.hf`` likewise).

:class:`HFClassifier` is a :class:`~gapkd.models.StagedNet` around the transformers model:

- ``forward(x)`` is the model's logits for ``pixel_values=x``;
- ``forward_features(x)`` runs it once with ``output_hidden_states=True``: the stages are its hidden
  states (every stage of a CNN-like model such as ConvNeXt or ResNet, as (N, C, H, W) maps; four
  (``options.stages``) evenly spaced blocks of a ViT-like model, whose patch tokens are laid out as (N, D, g, g) maps on
  the g x g patch grid, the class and distillation tokens left out), ``pooled`` is the classifier's
  input and ``logits`` the logits;
- stage-by-stage running (``forward_stem``/``stages``, which DFPT-KD needs) is not available.

Needs ``pip install "gapkd[hf]"`` (transformers; it does not need torchvision). A folder written by
``save_pretrained`` loads offline; a hub name needs a network. Weights load from safetensors files
when the folder has them (transformers' default)."""
from __future__ import annotations

import math
import os
from functools import partial
from typing import Optional

import torch
from torch import Tensor, nn

from ..core.errors import ConfigError, GapkdError
from ..models.base import Features, StagedNet

#: how many blocks of a transformer (tokens) model are its stages
TOKEN_STAGES = 4


def _transformers():
    try:
        import transformers
    except ImportError:
        raise GapkdError('Hugging Face models (teacher.hf / student.hf) need transformers: pip install "gapkd[hf]"') from None
    return transformers


def _record_input(slot: list, module: nn.Module, args: tuple) -> None:
    slot[0] = args[0] if args else None


class HFClassifier(StagedNet):
    """A transformers image-classification model seen as a StagedNet (see the module docstring)."""

    def __init__(self, model: nn.Module, probe_size: int, source: str = "the model", token_stages: int = TOKEN_STAGES):
        config = model.config
        super().__init__(int(config.num_labels), int(getattr(config, "num_channels", 3)), [])
        self.model = model
        self.source = source
        head = getattr(model, "classifier", None)
        if not isinstance(head, nn.Module):
            raise ConfigError(f"{source}: {type(model).__name__} has no `classifier` module, so its pooled features and "
                              "classifier cannot be found; use an image-classification model (AutoModelForImageClassification).")
        self._head = [head]  # a plain list: already registered inside the model
        self._pooled: list[Optional[Tensor]] = [None]
        head.register_forward_pre_hook(partial(_record_input, self._pooled))  # a partial: deep copies stay consistent
        self._probe(probe_size, token_stages)

    def _probe(self, size: int, token_stages: int) -> None:
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                out = self.model(pixel_values=torch.zeros(1, self.in_channels, size, size), output_hidden_states=True)
        except Exception as error:  # transformers raises ValueError/RuntimeError for an input size its position embeddings do not fit
            expected = getattr(self.model.config, "image_size", None)
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ConfigError(f"{self.source} does not run on {size}x{size} images ({first}). It was configured for "
                              f"{expected}px images: set teacher.input.size={expected} (the batch is resized on the device), "
                              "or student data of that size.") from None
        finally:
            self.model.train(was_training)
        hidden = out.hidden_states
        if not hidden:
            raise ConfigError(f"{self.source} returns no hidden states, so it has no stages; only logit methods could use it.")
        if hidden[-1].dim() == 4:  # CNN-like: every stage's output
            self.stage_index = list(range(1, len(hidden)))
        else:  # tokens: evenly spaced blocks
            blocks = len(hidden) - 1
            if not 1 <= token_stages <= blocks:
                raise ConfigError(f"{self.source}: options.stages={token_stages}, but the model has {blocks} blocks; choose 1 to {blocks}.")
            self.stage_index = sorted({max(1, round(blocks * (k + 1) / token_stages)) for k in range(token_stages)})
        self.stage_channels = [int(self._as_map(hidden[i]).shape[1]) for i in self.stage_index]

    @staticmethod
    def _as_map(state: Tensor) -> Tensor:
        """(N, C, H, W) as it is; (N, L, D) tokens as (N, D, g, g) on the patch grid when L minus at most
        two extra tokens (class, distillation) is a square, else as they are."""
        if state.dim() != 3:
            return state
        length = state.shape[1]
        for extra in (0, 1, 2):
            side = math.isqrt(length - extra)
            if side * side == length - extra and side > 0:
                return state[:, extra:].transpose(1, 2).reshape(state.shape[0], state.shape[2], side, side)
        return state

    def forward(self, x: Tensor) -> Tensor:
        return self.model(pixel_values=x).logits

    def forward_features(self, x: Tensor) -> Features:
        self._pooled[0] = None
        out = self.model(pixel_values=x, output_hidden_states=True)
        pooled, self._pooled[0] = self._pooled[0], None  # the hook's batch is not kept
        stages = [self._as_map(out.hidden_states[i]) for i in self.stage_index]
        return Features(stages=stages, pooled=pooled, logits=out.logits)

    def _no_staged(self):
        raise ConfigError(f"{self.source}: a Hugging Face model cannot be run stage by stage (DFPT-KD needs that); use a "
                          "logit or feature method (docs/teachers.md says which).")

    def forward_stem(self, x: Tensor) -> Tensor:
        self._no_staged()

    @property
    def stages(self) -> list[nn.Module]:
        self._no_staged()

    def forward_head(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._no_staged()

    @property
    def classifier(self) -> nn.Module:
        return self._head[0]


def hf_model(name_or_path: str, num_classes: int, probe_size: int, *, reset_head: bool = False, role: str = "teacher",
             stages: int = TOKEN_STAGES) -> HFClassifier:
    """Load a transformers image classifier for ``num_classes`` classes (``reset_head``: a fresh
    classifier of that size, every other weight loaded) and wrap it. ``stages``: how many evenly
    spaced blocks of a transformer are its stages (``options.stages``; to pair with a student's)."""
    transformers = _transformers()
    local = os.path.isdir(name_or_path)
    source = f"{role}.hf={name_or_path}"
    kwargs = {"local_files_only": True} if local else {}
    if reset_head:
        kwargs.update(num_labels=num_classes, ignore_mismatched_sizes=True)
    try:
        model = transformers.AutoModelForImageClassification.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError, KeyError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        where = "the folder holds no image-classification model" if local else "no such folder, and the hub could not serve it"
        raise ConfigError(f"{source}: cannot load it ({where}: {first}). Pass a folder written by save_pretrained "
                          "(config.json and model.safetensors) or a hub name of an image-classification model.") from None
    labels = int(model.config.num_labels)
    if labels != num_classes:
        fix = (f"set {role}.init_head=reset to start from its other weights with a fresh {num_classes}-class classifier."
               if role == "student" else f"a teacher must be trained for these classes: train it first as the student of a CE run "
               f"(gapkd train student.hf={name_or_path} student.init_head=reset ...), then use that run's best.pt as the teacher.")
        raise ConfigError(f"{source} classifies {labels} classes but the data has {num_classes}; {fix}")
    return HFClassifier(model, probe_size, source, stages)
