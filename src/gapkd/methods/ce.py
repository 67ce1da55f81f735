"""Cross-entropy on labels alone: teachers and from-scratch baselines."""
from __future__ import annotations

from typing import Annotated

import torch.nn.functional as F
from pydantic import Field

from .base import Distiller, StepOutput, hparams, register_method


@hparams
class CEHparams:
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.0
    """epsilon of label smoothing: the target is (1 - epsilon) on the label plus epsilon spread over all classes"""


@register_method("ce", "scratch", "baseline")
class CrossEntropy(Distiller):
    """Plain supervised training with cross-entropy (no teacher)."""

    Hparams = CEHparams
    needs_teacher = False
    teacher_needs = "none"

    def forward(self, images, labels, step):
        logits = self.student(images)
        return StepOutput({"ce": F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing)}, logits)
