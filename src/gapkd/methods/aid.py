"""AID teacher adaptation — our reading of the abstract of "A Good Teacher Adapts Their
Knowledge for Distillation" (Qian, Le, Harandi, ICCV 2025); the paper's own formulas are not
public. Before distillation, the teacher is fine-tuned so that its inner-class distribution
fits what the student's architecture produces (a reference student S_ref trained with CE),
while it stays accurate and keeps the original teacher T0's class-wise similarity:

    L_AID = ce_weight * CE(z_T, y) + beta * L_inner(T || S_ref) + gamma * L_class(T0 || T)

with L_inner and L_class from :mod:`gapkd.analysis.decomposition` at temperature tau.

The trainable module is the teacher being adapted: it is this Distiller's ``student``, so the
engine trains it, evaluates it and saves it as best.pt / last.pt. T0 is the frozen ``teacher``;
S_ref is frozen too and lives in ``reference``, left out of the checkpoints (it is reloaded
from ``reference_checkpoint`` whenever the method is built).
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..analysis.decomposition import class_similarity, inner_class
from ..errors import ConfigError
from .base import Distiller, StepOutput, TaskInfo, freeze, hparams, register_method


@hparams
class AIDAdaptHparams:
    temperature: Annotated[float, Field(gt=0)] = 4.0
    """tau of the softmax in both KL terms"""
    beta: Annotated[float, Field(ge=0)] = 1.0
    """adaptation strength: weight of L_inner(adapted teacher || reference student)"""
    gamma: Annotated[float, Field(ge=0)] = 1.0
    """weight of L_class(original teacher || adapted teacher): keeps T0's class-wise similarity"""
    ce_weight: Annotated[float, Field(ge=0)] = 1.0
    """weight of the cross-entropy that keeps the adapted teacher accurate"""
    temperature_scaling: bool = False
    """multiply both KL terms by tau^2 (Hinton's gradient scaling); off = the terms as written"""
    reference_checkpoint: Optional[str] = None
    """checkpoint of the reference student S_ref (of the student's architecture), e.g. a CE baseline"""
    reference_model: Optional[str] = None
    """S_ref's architecture; default: the name recorded in its gapkd checkpoint"""


@register_method("aid-adapt")
class AIDAdapt(Distiller):
    """AID teacher adaptation (our reading of the abstract): CE + beta*L_inner(T||S_ref) + gamma*L_class(T0||T)."""

    Hparams = AIDAdaptHparams
    teacher_needs = "logits"  # T0's logits only (the cache serves them with data.views > 0); S_ref still runs

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, *, task: TaskInfo | None = None,
                 reference: nn.Module | None = None, **hyper: Any):
        super().__init__(student, teacher, task=task, **hyper)
        if reference is None:
            reference = self._load_reference(task)
        self.reference = freeze(reference)

    def _load_reference(self, task: TaskInfo | None) -> nn.Module:
        from ..engine.checkpoint import safe_load
        from ..models import create_model, extract_state_dict, load_state_dict_strict

        h = self.hparams
        if not h.reference_checkpoint:
            raise ConfigError(
                "aid-adapt needs a reference student: set method.reference_checkpoint=PATH (a CE-trained model of the "
                "student's architecture, e.g. runs/<scratch run>/checkpoints/best.pt), or use the `gapkd aid` pipeline, "
                "which trains one."
            )
        if not Path(h.reference_checkpoint).is_file():
            raise ConfigError(f"method.reference_checkpoint={h.reference_checkpoint} does not exist; train the reference student first.")
        payload = safe_load(h.reference_checkpoint)
        ours = isinstance(payload, dict) and payload.get("format") == "gapkd-model"
        name = h.reference_model or (payload.get("model") if ours else None)
        if not name:
            raise ConfigError(f"{h.reference_checkpoint} does not record its architecture; set method.reference_model=NAME.")
        num_classes = task.num_classes if task is not None else self.student.num_classes
        in_channels = task.in_channels if task is not None else self.student.in_channels
        options = payload.get("options", {}) if ours else {}
        model = create_model(name, num_classes=num_classes, in_channels=in_channels, **options)
        load_state_dict_strict(model, extract_state_dict(payload), source=f"reference checkpoint {h.reference_checkpoint}")
        return model

    def forward(self, images, labels, step):
        h = self.hparams
        original_logits = self.teacher_logits(images, step)
        with torch.no_grad():
            reference_logits = self.reference(images)
        logits = self.student(images)
        scale = h.temperature**2 if h.temperature_scaling else 1.0
        return StepOutput(
            {
                "ce": h.ce_weight * F.cross_entropy(logits, labels),
                "inner": h.beta * scale * inner_class(logits, reference_logits, labels, h.temperature),
                "class": h.gamma * scale * class_similarity(original_logits, logits, labels, h.temperature),
            },
            logits,
        )

    def train(self, mode: bool = True) -> "AIDAdapt":
        super().train(mode)
        if hasattr(self, "reference"):
            self.reference.eval()
        return self

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapted teacher only: T0 and S_ref are frozen and rebuilt from their checkpoints."""
        return {k: v for k, v in super().trainable_state_dict().items() if not k.startswith("reference.")}
