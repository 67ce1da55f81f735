"""Loss functions shared by several methods."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor


def kd_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Hinton's soft-target loss: tau^2 * mean over the batch of KL(softmax(t/tau) || softmax(s/tau))."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True) * temperature**2


def match_spatial(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Adaptive average pooling of whichever feature map is larger, so both have the smaller height and width."""
    height, width = min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1])
    if a.shape[-2:] != (height, width):
        a = F.adaptive_avg_pool2d(a, (height, width))
    if b.shape[-2:] != (height, width):
        b = F.adaptive_avg_pool2d(b, (height, width))
    return a, b


def in_float32(loss):
    """Decorator: run ``loss`` outside autocast on float32 copies of its tensor arguments. Batch-similarity
    losses (Gram matrices, pairwise distances, kernels) compare small differences of large sums, which
    bf16/fp16 matmuls, what autocast would run, round away."""
    @functools.wraps(loss)
    def wrapper(*args, **kwargs):
        device = next(a.device.type for a in args if isinstance(a, Tensor))
        with torch.autocast(device, enabled=False):
            return loss(*(a.float() if isinstance(a, Tensor) else a for a in args), **kwargs)

    return wrapper
def standardize_logits(logits: Tensor, eps: float = 1e-7) -> Tensor:
    """Sun et al.'s logit standardisation (CVPR 2024): the z-score of each row, (z - mean) / (eps + std),
    with the unbiased standard deviation and eps added to it as in the authors' code. A row of equal
    logits becomes all zeros (the uniform distribution at any temperature)."""
    logits = logits.float()
    return (logits - logits.mean(dim=1, keepdim=True)) / (eps + logits.std(dim=1, keepdim=True))


def maybe_standardize(student_logits: Tensor, teacher_logits: Tensor, standardize: bool) -> tuple[Tensor, Tensor]:
    """Both rows z-scored when ``standardize`` (the ``logit_standardize`` switch), else returned untouched."""
    if not standardize:
        return student_logits, teacher_logits
    return standardize_logits(student_logits), standardize_logits(teacher_logits)
