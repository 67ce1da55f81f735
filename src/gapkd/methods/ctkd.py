"""Li et al., "Curriculum Temperature for Knowledge Distillation" (CTKD, AAAI 2023).

The KD temperature is a learnable module trained *against* the student: its gradient passes
through a gradient reversal layer, so it moves to increase the KD loss while the student
decreases it. The reversal strength lambda follows the paper's cosine curriculum from 0 to
``lambda_max`` over ``lambda_epochs`` epochs (easy to hard). Global temperature module (one
learnable scalar), as in the official CIFAR scripts."""
from __future__ import annotations

import math
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from .base import Distiller, StepOutput, added_later, hparams, register_method
from .losses import kd_kl, maybe_standardize


class _ReverseGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by -strength."""

    @staticmethod
    def forward(ctx, x: Tensor, strength: float) -> Tensor:
        ctx.strength = strength
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        return -ctx.strength * grad, None


def reverse_gradient(x: Tensor, strength: float) -> Tensor:
    return _ReverseGradient.apply(x, strength)


class GlobalTemperature(nn.Module):
    """One learnable scalar: tau = min_temperature + temperature_range * sigmoid(logit), logit starting at 1."""

    def __init__(self, min_temperature: float, temperature_range: float):
        super().__init__()
        self.min_temperature = min_temperature
        self.temperature_range = temperature_range
        self.logit = nn.Parameter(torch.ones(()))

    def forward(self, reversal: float) -> Tensor:
        return self.min_temperature + self.temperature_range * torch.sigmoid(reverse_gradient(self.logit, reversal))


def cosine_curriculum(epoch: int, lambda_max: float, lambda_epochs: int) -> float:
    """lambda at a 1-based epoch: lambda_max * (1 - cos(pi * min(epoch, E) / E)) / 2, rising from 0 to lambda_max."""
    if lambda_epochs == 0:
        return lambda_max
    return lambda_max * 0.5 * (1 - math.cos(math.pi * min(epoch, lambda_epochs) / lambda_epochs))


@hparams
class CTKDHparams:
    ce_weight: Annotated[float, Field(ge=0)] = 0.1
    """weight of cross-entropy on the labels"""
    kd_weight: Annotated[float, Field(ge=0)] = 0.9
    """weight of tau^2 * KL(teacher || student) at the learned tau"""
    min_temperature: Annotated[float, Field(gt=0)] = 1.0
    """lowest temperature the module can reach"""
    temperature_range: Annotated[float, Field(gt=0)] = 20.0
    """tau lies in (min, min + range); official CIFAR: 1 + 20 sigmoid"""
    lambda_max: Annotated[float, Field(ge=0)] = 1.0
    """final strength of the gradient reversal"""
    lambda_epochs: Annotated[int, Field(ge=0)] = 10
    """epochs of the cosine curriculum from 0 to lambda_max"""
    logit_standardize: Annotated[bool, added_later()] = False
    """z-score student and teacher logits before the softmax (Sun et al., CVPR 2024); the authors pair it with a base
    temperature of 2 and a KD weight of 9"""


@register_method("ctkd", "curriculum-temperature")
class CTKD(Distiller):
    """Curriculum-temperature KD: a learned global temperature, adversarial through gradient reversal."""

    Hparams = CTKDHparams
    teacher_needs = "logits"

    def __init__(self, student, teacher=None, *, task=None, **hyper):
        super().__init__(student, teacher, task=task, **hyper)
        self.temperature = GlobalTemperature(self.hparams.min_temperature, self.hparams.temperature_range)

    def reversal_strength(self, epoch: int) -> float:
        """lambda for a 0-based epoch (the official loop counts epochs from 1)."""
        return cosine_curriculum(epoch + 1, self.hparams.lambda_max, self.hparams.lambda_epochs)

    def forward(self, images, labels, step):
        teacher_logits = self.teacher_logits(images, step)
        logits = self.student(images)
        h = self.hparams
        tau = self.temperature(self.reversal_strength(step.epoch))
        return StepOutput(
            {"ce": h.ce_weight * F.cross_entropy(logits, labels),
             "kd": h.kd_weight * kd_kl(*maybe_standardize(logits, teacher_logits, h.logit_standardize), tau)},
            logits,
        )
