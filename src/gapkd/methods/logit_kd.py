"""The Logit-KD of the CIFAR-10 ResNet capacity study (arXiv 2605.31191, v2)."""
from __future__ import annotations

from typing import Annotated

import torch.nn.functional as F
from pydantic import Field

from .base import Distiller, StepOutput, hparams, register_method
from .losses import kd_kl


@hparams
class LogitKDHparams:
    alpha: Annotated[float, Field(ge=0, le=1)] = 0.5
    """KD share; CE gets 1 - alpha (study grid: 0.3, 0.5, 0.7)"""
    temperature: Annotated[float, Field(gt=0)] = 4.0
    """softmax temperature (study grid: 2, 3, 4)"""


@register_method("logit-kd")
class LogitKD(Distiller):
    """Capacity-study Logit-KD: alpha * tau^2 * KL(teacher || student) + (1 - alpha) * CE."""

    Hparams = LogitKDHparams
    teacher_needs = "logits"

    def forward(self, images, labels, step):
        teacher_logits = self.teacher_logits(images, step)
        logits = self.student(images)
        h = self.hparams
        return StepOutput(
            {"ce": (1 - h.alpha) * F.cross_entropy(logits, labels), "kd": h.alpha * kd_kl(logits, teacher_logits, h.temperature)},
            logits,
        )
