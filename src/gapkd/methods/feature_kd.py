"""The Feature-KD of the CIFAR-10 ResNet capacity study (arXiv 2605.31191, v2): every stage output
of the student is projected onto the teacher's channels by a 1x1 convolution and matched by MSE and
by the cosine similarity of the globally pooled features. Teacher logits are not used."""
from __future__ import annotations

from typing import Annotated

import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..core.errors import ConfigError
from .base import Distiller, StepOutput, hparams, probe_features, register_method
from .losses import match_spatial


@hparams
class FeatureKDHparams:
    alpha: Annotated[float, Field(ge=0, le=1)] = 0.5
    """feature-loss share; CE gets 1 - alpha (study grid: 0.3, 0.5, 0.7)"""
    beta: Annotated[float, Field(ge=0)] = 0.5
    """weight of the cosine term inside the feature loss"""


@register_method("feature-kd")
class FeatureKD(Distiller):
    """Capacity-study Feature-KD: alpha * (mean stage MSE + beta * mean (1 - cos of pooled features)) + (1 - alpha) * CE."""

    Hparams = FeatureKDHparams

    def __init__(self, student, teacher=None, *, task=None, **hyper):
        super().__init__(student, teacher, task=task, **hyper)
        student_stages, teacher_stages = probe_features(student, task).stages, probe_features(self.teacher, task).stages
        if len(student_stages) != len(teacher_stages):
            raise ConfigError(
                f"feature-kd pairs stage outputs one to one, but the student has {len(student_stages)} stages and the "
                f"teacher {len(teacher_stages)}; choose a pair with as many stages."
            )
        self.projections = nn.ModuleList(
            nn.Conv2d(s.shape[1], t.shape[1], kernel_size=1, bias=False) for s, t in zip(student_stages, teacher_stages)
        )
        for projection in self.projections:
            nn.init.xavier_uniform_(projection.weight)

    def forward(self, images, labels, step):
        teacher = self.teacher_forward(images)
        features = self.student.forward_features(images)
        h = self.hparams
        mse, cosine = [], []
        for projection, student_map, teacher_map in zip(self.projections, features.stages, teacher.stages):
            projected, target = match_spatial(projection(student_map).float(), teacher_map.float())
            mse.append(F.mse_loss(projected, target))
            cosine.append(1 - F.cosine_similarity(projected.mean(dim=(2, 3)), target.mean(dim=(2, 3)), dim=1).mean())
        return StepOutput(
            {
                "ce": (1 - h.alpha) * F.cross_entropy(features.logits, labels),
                "feat_mse": h.alpha * sum(mse) / len(mse),
                "feat_cos": h.alpha * h.beta * sum(cosine) / len(cosine),
            },
            features.logits,
        )
