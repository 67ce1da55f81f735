"""Yang et al., "From Knowledge Distillation to Self-Knowledge Distillation: A Unified Approach with
Normalized Loss and Customized Soft Labels" (NKD, ICCV 2023).

KD's loss splits into a target-class term and a non-target term whose weight shrinks as the
teacher's target probability grows; NKD normalises the non-target term (the teacher's and the
student's distributions over the other classes, renormalised) so it keeps its weight:

    L = CE - t_y * log s_y - gamma * tau^2 * sum_{k != y} t~_k(tau) * log s~_k(tau)

t, s: teacher and student softmax at temperature 1; t~, s~: softmax of the non-target logits at
temperature tau. Both terms are batch means. A teacher that is wrong on the target class only
gives the target term a small weight t_y; the non-target term is unchanged."""
from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from .base import Distiller, StepOutput, hparams, register_method


def non_target(logits: Tensor, labels: Tensor) -> Tensor:
    """The c - 1 logits of each row other than its label's, in class order (gathered: fixed shapes)."""
    n, c = logits.shape
    others = torch.arange(c - 1, device=labels.device).expand(n, -1)
    return logits.gather(1, others + (others >= labels[:, None]))


def nkd_terms(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """(target term, non-target term before gamma): -mean t_y log s_y and
    -tau^2 * mean sum_{k != y} t~_k log s~_k (see the module docstring)."""
    student_logits, teacher_logits = student_logits.float(), teacher_logits.float()
    log_s = F.log_softmax(student_logits, dim=1).gather(1, labels[:, None]).squeeze(1)
    t_y = F.softmax(teacher_logits, dim=1).gather(1, labels[:, None]).squeeze(1)
    target = -(t_y * log_s).mean()
    log_s_other = F.log_softmax(non_target(student_logits, labels) / temperature, dim=1)
    t_other = F.softmax(non_target(teacher_logits, labels) / temperature, dim=1)
    return target, -(t_other * log_s_other).sum(dim=1).mean() * temperature**2


@hparams
class NKDHparams:
    temperature: Annotated[float, Field(gt=0)] = 3.0
    """temperature of the non-target term; official CIFAR-100 config: 3 (ImageNet: 1)"""
    gamma: Annotated[float, Field(ge=0)] = 3.5
    """weight of the normalised non-target term; official CIFAR-100 config: 3.5 (ImageNet: 1.5)"""
    ce_weight: Annotated[float, Field(ge=0)] = 1.0
    """weight of cross-entropy on the labels"""

@register_method("nkd", "normalized-kd")
class NKD(Distiller):
    """Normalized KD: CE + teacher-weighted target term + gamma * tau^2 * KD over the renormalised non-target classes."""

    Hparams = NKDHparams
    teacher_needs = "logits"  # the teacher cache serves them with data.views > 0

    def forward(self, images, labels, step):
        teacher_logits = self.teacher_logits(images, step)
        logits = self.student(images)
        h = self.hparams
        target, non_target_term = nkd_terms(logits, teacher_logits, labels, h.temperature)
        return StepOutput(
            {"ce": h.ce_weight * F.cross_entropy(logits, labels), "target": target, "non_target": h.gamma * non_target_term},
            logits,
        )
