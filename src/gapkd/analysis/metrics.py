"""Agreement and calibration of classifiers, in percent like every accuracy in gapkd."""
from __future__ import annotations

import torch
from torch import Tensor


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy (%)."""
    return 100.0 * float((logits.argmax(1) == labels).double().mean())


def top1_agreement(logits_a: Tensor, logits_b: Tensor) -> float:
    """How often (%) two models predict the same class."""
    return 100.0 * float((logits_a.argmax(1) == logits_b.argmax(1)).double().mean())


def expected_calibration_error(logits: Tensor, labels: Tensor, bins: int = 15) -> float:
    """ECE (%) with ``bins`` equal-width confidence bins (lo, hi] (Guo et al., 2017):
    sum over bins of (bin size / n) * |accuracy in the bin - mean confidence in the bin|."""
    probs = torch.softmax(logits.double(), dim=1)
    confidence, predicted = probs.max(1)
    correct = (predicted == labels).double()
    which = (torch.ceil(confidence * bins).long() - 1).clamp(0, bins - 1)
    gap = torch.zeros(bins, dtype=torch.float64, device=logits.device)
    gap.index_add_(0, which, correct - confidence)  # per bin: sum(correct) - sum(confidence)
    return 100.0 * float(gap.abs().sum() / labels.numel())
