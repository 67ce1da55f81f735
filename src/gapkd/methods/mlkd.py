"""Jin et al., "Multi-Level Logit Distillation" (MLKD, CVPR 2023).

Teacher and student see a weak view (the batch) and a strong view (``data.augment.strong``: its
own crop and flip, RandAugment and Cutout, built by the data pipeline). Predictions are aligned
at three levels, each summed over several temperatures (the base temperature and 3, 5, 2, 6):

- instance: tau^2 * KL(teacher || student), on both views;
- batch: the B x B Gram matrices of the softened predictions (p p^T), squared difference summed / B;
- class: the C x C matrices (p^T p), squared difference summed / C.

Prediction-confidence masking follows the official code, where the masks multiply batch-mean
losses: the weak-view instance and batch terms are scaled by the fraction of samples whose
teacher confidence (max probability, weak view) is at most the batch median, the class term by
the fraction of classes whose summed teacher probability is at most the class median. The batch
and class terms use the weak view only (the official code computes strong-view ones but does not
train on them). One departure: the official strong-view instance term takes the *weak* logits at
temperatures 2 and 6 (a copy slip); here the strong view uses its own logits at every temperature.
``logit_standardize`` z-scores the logits of the instance terms (Sun et al., CVPR 2024)."""
from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from ..errors import GapkdError
from .base import Distiller, StepOutput, hparams, register_method
from .losses import kd_kl, maybe_standardize


def batch_relation(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Sum of squared differences of the B x B prediction Gram matrices, divided by B."""
    p_s = F.softmax(student_logits.float() / temperature, dim=1)
    p_t = F.softmax(teacher_logits.float() / temperature, dim=1)
    return ((p_t @ p_t.t() - p_s @ p_s.t()) ** 2).sum() / p_s.shape[0]


def class_relation(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Sum of squared differences of the C x C class correlation matrices, divided by C."""
    p_s = F.softmax(student_logits.float() / temperature, dim=1)
    p_t = F.softmax(teacher_logits.float() / temperature, dim=1)
    return ((p_t.t() @ p_t - p_s.t() @ p_s) ** 2).sum() / p_s.shape[1]


def kept_fraction(values: Tensor) -> Tensor:
    """Fraction of ``values`` at or below their median (numpy's percentile 50, linear interpolation)."""
    return (values <= torch.quantile(values, 0.5)).float().mean()


@hparams
class MLKDHparams:
    temperature: Annotated[float, Field(gt=0)] = 4.0
    """base temperature (official: 4; 2 with logit standardisation)"""
    extra_temperatures: list[float] = (3.0, 5.0, 2.0, 6.0)
    """the other temperatures every level is summed over (official: 3, 5, 2, 6)"""
    ce_weight: Annotated[float, Field(ge=0)] = 0.1
    """weight of cross-entropy, applied to each view (official: 0.1)"""
    kd_weight: Annotated[float, Field(ge=0)] = 0.9
    """weight of every alignment term (official: 0.9; 9 with logit standardisation)"""
    logit_standardize: bool = False
    """z-score the logits of the instance terms (Sun et al., CVPR 2024)"""

@register_method("mlkd", "multi-level-kd")
class MLKD(Distiller):
    """Multi-level logit distillation: instance, batch and class alignment at several temperatures on a weak and a strong view."""

    Hparams = MLKDHparams
    # uses the teacher's logits only (of both views)
    #: the data pipeline must give each batch a strong view (data.augment.strong=true); checked when the config is built
    needs_strong_view = True

    def forward(self, images, labels, step):
        strong = step.strong_images
        if strong is None:
            raise GapkdError("mlkd trains on a weak and a strong view of each batch: set data.augment.strong=true.")
        h = self.hparams
        teacher_weak, teacher_strong = self.teacher_forward(torch.cat([images, strong])).logits.chunk(2)
        # two student passes, as in the official code: batch-norm statistics per view
        student_weak, student_strong = self.student(images), self.student(strong)
        temperatures = [h.temperature, *h.extra_temperatures]
        with torch.no_grad():
            p_t = F.softmax(teacher_weak.float(), dim=1)
            sample_share = kept_fraction(p_t.max(dim=1).values)
            class_share = kept_fraction(p_t.sum(dim=0))
        weak = maybe_standardize(student_weak, teacher_weak, h.logit_standardize)
        strong_pair = maybe_standardize(student_strong, teacher_strong, h.logit_standardize)
        instance = sum(sample_share * kd_kl(*weak, t) + kd_kl(*strong_pair, t) for t in temperatures)
        return StepOutput(
            {
                "ce": h.ce_weight * (F.cross_entropy(student_weak, labels) + F.cross_entropy(student_strong, labels)),
                "kd": h.kd_weight * instance,
                "cc": h.kd_weight * class_share * sum(class_relation(student_weak, teacher_weak, t) for t in temperatures),
                "bc": h.kd_weight * sample_share * sum(batch_relation(student_weak, teacher_weak, t) for t in temperatures),
            },
            student_weak,
        )
