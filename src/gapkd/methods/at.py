"""Zagoruyko & Komodakis, "Paying More Attention to Attention" (AT, ICLR 2017)."""
from __future__ import annotations

from typing import Annotated

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from ..core.errors import ConfigError
from .base import Distiller, StepOutput, hparams, register_method
from .losses import match_spatial


def attention_map(feature: Tensor, p: float) -> Tensor:
    """Spatial attention: channel mean of |feature|^p, flattened and L2-normalised per sample."""
    return F.normalize(feature.float().abs().pow(p).mean(dim=1).flatten(1), dim=1)


def attention_transfer_loss(student_feature: Tensor, teacher_feature: Tensor, p: float) -> Tensor:
    """Mean squared difference of the two normalised attention maps (larger map pooled to the smaller)."""
    student_feature, teacher_feature = match_spatial(student_feature, teacher_feature)
    return (attention_map(student_feature, p) - attention_map(teacher_feature, p)).pow(2).mean()


@hparams
class ATHparams:
    beta: Annotated[float, Field(ge=0)] = 1000.0
    """weight of the attention loss summed over stages (paper's CIFAR: 1000)"""
    p: Annotated[float, Field(gt=0)] = 2.0
    """power of the activations in the attention map"""
    ce_weight: Annotated[float, Field(ge=0)] = 1.0
    """weight of cross-entropy on the labels"""


@register_method("at", "attention-transfer")
class AT(Distiller):
    """Attention transfer: CE + beta * sum over stage outputs of ||a_S - a_T||^2 (normalised attention maps)."""

    Hparams = ATHparams

    def __init__(self, student, teacher=None, *, task=None, **hyper):
        super().__init__(student, teacher, task=task, **hyper)
        n_student, n_teacher = len(student.stage_channels), len(self.teacher.stage_channels)
        if n_student != n_teacher:
            raise ConfigError(
                f"AT pairs stage outputs one to one, but the student has {n_student} stages and the teacher {n_teacher}; "
                "choose a pair with as many stages, or a logit method (kd, dkd, dist)."
            )

    def forward(self, images, labels, step):
        teacher = self.teacher_forward(images)
        features = self.student.forward_features(images)
        h = self.hparams
        transfer = sum(attention_transfer_loss(s, t, h.p) for s, t in zip(features.stages, teacher.stages))
        return StepOutput({"ce": h.ce_weight * F.cross_entropy(features.logits, labels), "at": h.beta * transfer}, features.logits)
