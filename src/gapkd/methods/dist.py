"""Huang et al., "Knowledge Distillation from A Stronger Teacher" (DIST, NeurIPS 2022)."""
from __future__ import annotations

from typing import Annotated

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from .base import Distiller, StepOutput, hparams, register_method


def mean_pearson_distance(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """1 - the Pearson correlation of matching rows of ``a`` and ``b``, averaged over rows."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    correlation = (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)
    return 1 - correlation.mean()


@hparams
class DISTHparams:
    beta: Annotated[float, Field(ge=0)] = 2.0
    """weight of the inter-class relation (rows: one sample's class probabilities)"""
    gamma: Annotated[float, Field(ge=0)] = 2.0
    """weight of the intra-class relation (columns: one class across the batch)"""
    temperature: Annotated[float, Field(gt=0)] = 4.0
    """softmax temperature; both terms are scaled by its square"""
    ce_weight: Annotated[float, Field(ge=0)] = 1.0
    """weight of cross-entropy on the labels"""


@register_method("dist")
class DIST(Distiller):
    """DIST: CE + tau^2 * (beta * inter-class + gamma * intra-class) Pearson distance of softened predictions."""

    Hparams = DISTHparams
    teacher_needs = "logits"

    def forward(self, images, labels, step):
        teacher_logits = self.teacher_logits(images, step)
        logits = self.student(images)
        h = self.hparams
        p_s = F.softmax(logits.float() / h.temperature, dim=1)
        p_t = F.softmax(teacher_logits.float() / h.temperature, dim=1)
        scale = h.temperature**2
        return StepOutput(
            {
                "ce": h.ce_weight * F.cross_entropy(logits, labels),
                "inter": h.beta * scale * mean_pearson_distance(p_s, p_t),
                "intra": h.gamma * scale * mean_pearson_distance(p_s.t(), p_t.t()),
            },
            logits,
        )
