"""Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer" (PKT, ECCV 2018).

Each model's pooled features are turned into a conditional distribution over the batch: the
cosine similarities K_ij = <f_i, f_j> / (|f_i| |f_j|), shifted to [0, 1] as (K + 1) / 2 and
normalised per row; the loss is the mean over the B x B entries of p_T log((p_T + eps) / (p_S + eps)).
This is the authors' code (github.com/passalis/probabilistic_kt), which RepDistiller and mdistiller
copy: their CIFAR-100 defaults are weight 30000 (`-b 30000`; ``CFG.PKT.LOSS.FEAT_WEIGHT``), CE 1,
eps 1e-7. The paper's kernel is also a cosine one; its KL is a sum over rows, the code's a mean
over all entries (a factor B that the weight 30000 absorbs) and we follow the code."""
from __future__ import annotations

from typing import Annotated

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from .base import Distiller, StepOutput, hparams, register_method
from .losses import in_float32


def batch_similarity_distribution(feature: Tensor, eps: float) -> Tensor:
    """Row-normalised (cosine + 1) / 2 similarities of the batch's flattened features, (B, B)."""
    x = feature.float().flatten(1)
    x = x / (x.norm(dim=1, keepdim=True) + eps)
    similarity = (x @ x.T + 1) / 2
    return similarity / similarity.sum(dim=1, keepdim=True)


@in_float32
def pkt_loss(student_feature: Tensor, teacher_feature: Tensor, eps: float = 1e-7) -> Tensor:
    """mean over (i, j) of p_T[i, j] * log((p_T[i, j] + eps) / (p_S[i, j] + eps))."""
    p_s = batch_similarity_distribution(student_feature, eps)
    p_t = batch_similarity_distribution(teacher_feature, eps)
    return (p_t * ((p_t + eps) / (p_s + eps)).log()).mean()


@hparams
class PKTHparams:
    beta: Annotated[float, Field(ge=0, description="weight of the PKT loss (RepDistiller/mdistiller CIFAR-100: 30000)")] = 30000.0
    eps: Annotated[float, Field(gt=0, description="added to norms and probabilities, as the authors' code")] = 1e-7
    ce_weight: Annotated[float, Field(ge=0, description="weight of cross-entropy on the labels")] = 1.0


@register_method("pkt")
class PKT(Distiller):
    """Probabilistic knowledge transfer: CE + beta * KL between the batch cosine-similarity distributions of the pooled features."""

    Hparams = PKTHparams
    loss_terms = ("ce", "pkt")

    def forward(self, images, labels, step):
        teacher = self.teacher_forward(images)
        features = self.student.forward_features(images)
        h = self.hparams
        pkt = pkt_loss(features.pooled, teacher.pooled, h.eps)
        return StepOutput({"ce": h.ce_weight * F.cross_entropy(features.logits, labels), "pkt": h.beta * pkt}, features.logits)
