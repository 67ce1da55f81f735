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
