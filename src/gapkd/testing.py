"""Helpers for tests: run a method's forward on hand-made logits (see docs/add-a-method.md), and
write small image files for tests of data readers."""
from __future__ import annotations

from pathlib import Path

import numpy as np
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


def write_image(path: str | Path, seed: int, size: tuple[int, int] = (40, 30), mode: str = "RGB", **save_options) -> None:
    """Write a random ``size`` = (width, height) image in Pillow ``mode`` to ``path`` (format from its
    suffix; ``save_options`` such as ``quality=95`` go to ``Image.save``), creating its folder."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path, **save_options)

