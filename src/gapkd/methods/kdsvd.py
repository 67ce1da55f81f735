"""Lee et al., "Self-supervised Knowledge Distillation Using Singular Value Decomposition" (KD-SVD, ECCV 2018).

Each stage's map is compressed by a truncated SVD: the first k right singular vectors of the teacher's
map (k + 3 of the student's, each student vector matched, sign included, to the teacher vector it is
most aligned with), all scaled by the teacher's normalised singular values. Consecutive stages are then
related by a Gaussian kernel exp(-(v_i - v_{i-1})^2 / 8) between every pair of their entries, and the
student matches the teacher's kernel values: loss = sum over stage pairs of the summed squared
difference, divided by the batch size (non-finite entries, from degenerate SVDs, are dropped). This is
the authors' TensorFlow code (github.com/sseung0703/SSKD_SVD) as RepDistiller and mdistiller port it;
defaults are mdistiller's CIFAR-100 ones (``CFG.KDSVD``: k 1, CE 1, weight 1), on every stage the two
models share.

Where the codes disagree: the paper and RepDistiller decompose the map as an (H*W) x C matrix, so the
singular vectors live in channel space and the student's and teacher's stages must have as many
channels (``layout: paper``, the default); mdistiller reshapes it to (C*H) x W, so they live along the
width and the stages must have equal widths instead (``layout: mdistiller``)."""
from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from ..core.errors import ConfigError
from .base import Distiller, StepOutput, hparams, probe_features, register_method
from .pairing import shared_stage_count


def _finite(x: Tensor) -> Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def svd_matrix(feature: Tensor, layout: str) -> Tensor:
    """The (B, rows, columns) matrix a stage's (B, C, H, W) map is decomposed as."""
    b, c, height, width = feature.shape
    if layout == "paper":
        return feature.float().reshape(b, c, height * width).transpose(1, 2)  # (B, HW, C)
    return feature.float().reshape(b, c * height, width)  # mdistiller: (B, CH, W)


def truncated_svd(feature: Tensor, n: int, layout: str) -> tuple[Tensor, Tensor]:
    """The first n singular values (L2-normalised per sample, (B, n)) and right singular vectors ((B, D, n))."""
    _, values, vh = torch.linalg.svd(svd_matrix(feature, layout), full_matrices=False)
    values, vectors = _finite(values), _finite(vh.transpose(1, 2))
    return F.normalize(values[:, :n], dim=1), F.normalize(vectors[:, :, :n], dim=1)


def align_to_teacher(student_vectors: Tensor, teacher_vectors: Tensor) -> Tensor:
    """For each teacher vector, the student vector with the largest |cosine|, times the cosine's sign: (B, D, k)."""
    cosine = student_vectors.transpose(1, 2) @ teacher_vectors  # (B, k_s, k)
    best = cosine.abs().max(dim=1, keepdim=True).values
    mask = torch.where(cosine.abs() == best, torch.sign(cosine), torch.zeros_like(cosine))
    return student_vectors @ mask


def kdsvd_loss(student_features: list[Tensor], teacher_features: list[Tensor], k: int, layout: str = "paper") -> Tensor:
    """Sum over consecutive stage pairs of the squared difference of the student's and the teacher's
    Gaussian kernels between the two stages' scaled singular vectors, divided by the batch size."""
    total, previous = student_features[0].new_zeros((), dtype=torch.float32), None
    for student_feature, teacher_feature in zip(student_features, teacher_features):
        teacher_values, teacher_vectors = truncated_svd(teacher_feature, k, layout)
        _, student_vectors = truncated_svd(student_feature, k + 3, layout)
        student_vectors = align_to_teacher(student_vectors, teacher_vectors)
        scale = teacher_values[:, None, :]
        current = (student_vectors * scale, teacher_vectors * scale)
        if previous is not None:
            kernels = [torch.exp(-(now[:, :, None, :] - before[:, None, :, :]).pow(2) / 8) for now, before in zip(current, previous)]
            squared = (kernels[0] - kernels[1].detach()).pow(2)
            total = total + _finite(squared).sum()
        previous = current
    return total / student_features[0].shape[0]


@hparams
class KDSVDHparams:
    beta: Annotated[float, Field(ge=0, description="weight of the SVD loss (mdistiller CIFAR-100: 1)")] = 1.0
    k: Annotated[int, Field(ge=1, description="teacher singular vectors kept per stage (the student keeps k + 3)")] = 1
    layout: Annotated[Literal["paper", "mdistiller"], Field(description="decompose (H*W) x C (paper, RepDistiller) or (C*H) x W (mdistiller)")] = "paper"
    ce_weight: Annotated[float, Field(ge=0, description="weight of cross-entropy on the labels")] = 1.0


@register_method("kdsvd", "kd-svd")
class KDSVD(Distiller):
    """KD-SVD: CE + beta * matching of Gaussian kernels between consecutive stages' teacher-aligned singular vectors."""

    Hparams = KDSVDHparams
    loss_terms = ("ce", "kdsvd")

    def __init__(self, student, teacher=None, *, task=None, **hyper):
        super().__init__(student, teacher, task=task, **hyper)
        student_stages, teacher_stages = probe_features(student, task).stages, probe_features(self.teacher, task).stages
        self.pairs = shared_stage_count(student_stages, teacher_stages, "KDSVD")
        if self.pairs < 2:
            raise ConfigError(f"KDSVD relates consecutive stages, but the pair shares {self.pairs} stage; choose models with at least 2 stages.")
        paper = self.hparams.layout == "paper"
        for i, (s, t) in enumerate(zip(student_stages[:self.pairs], teacher_stages[:self.pairs])):
            if s.dim() != 4 or t.dim() != 4:
                raise ConfigError(f"KDSVD decomposes (C, H, W) stage maps; stage {i} gives {tuple(s.shape[1:])} and {tuple(t.shape[1:])}.")
            mismatch = s.shape[1] != t.shape[1] if paper else s.shape[3] != t.shape[3]
            if mismatch:
                what = "channels" if paper else "widths"
                other = "method.layout=mdistiller (equal widths needed instead)" if paper else "method.layout=paper (equal channels needed instead)"
                raise ConfigError(
                    f"KDSVD with layout={self.hparams.layout} needs stages with equal {what}, but stage {i} of the student is "
                    f"{tuple(s.shape[1:])} and of the teacher {tuple(t.shape[1:])}; use {other}, or another method for this pair."
                )

    def forward(self, images, labels, step):
        teacher = self.teacher_forward(images)
        features = self.student.forward_features(images)
        h = self.hparams
        with torch.autocast(images.device.type, enabled=False):  # the SVD wants float32
            svd = kdsvd_loss(features.stages[:self.pairs], teacher.stages[:self.pairs], h.k, h.layout)
        return StepOutput({"ce": h.ce_weight * F.cross_entropy(features.logits, labels), "kdsvd": h.beta * svd}, features.logits)
