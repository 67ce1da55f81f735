"""Huang & Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer" (NST, 2017).

Per paired stage, each channel's spatial map is flattened and L2-normalised (one "neuron's"
selectivity pattern, a sample of the distribution); the loss is the squared maximum mean discrepancy
between the student's and the teacher's channel sets under the polynomial kernel k(x, y) = (x . y)^2
(the paper's best kernel: d = 2, c = 0): mean k(T, T) + mean k(S, S) - 2 mean k(S, T), the means over
every pair of channels and the batch. A larger map is average-pooled to the smaller first. Defaults
are RepDistiller's and mdistiller's CIFAR-100 ones (`-b 50`; ``CFG.NST.LOSS``: CE 1, weight 50) on the
outputs of every stage the two models share, summed."""
from __future__ import annotations

from typing import Annotated

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from .base import Distiller, StepOutput, hparams, probe_features, register_method
from .losses import in_float32, match_spatial
from .pairing import shared_stage_count


def polynomial_kernel_mean(a: Tensor, b: Tensor) -> Tensor:
    """mean over the batch and every (i, j) of (a_i . b_j)^2, for (B, C_a, N) and (B, C_b, N)."""
    return (a @ b.transpose(1, 2)).pow(2).mean()


@in_float32
def nst_loss(student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
    """Squared MMD with the kernel (x . y)^2 between the normalised channel maps of one stage pair."""
    student_feature, teacher_feature = match_spatial(student_feature.float(), teacher_feature.float())
    s = F.normalize(student_feature.flatten(2), dim=2)
    t = F.normalize(teacher_feature.flatten(2), dim=2)
    return polynomial_kernel_mean(t, t).detach() + polynomial_kernel_mean(s, s) - 2 * polynomial_kernel_mean(s, t)


@hparams
class NSTHparams:
    beta: Annotated[float, Field(ge=0, description="weight of the MMD summed over stages (RepDistiller/mdistiller CIFAR-100: 50)")] = 50.0
    ce_weight: Annotated[float, Field(ge=0, description="weight of cross-entropy on the labels")] = 1.0


@register_method("nst")
class NST(Distiller):
    """Neuron selectivity transfer: CE + beta * sum over stages of the polynomial-kernel MMD between normalised channel maps."""

    Hparams = NSTHparams
    loss_terms = ("ce", "nst")

    def __init__(self, student, teacher=None, *, task=None, **hyper):
        super().__init__(student, teacher, task=task, **hyper)
        self.pairs = shared_stage_count(probe_features(student, task).stages, probe_features(self.teacher, task).stages, "NST")

    def forward(self, images, labels, step):
        teacher = self.teacher_forward(images)
        features = self.student.forward_features(images)
        h = self.hparams
        nst = sum(nst_loss(s, t) for s, t in zip(features.stages[:self.pairs], teacher.stages[:self.pairs]))
        return StepOutput({"ce": h.ce_weight * F.cross_entropy(features.logits, labels), "nst": h.beta * nst}, features.logits)
