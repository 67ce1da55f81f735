"""Peng et al., "Correlation Congruence for Knowledge Distillation" (CC, ICCV 2019).

Both models' pooled features are mapped by a trainable linear embedding (RepDistiller's
``LinearEmbed``: 128 dimensions, no normalisation) and the student matches the teacher's
correlation between instances. Two forms, ``kernel``:

- ``repdistiller`` (default): RepDistiller's ``Correlation`` loss, which its author reports receiving
  from the paper's authors: with delta = |e_S - e_T| per sample, the mean over consecutive samples of
  sum_d delta_i,d * delta_{i+1},d. This is what produced RepDistiller's CIFAR-100 CC results, with
  weight 0.02 (`--distill correlation -a 0 -b 0.02`) and CE 1, the defaults here.
- ``gaussian``: the paper's Eq. 8-10: each embedding L2-normalised, the B x B correlation
  k(x, y) = exp(-2 gamma) * sum_{p=0}^{P} (2 gamma)^p / p! * (x . y)^p (the P-order Taylor expansion of
  the Gaussian RBF kernel exp(-gamma ||x - y||^2) on unit vectors), and the mean squared difference
  of the student's and the teacher's matrices. gamma 0.4 and P 2 are the values the paper's public
  re-implementations use; no reference code gives a CIFAR-100 weight for this form, so set
  ``method.beta`` for it yourself.

The paper adds CC to Hinton KD; the RepDistiller benchmark, and this method, use CE + CC alone."""
from __future__ import annotations

import math
from typing import Annotated, Literal

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from .base import Distiller, StepOutput, hparams, probe_features, register_method
from .losses import in_float32


@in_float32
def repdistiller_correlation_loss(student_embedding: Tensor, teacher_embedding: Tensor) -> Tensor:
    """mean over i < B-1 of sum_d |e_S - e_T|_{i,d} * |e_S - e_T|_{i+1,d}."""
    delta = (student_embedding.float() - teacher_embedding.float()).abs()
    return (delta[:-1] * delta[1:]).sum(dim=1).mean()


def taylor_gaussian_correlation(embedding: Tensor, gamma: float, order: int) -> Tensor:
    """(B, B) P-order Taylor expansion of the Gaussian kernel between the L2-normalised rows."""
    x = F.normalize(embedding.float(), dim=1)
    cosine = x @ x.T
    return sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * cosine.pow(p) for p in range(order + 1))


@in_float32
def gaussian_correlation_loss(student_embedding: Tensor, teacher_embedding: Tensor, gamma: float, order: int) -> Tensor:
    """Mean squared difference of the two (B, B) Taylor-Gaussian correlation matrices."""
    return F.mse_loss(taylor_gaussian_correlation(student_embedding, gamma, order),
                      taylor_gaussian_correlation(teacher_embedding, gamma, order))


@hparams
class CCHparams:
    beta: Annotated[float, Field(ge=0, description="weight of the correlation loss (RepDistiller CIFAR-100: 0.02)")] = 0.02
    kernel: Annotated[Literal["repdistiller", "gaussian"], Field(description="RepDistiller's loss, or the paper's Taylor-expanded Gaussian kernel")] = "repdistiller"
    feature_dim: Annotated[int, Field(ge=1, description="dimension of the linear embeddings (RepDistiller: 128)")] = 128
    gamma: Annotated[float, Field(gt=0, description="kernel='gaussian': the RBF's gamma")] = 0.4
    order: Annotated[int, Field(ge=0, le=10, description="kernel='gaussian': the Taylor expansion's order P")] = 2
    ce_weight: Annotated[float, Field(ge=0, description="weight of cross-entropy on the labels")] = 1.0


@register_method("cc", "correlation-congruence")
class CC(Distiller):
    """Correlation congruence: CE + beta * correlation loss between linear embeddings of the pooled features."""

    Hparams = CCHparams
    loss_terms = ("ce", "cc")
    extra_modules = {"embed_student": "Linear(student pooled features -> feature_dim)",
                     "embed_teacher": "Linear(teacher pooled features -> feature_dim), trained as RepDistiller does"}

    def __init__(self, student, teacher=None, *, task=None, **hyper):
        super().__init__(student, teacher, task=task, **hyper)
        dim = self.hparams.feature_dim
        self.embed_student = nn.Linear(probe_features(student, task).pooled.flatten(1).shape[1], dim)
        self.embed_teacher = nn.Linear(probe_features(self.teacher, task).pooled.flatten(1).shape[1], dim)

    def forward(self, images, labels, step):
        teacher = self.teacher_forward(images)
        features = self.student.forward_features(images)
        h = self.hparams
        e_s = self.embed_student(features.pooled.flatten(1))
        e_t = self.embed_teacher(teacher.pooled.flatten(1))
        if h.kernel == "gaussian":
            cc = gaussian_correlation_loss(e_s, e_t, h.gamma, h.order)
        else:
            cc = repdistiller_correlation_loss(e_s, e_t)
        return StepOutput({"ce": h.ce_weight * F.cross_entropy(features.logits, labels), "cc": h.beta * cc}, features.logits)
