"""Park et al., "Relational Knowledge Distillation" (RKD, CVPR 2019): distance and angle terms.

On the pooled features of a batch: the distance term is the Huber (smooth L1) loss between the
pairwise Euclidean distances of student and teacher, each divided by its mean over the non-zero
pairs; the angle term the Huber loss between the cosines of the angles e_ij . e_kj of every
triplet, e_ij the unit vector from sample j to sample i. Defaults are RepDistiller's and
mdistiller's CIFAR-100 ones (``CFG.RKD``: distance weight 25, angle weight 50, CE 1, feature weight 1;
distances not squared, clamped at 1e-12 before the square root), which are the paper's weights too.
Each term is logged on its own (``distance``, ``angle``); ``beta`` scales both."""
from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from .base import Distiller, StepOutput, hparams, register_method
from .losses import in_float32


def pairwise_distances(x: Tensor, squared: bool = False, eps: float = 1e-12) -> Tensor:
    """(B, B) Euclidean distances between the rows of x, clamped at eps (before the square root), zero diagonal."""
    square = x.pow(2).sum(dim=1)
    distances = (square[:, None] + square[None, :] - 2 * x @ x.T).clamp(min=eps)
    if not squared:
        distances = distances.sqrt()
    return distances * (1 - torch.eye(len(x), device=x.device, dtype=x.dtype))


@in_float32
def rkd_distance_loss(student_feature: Tensor, teacher_feature: Tensor, squared: bool = False, eps: float = 1e-12) -> Tensor:
    """smooth_l1(d_S / mean(d_S > 0), d_T / mean(d_T > 0)) over all (i, j)."""
    def normalised(feature):
        d = pairwise_distances(feature.float().flatten(1), squared, eps)
        return d / d[d > 0].mean()

    with torch.no_grad():
        target = normalised(teacher_feature)
    return F.smooth_l1_loss(normalised(student_feature), target)


def triplet_cosines(x: Tensor) -> Tensor:
    """cos of the angle at j between samples i and k, for all (j, i, k), flattened: <e_ij, e_kj>, e_ij = unit(x_i - x_j)."""
    differences = F.normalize(x[None, :, :] - x[:, None, :], p=2, dim=2)
    return torch.bmm(differences, differences.transpose(1, 2)).flatten()


@in_float32
def rkd_angle_loss(student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
    with torch.no_grad():
        target = triplet_cosines(teacher_feature.float().flatten(1))
    return F.smooth_l1_loss(triplet_cosines(student_feature.float().flatten(1)), target)


@hparams
class RKDHparams:
    distance_weight: Annotated[float, Field(ge=0, description="weight of the distance term (paper, RepDistiller, mdistiller: 25)")] = 25.0
    angle_weight: Annotated[float, Field(ge=0, description="weight of the angle term (paper, RepDistiller, mdistiller: 50)")] = 50.0
    beta: Annotated[float, Field(ge=0, description="overall weight of both terms (mdistiller's FEAT_WEIGHT, RepDistiller's -b: 1)")] = 1.0
    squared: Annotated[bool, Field(description="compare squared distances instead of distances")] = False
    eps: Annotated[float, Field(gt=0, description="lower clamp of the squared distances before the square root")] = 1e-12
    ce_weight: Annotated[float, Field(ge=0, description="weight of cross-entropy on the labels")] = 1.0


@register_method("rkd")
class RKD(Distiller):
    """Relational KD: CE + beta * (w_d * Huber of normalised pairwise distances + w_a * Huber of triplet angles), pooled features."""

    Hparams = RKDHparams
    loss_terms = ("ce", "distance", "angle")

    def forward(self, images, labels, step):
        teacher = self.teacher_forward(images)
        features = self.student.forward_features(images)
        h = self.hparams
        return StepOutput({
            "ce": h.ce_weight * F.cross_entropy(features.logits, labels),
            "distance": h.beta * h.distance_weight * rkd_distance_loss(features.pooled, teacher.pooled, h.squared, h.eps),
            "angle": h.beta * h.angle_weight * rkd_angle_loss(features.pooled, teacher.pooled),
        }, features.logits)
