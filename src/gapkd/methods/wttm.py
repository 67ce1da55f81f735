"""Zheng & Yang, "Knowledge Distillation Based on Transformed Teacher Matching" (WTTM, ICLR 2024).

Temperature scaling applied to the teacher alone is a power transform of its probabilities:
p_t^gamma / Z with Z = sum_k p_t,k^gamma (gamma = 1/T). TTM matches the student at temperature 1
to that transformed teacher; WTTM also weights each sample by Z, which is large where the teacher
is uncertain (Z ranges from 1 for a one-hot teacher to C^(1 - gamma) for a uniform one):

    L = ce_weight * CE + kd_weight * mean_i Z_i * KL(p_t,i^gamma / Z_i || p_s,i)"""
from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from .base import Distiller, StepOutput, hparams, register_method


def wttm_loss(student_logits: Tensor, teacher_logits: Tensor, gamma: float, weighted: bool = True) -> Tensor:
    """Batch mean of Z * KL(transformed teacher || student) (``weighted``), or of the KL alone (TTM).
    The power is taken in log space: gamma * log_softmax, so no probability underflows to 0^gamma."""
    log_p_s = F.log_softmax(student_logits.float(), dim=1)
    powered = gamma * F.log_softmax(teacher_logits.float(), dim=1)
    log_z = torch.logsumexp(powered, dim=1)
    log_q = powered - log_z[:, None]
    kl = (log_q.exp() * (log_q - log_p_s)).sum(dim=1)
    return (log_z.exp() * kl).mean() if weighted else kl.mean()


@hparams
class WTTMHparams:
    gamma: Annotated[float, Field(gt=0)] = 0.2
    """exponent of the teacher's power transform (1 / its temperature); the official README's WTTM example: 0.2"""
    kd_weight: Annotated[float, Field(ge=0)] = 4.0
    """weight of the weighted matching term (the official README's WTTM example, with CRD: 4)"""
    ce_weight: Annotated[float, Field(ge=0)] = 1.0
    """weight of cross-entropy on the labels (official -r, default 1)"""
    weighted: bool = True
    """weight each sample by its power sum Z (WTTM); false gives plain TTM"""

@register_method("wttm", "transformed-teacher-matching")
class WTTM(Distiller):
    """Weighted transformed teacher matching: CE + kd_weight * Z * KL(power-transformed teacher || student at T=1)."""

    Hparams = WTTMHparams
    teacher_needs = "logits"  # the teacher cache serves them with data.views > 0

    def forward(self, images, labels, step):
        teacher_logits = self.teacher_logits(images, step)
        logits = self.student(images)
        h = self.hparams
        return StepOutput(
            {"ce": h.ce_weight * F.cross_entropy(logits, labels),
             "wttm": h.kd_weight * wttm_loss(logits, teacher_logits, h.gamma, h.weighted)},
            logits,
        )
