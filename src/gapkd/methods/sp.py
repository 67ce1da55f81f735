"""Tung & Mori, "Similarity-Preserving Knowledge Distillation" (SP, ICCV 2019).

The student matches the teacher's batch similarity: G = F F^T over the flattened activations F
(B, C*H*W) of one stage, each row L2-normalised; loss = ||G_T - G_S||_F^2 / B^2 (the paper's Eq. 4;
RepDistiller and mdistiller compute the same). Defaults are the CIFAR-100 ones of both codes
(`train_student.py --distill similarity -b 3000` in RepDistiller's scripts; mdistiller's
``CFG.SP.LOSS``: CE 1, feature weight 3000), on the output of the last stage (RepDistiller's
``feat[-2]``, mdistiller's ``feats[-1]``). The paper sums the loss over several stage pairs in its
CIFAR experiments; like both codes, we use one."""
from __future__ import annotations

from typing import Annotated

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from .base import Distiller, StepOutput, hparams, probe_features, register_method
from .losses import in_float32
from .pairing import resolve_stage


@in_float32
def similarity_preserving_loss(student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
    """||normalise_rows(F_T F_T^T) - normalise_rows(F_S F_S^T)||_F^2 / B^2 for (B, ...) activations."""
    batch = student_feature.shape[0]
    s = student_feature.float().flatten(1)
    t = teacher_feature.float().flatten(1)
    gram_s = F.normalize(s @ s.T, dim=1)
    gram_t = F.normalize(t @ t.T, dim=1)
    return (gram_t - gram_s).pow(2).sum() / batch**2


@hparams
class SPHparams:
    beta: Annotated[float, Field(ge=0, description="weight of the similarity loss (RepDistiller/mdistiller CIFAR-100: 3000)")] = 3000.0
    stage: Annotated[int | None, Field(ge=0, description="0-based stage whose output is compared; unset: the last stage both models have")] = None
    ce_weight: Annotated[float, Field(ge=0, description="weight of cross-entropy on the labels")] = 1.0


@register_method("sp", "similarity-preserving")
class SP(Distiller):
    """Similarity-preserving KD: CE + beta * ||G_T - G_S||^2 / B^2 of the row-normalised batch Gram matrices of one stage."""

    Hparams = SPHparams
    loss_terms = ("ce", "sp")

    def __init__(self, student, teacher=None, *, task=None, **hyper):
        super().__init__(student, teacher, task=task, **hyper)
        self.stage = resolve_stage(self.hparams.stage, probe_features(student, task).stages,
                                   probe_features(self.teacher, task).stages, "SP")

    def forward(self, images, labels, step):
        teacher = self.teacher_forward(images)
        features = self.student.forward_features(images)
        h = self.hparams
        sp = similarity_preserving_loss(features.stages[self.stage], teacher.stages[self.stage])
        return StepOutput({"ce": h.ce_weight * F.cross_entropy(features.logits, labels), "sp": h.beta * sp}, features.logits)
