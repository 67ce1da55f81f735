"""Hinton et al., "Distilling the Knowledge in a Neural Network" (2015)."""
from __future__ import annotations

from typing import Annotated

import torch.nn.functional as F
from pydantic import Field

from .base import Distiller, StepOutput, hparams, register_method
from .losses import kd_kl


@hparams
class KDHparams:
    temperature: Annotated[float, Field(gt=0)] = 4.0
    ce_weight: Annotated[float, Field(ge=0)] = 0.1
    kd_weight: Annotated[float, Field(ge=0)] = 0.9


@register_method("kd", "vanilla-kd", "hinton")
class KD(Distiller):
    """Vanilla KD: ce_weight * CE + kd_weight * tau^2 * KL(teacher || student) at temperature tau."""

    Hparams = KDHparams
    teacher_needs = "logits"

    def forward(self, images, labels, step):
        teacher_logits = self.teacher_logits(images, step)
        logits = self.student(images)
        h = self.hparams
        return StepOutput(
            {"ce": h.ce_weight * F.cross_entropy(logits, labels), "kd": h.kd_weight * kd_kl(logits, teacher_logits, h.temperature)},
            logits,
        )
