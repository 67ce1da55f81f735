"""Chen et al., "Distilling Knowledge via Knowledge Review" (ReviewKD, CVPR 2021).

The student's levels — its last L stage outputs plus the pooled feature as a 1x1 map, as in
the original CIFAR code — are fused from deep to shallow by attention-based fusion (ABF)
modules; each fused level is matched to the teacher's level of the same depth by the
hierarchical context loss (HCL: MSE at full resolution plus MSE after average pooling to
4x4, 2x2 and 1x1, with halving weights). L is the smaller of the two stage counts.
Teacher levels are its pre-activation stage outputs (``Features.preact``) as in the
original code and mdistiller, and its pooled feature; the student's are post-activation.
The ABF modules are trained with the student and dropped at deployment."""
from __future__ import annotations

from typing import Annotated, Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..core.errors import ConfigError
from .base import Distiller, StepOutput, hparams, probe_features, register_method


@hparams
class ReviewKDHparams:
    ce_weight: Annotated[float, Field(ge=0)] = 1.0
    """weight of cross-entropy on the labels"""
    review_weight: Annotated[float, Field(ge=0)] = 1.0
    """weight of the hierarchical context loss (the original CIFAR scripts use 0.6 to 8 per pair)"""
    warmup_epochs: Annotated[float, Field(ge=0)] = 20.0
    """the review weight grows linearly to its value over this many epochs (mdistiller: epoch/20, epochs from 1)"""
    max_mid_channels: Annotated[int, Field(ge=1)] = 512
    """cap on the fusion width (the student's pooled channels otherwise)"""
    teacher_preact: bool = True
    """match the teacher's pre-activation stage outputs (the original); false: its post-activation ones"""


class AttentionFusion(nn.Module):
    """ABF: reduce a student level to the fusion width, blend it with the upsampled deeper
    fused level by two per-pixel attention weights, resize to the teacher's level, and map to
    the teacher's channels (conv3x3 + BN)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.output = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels))
        self.attention = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.reduce[0].weight, a=1)
        nn.init.kaiming_uniform_(self.output[0].weight, a=1)

    def forward(self, x: Tensor, deeper: Tensor | None, out_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """(output matched to the teacher, fused map passed on to the next shallower level)."""
        x = self.reduce(x)
        if self.attention is not None:
            deeper = F.interpolate(deeper, size=x.shape[-2:], mode="nearest")
            weights = self.attention(torch.cat([x, deeper], 1))
            x = x * weights[:, :1] + deeper * weights[:, 1:]
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, size=out_size, mode="nearest")
        return self.output(x), x


def hierarchical_context_loss(student_levels: list[Tensor], teacher_levels: list[Tensor]) -> Tensor:
    """HCL: per level, (MSE + sum_i w_i MSE after pooling to 4, 2, 1) / (1 + sum_i w_i) with
    w = 1/2, 1/4, 1/8 over the pooled sizes smaller than the map; summed over levels."""
    total = 0.0
    for fs, ft in zip(student_levels, teacher_levels):
        fs, ft = fs.float(), ft.float()
        loss, weight, weight_sum = F.mse_loss(fs, ft), 1.0, 1.0
        for size in (4, 2, 1):
            if size >= fs.shape[2]:
                continue
            weight /= 2
            loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(fs, size), F.adaptive_avg_pool2d(ft, size))
            weight_sum += weight
        total = total + loss / weight_sum
    return total


@register_method("reviewkd", "review-kd")
class ReviewKD(Distiller):
    """ReviewKD: attention-fused student levels (deep to shallow) matched to the teacher's by the hierarchical context loss."""

    Hparams = ReviewKDHparams

    def __init__(self, student, teacher=None, *, task=None, **hyper: Any):
        super().__init__(student, teacher, task=task, **hyper)
        student_probe, teacher_probe = probe_features(student, task), probe_features(self.teacher, task)
        if self.hparams.teacher_preact and not teacher_probe.preact:
            raise ConfigError(
                f"ReviewKD matches the teacher's pre-activation stage outputs, which {type(self.teacher).__name__} does not "
                "provide (Features.preact); set method.teacher_preact=false to match its post-activation outputs instead."
            )
        self.levels = min(len(student_probe.stages), len(teacher_probe.stages))
        in_channels = [f.shape[1] for f in self.student_levels(student_probe)]
        out_channels = [f.shape[1] for f in self.teacher_levels(teacher_probe)]
        mid = min(self.hparams.max_mid_channels, in_channels[-1])
        # one fusion per level, shallow to deep; the deepest (pooled) level has nothing deeper to fuse
        self.fusions = nn.ModuleList(
            AttentionFusion(i, mid, o, fuse=index < len(in_channels) - 1) for index, (i, o) in enumerate(zip(in_channels, out_channels))
        )

    def student_levels(self, features) -> list[Tensor]:
        return [*features.stages[-self.levels:], features.pooled[:, :, None, None]]

    def teacher_levels(self, features) -> list[Tensor]:
        maps = features.preact if self.hparams.teacher_preact else features.stages
        return [*maps[-self.levels:], features.pooled[:, :, None, None]]

    def review(self, student_levels: list[Tensor], teacher_sizes: list[tuple[int, int]]) -> list[Tensor]:
        """The fused student levels, shallow to deep, each at its teacher level's size and channels."""
        outputs, deeper = [], None
        for level in reversed(range(len(student_levels))):
            out, deeper = self.fusions[level](student_levels[level], deeper, teacher_sizes[level])
            outputs.insert(0, out)
        return outputs

    def forward(self, images, labels, step):
        teacher_levels = self.teacher_levels(self.teacher_forward(images))
        student = self.student.forward_features(images)
        fused = self.review(self.student_levels(student), [tuple(t.shape[-2:]) for t in teacher_levels])
        h = self.hparams
        ramp = min((step.epoch + 1) / h.warmup_epochs, 1.0) if h.warmup_epochs > 0 else 1.0
        losses = {
            "ce": h.ce_weight * F.cross_entropy(student.logits, labels),
            "reviewkd": h.review_weight * ramp * hierarchical_context_loss(fused, teacher_levels),
        }
        return StepOutput(losses, student.logits)
