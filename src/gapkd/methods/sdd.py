"""Wei et al., "Scale Decoupled Distillation" (SDD, CVPR 2024).

The last stage's feature map is average-pooled at several scales (1x1, 2x2, 4x4 by default);
every cell goes through the model's own classifier, giving one logit vector per region: the
global one (scale 1) and local ones. Teacher and student are matched region by region with the
base loss (KD, or DKD: SD-KD / SD-DKD). A local region is *consistent* when the teacher's local
prediction is right exactly when its global prediction is (both right or both wrong) and
*complementary* otherwise; complementary terms weigh ``complementary_weight`` (2 in the paper),
the others 1. The loss is the weighted sum over regions and samples divided by their number,
as in the authors' code. The student's deployable model is unchanged (no extra modules)."""
from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor, nn

from .base import Distiller, StepOutput, hparams, register_method
from .nkd import non_target


def region_logits(feature_map: Tensor, global_logits: Tensor, classifier: nn.Module, scales: list[int]) -> Tensor:
    """(N, R, C) logits of every region, R = sum of scale^2: scale 1 is ``global_logits`` (the model's
    own head), each larger scale adds its cells in row-major order (the authors' order)."""
    regions = []
    for scale in scales:
        if scale == 1:
            regions.append(global_logits[:, None, :])
            continue
        cells = F.adaptive_avg_pool2d(feature_map, scale).flatten(2).transpose(1, 2)  # (N, scale^2, channels)
        regions.append(classifier(cells.reshape(-1, cells.shape[-1])).view(cells.shape[0], cells.shape[1], -1))
    return torch.cat(regions, dim=1)


def region_weights(teacher_regions: Tensor, labels: Tensor, complementary_weight: float) -> Tensor:
    """(N, R) weights: 1 for the global region and the consistent local ones, ``complementary_weight``
    where the teacher's local prediction is right and its global one wrong, or the reverse."""
    right = teacher_regions.argmax(dim=2) == labels[:, None]  # (N, R)
    complementary = right != right[:, :1]
    return torch.where(complementary, complementary_weight, 1.0).to(teacher_regions.dtype)


def kd_rows(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """tau^2 * KL(teacher || student) of every row (no reduction over rows)."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1) * temperature**2


def dkd_rows(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """(TCKD, NCKD) of every row, each tau^2 * KL(teacher || student), as in DKD."""
    student_logits, teacher_logits = student_logits.float() / temperature, teacher_logits.float() / temperature
    target = F.one_hot(labels, student_logits.shape[1]).bool()

    def binary(logits: Tensor) -> Tensor:
        log_p = F.log_softmax(logits, dim=1)
        return torch.stack([log_p.gather(1, labels[:, None]).squeeze(1), torch.logsumexp(log_p.masked_fill(target, float("-inf")), dim=1)], 1)

    def kl(log_q: Tensor, log_p: Tensor) -> Tensor:
        return (log_p.exp() * (log_p - log_q)).sum(dim=1)

    tckd = kl(binary(student_logits), binary(teacher_logits))
    nckd = kl(F.log_softmax(non_target(student_logits, labels), dim=1), F.log_softmax(non_target(teacher_logits, labels), dim=1))
    return tckd * temperature**2, nckd * temperature**2


@hparams
class SDDHparams:
    base: Literal["kd", "dkd"] = "kd"
    """the logit loss applied to every region: kd (SD-KD) or dkd (SD-DKD)"""
    scales: list[int] = (1, 2, 4)
    """pooling scales, starting with 1 (the global logits); official: [1, 2, 4], [1, 2] for resnet32x4 -> resnet8x4"""
    complementary_weight: Annotated[float, Field(ge=0)] = 2.0
    """weight of complementary regions (paper: 2)"""
    temperature: Annotated[float, Field(gt=0)] = 4.0
    """softmax temperature (official: 4)"""
    ce_weight: Annotated[float, Field(ge=0)] = 0.1
    """weight of cross-entropy on the labels (official SD-KD 0.1, SD-DKD 1)"""
    kd_weight: Annotated[float, Field(ge=0)] = 0.9
    """weight of the region loss (official SD-KD 0.9; SD-DKD 1)"""
    alpha: Annotated[float, Field(ge=0)] = 1.0
    """base dkd: weight of TCKD"""
    beta: Annotated[float, Field(ge=0)] = 8.0
    """base dkd: weight of NCKD (per pair as in DKD: 8, 2 for resnet56/110 pairs)"""
    warmup_epochs: Annotated[int, Field(ge=0)] = 0
    """region loss ramps as min(epoch / warmup, 1), epochs counted from 1 (official SD-DKD: 20; SD-KD: none)"""

    @field_validator("scales")
    @classmethod
    def _scales(cls, value):
        value = list(value)
        if not value or value[0] != 1 or any(b <= a for a, b in zip(value, value[1:])):
            raise ValueError(f"scales must start with 1 (the global logits) and increase, like [1, 2, 4]; got {value}")
        return value


@register_method("sdd", "scale-decoupled")
class SDD(Distiller):
    """Scale decoupled distillation: the base logit loss (kd or dkd) on multi-scale pooled region logits, complementary regions weighted up."""

    Hparams = SDDHparams

    def forward(self, images, labels, step):
        h = self.hparams
        with torch.no_grad():
            teacher = self.teacher_forward(images)
            teacher_regions = region_logits(teacher.stages[-1], teacher.logits, self.teacher.classifier, h.scales)
        student = self.student.forward_features(images)
        student_regions = region_logits(student.stages[-1], student.logits, self.student.classifier, h.scales)
        n, r, c = student_regions.shape
        weights = region_weights(teacher_regions, labels, h.complementary_weight).reshape(-1)
        flat_s, flat_t = student_regions.reshape(n * r, c), teacher_regions.reshape(n * r, c)
        if h.base == "kd":
            rows = kd_rows(flat_s, flat_t, h.temperature)
        else:
            tckd, nckd = dkd_rows(flat_s, flat_t, labels.repeat_interleave(r), h.temperature)
            rows = h.alpha * tckd + h.beta * nckd
        ramp = min((step.epoch + 1) / h.warmup_epochs, 1.0) if h.warmup_epochs else 1.0
        return StepOutput(
            {"ce": h.ce_weight * F.cross_entropy(student.logits, labels), "sdd": ramp * h.kd_weight * (weights * rows).sum() / (n * r)},
            student.logits,
        )
