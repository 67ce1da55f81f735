"""Helpers for testing methods (see docs/add-a-method.md): run a method's forward on hand-made logits."""
from __future__ import annotations

import torch

from .models.base import Features


class FixedLogits(torch.nn.Module):
    """A stand-in model whose logits are a given tensor (a parameter), whatever the images.

    Lets a test compare a method's losses with a computation by hand on small hand-made logits:
    ``METHODS.get("kd")(FixedLogits(student_logits), FixedLogits(teacher_logits, trainable=False))``.
    ``forward_features`` returns no stages, so it suits logit methods only.
    """

    def __init__(self, logits, trainable: bool = True):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.as_tensor(logits, dtype=torch.float32).clone(), requires_grad=trainable)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits

    def forward_features(self, images: torch.Tensor) -> Features:
        return Features(stages=[], pooled=self.logits, logits=self.logits)
