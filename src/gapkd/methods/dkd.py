"""Zhao et al., "Decoupled Knowledge Distillation" (CVPR 2022)."""
from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from .base import Distiller, StepOutput, added_later, hparams, register_method
from .losses import maybe_standardize


def dkd_terms(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """(TCKD, NCKD), each tau^2 * batch-mean KL(teacher || student).

    TCKD compares the binary distributions (target class, all other classes); NCKD compares the
    distributions over the non-target classes alone, renormalised. Computed in log space."""
    n, c = student_logits.shape
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    target = F.one_hot(labels, c).bool()
    # the c-1 other classes of each row, in order: gathered (fixed shapes) rather than boolean-indexed,
    # so torch.compile keeps the step in one graph
    others = torch.arange(c - 1, device=labels.device).expand(n, -1)
    others = others + (others >= labels[:, None])

    def binary(log_p: Tensor) -> Tensor:
        return torch.stack([log_p.gather(1, labels[:, None]).squeeze(1), torch.logsumexp(log_p.masked_fill(target, float("-inf")), dim=1)], dim=1)

    tckd = F.kl_div(binary(log_p_s), binary(log_p_t), reduction="batchmean", log_target=True)
    others_s = (student_logits.float() / temperature).gather(1, others)
    others_t = (teacher_logits.float() / temperature).gather(1, others)
    nckd = F.kl_div(F.log_softmax(others_s, dim=1), F.log_softmax(others_t, dim=1), reduction="batchmean", log_target=True)
    return tckd * temperature**2, nckd * temperature**2


@hparams
class DKDHparams:
    alpha: Annotated[float, Field(ge=0)] = 1.0
    """weight of TCKD (target-class KD)"""
    beta: Annotated[float, Field(ge=0)] = 8.0
    """weight of NCKD (non-target KD); mdistiller: 8, or 2/6 for some pairs"""
    temperature: Annotated[float, Field(gt=0)] = 4.0
    """softmax temperature"""
    warmup_epochs: Annotated[int, Field(ge=0)] = 20
    """KD weight ramps as min(epoch / warmup, 1), epochs counted from 1"""
    ce_weight: Annotated[float, Field(ge=0)] = 1.0
    """weight of cross-entropy on the labels"""
    logit_standardize: Annotated[bool, added_later()] = False
    """z-score student and teacher logits before the softmax (Sun et al., CVPR 2024); the authors pair it with a base
    temperature of 2 and a KD weight of 9"""


@register_method("dkd", "decoupled-kd")
class DKD(Distiller):
    """Decoupled KD: ce_weight * CE + warm-up * (alpha * TCKD + beta * NCKD) at temperature tau."""

    Hparams = DKDHparams
    teacher_needs = "logits"

    def forward(self, images, labels, step):
        teacher_logits = self.teacher_logits(images, step)
        logits = self.student(images)
        h = self.hparams
        ramp = min((step.epoch + 1) / h.warmup_epochs, 1.0) if h.warmup_epochs else 1.0
        tckd, nckd = dkd_terms(*maybe_standardize(logits, teacher_logits, h.logit_standardize), labels, h.temperature)
        return StepOutput(
            {"ce": h.ce_weight * F.cross_entropy(logits, labels), "tckd": ramp * h.alpha * tckd, "nckd": ramp * h.beta * nckd},
            logits,
        )
