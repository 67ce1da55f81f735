"""Romero et al., "FitNets: Hints for Thin Deep Nets" (ICLR 2015), in the one-stage form of the
CIFAR benchmarks (RepDistiller / mdistiller): CE + beta * MSE(regressor(student hint), teacher hint)
trained together from the start, rather than the paper's separate hint pre-training stage."""
from __future__ import annotations

from typing import Annotated

import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..core.errors import ConfigError
from .base import Distiller, StepOutput, hparams, probe_features, register_method


def hint_regressor(student_shape, teacher_shape) -> nn.Sequential:
    """conv -> BN -> ReLU mapping the student's (C, H, W) hint onto the teacher's: a 1x1 conv when the sizes
    match, a stride-2 3x3 conv when the student's map is twice as large, a stride-2 transposed conv when half,
    and otherwise a valid conv whose kernel shrinks the larger map to the teacher's size."""
    (s_c, s_h, s_w), (t_c, t_h, t_w) = student_shape, teacher_shape
    if (s_h, s_w) == (2 * t_h, 2 * t_w):
        conv = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
    elif (2 * s_h, 2 * s_w) == (t_h, t_w):
        conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
    elif s_h >= t_h and s_w >= t_w:
        conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
    else:
        raise ConfigError(
            f"FitNet cannot regress a {s_h}x{s_w} student hint onto a {t_h}x{t_w} teacher hint; choose another method.hint_stage."
        )
    return nn.Sequential(conv, nn.BatchNorm2d(t_c), nn.ReLU(inplace=True))


@hparams
class FitNetHparams:
    beta: Annotated[float, Field(ge=0)] = 100.0
    """weight of the hint MSE (RepDistiller/mdistiller CIFAR: 100)"""
    hint_stage: Annotated[int, Field(ge=0)] = 1
    """0-based stage whose output is the hint (1 = mdistiller's HINT_LAYER 2)"""
    ce_weight: Annotated[float, Field(ge=0)] = 1.0
    """weight of cross-entropy on the labels"""


@register_method("fitnet", "fitnets", "hint")
class FitNet(Distiller):
    """FitNet hints: CE + beta * MSE(regressor(student stage), teacher stage), one stage as in mdistiller."""

    Hparams = FitNetHparams

    def __init__(self, student, teacher=None, *, task=None, **hyper):
        super().__init__(student, teacher, task=task, **hyper)
        stage = self.hparams.hint_stage
        student_stages, teacher_stages = probe_features(student, task).stages, probe_features(self.teacher, task).stages
        if stage >= min(len(student_stages), len(teacher_stages)):
            raise ConfigError(
                f"method.hint_stage={stage}, but the student has {len(student_stages)} stages and the teacher "
                f"{len(teacher_stages)}; use a 0-based index below {min(len(student_stages), len(teacher_stages))}."
            )
        self.regressor = hint_regressor(student_stages[stage].shape[1:], teacher_stages[stage].shape[1:])

    def forward(self, images, labels, step):
        teacher = self.teacher_forward(images)
        features = self.student.forward_features(images)
        h = self.hparams
        hint = self.regressor(features.stages[h.hint_stage])
        return StepOutput(
            {"ce": h.ce_weight * F.cross_entropy(features.logits, labels), "hint": h.beta * F.mse_loss(hint.float(), teacher.stages[h.hint_stage].float())},
            features.logits,
        )
