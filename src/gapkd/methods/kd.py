"""Hinton et al., "Distilling the Knowledge in a Neural Network" (2015)."""
from __future__ import annotations

from typing import Annotated

import torch.nn.functional as F
from pydantic import Field

from .base import Distiller, StepOutput, added_later, hparams, register_method
from .losses import kd_kl, maybe_standardize


@hparams
class KDHparams:
    temperature: Annotated[float, Field(gt=0)] = 4.0
    """tau of the softened teacher and student distributions"""
    ce_weight: Annotated[float, Field(ge=0)] = 0.1
    """weight of cross-entropy on the labels"""
    kd_weight: Annotated[float, Field(ge=0)] = 0.9
    """weight of tau^2 * KL(teacher || student)"""
    logit_standardize: Annotated[bool, added_later()] = False
    """z-score student and teacher logits before the softmax (Sun et al., CVPR 2024); the authors pair it with a base
    temperature of 2 and a KD weight of 9"""


@register_method("kd", "vanilla-kd", "hinton")
class KD(Distiller):
    """Vanilla KD: ce_weight * CE + kd_weight * tau^2 * KL(teacher || student) at temperature tau."""

    Hparams = KDHparams
    teacher_needs = "logits"

    def forward(self, images, labels, step):
        teacher_logits = self.teacher_logits(images, step)
        logits = self.student(images)
        h = self.hparams
        soft_student, soft_teacher = maybe_standardize(logits, teacher_logits, h.logit_standardize)
        return StepOutput(
            {"ce": h.ce_weight * F.cross_entropy(logits, labels), "kd": h.kd_weight * kd_kl(soft_student, soft_teacher, h.temperature)},
            logits,
        )
