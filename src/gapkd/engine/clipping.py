"""Gradient clipping per parameter group, and the per-group gradient statistics the loop logs.

Why per group: a method that trains an auxiliary network next to the student (DFPT-KD's prompt
path, a projector, an embedding) can have gradients many times larger than the student's. One
norm over every trained parameter (``train.grad_clip_mode=global``) then scales the *student's*
update by the auxiliary network's size: with DFPT-KD on a resnet20 -> resnet8 pair the prompt
path's gradient norm was 5-25x the student's in the first epoch, and ``train.grad_clip=1`` cut the
student's step to 0.18x on average (KD's: about 0.9x). ``per_group`` (the default) bounds each
group's norm on its own, so the student's update no longer depends on what else trains.
For a method that trains only the student the two modes are the same computation.

The loop logs each group's mean gradient norm (before clipping) and mean clip factor per epoch
(``grad_norm/<group>``, ``clip_factor/<group>`` in metrics.jsonl): a clip factor far below 1 on
the student group is the sign of the failure above.
"""
from __future__ import annotations

import torch
from torch import Tensor

#: the epsilon torch.nn.utils.clip_grad_norm_ adds to the norm
_EPS = 1e-6


def group_norms(groups: list[tuple[str, list[torch.nn.Parameter]]]) -> Tensor:
    """The L2 norm of each group's gradients (0 for a group with none), as one float32 tensor."""
    norms = []
    for _, params in groups:
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            per_tensor = torch._foreach_norm(grads)
            norms.append(torch.linalg.vector_norm(torch.stack([n.float() for n in per_tensor])))
        else:
            norms.append(torch.zeros((), device=params[0].device if params else "cpu"))
    return torch.stack([n.to(norms[0].device) for n in norms])


def clip_gradients(groups: list[tuple[str, list[torch.nn.Parameter]]], max_norm: float | None, mode: str) -> tuple[Tensor, Tensor]:
    """Clip in place; return (each group's norm before clipping, each group's clip factor in (0, 1]).

    ``mode``: ``per_group`` bounds each group's norm by ``max_norm`` on its own; ``global`` bounds the
    norm over all groups together (torch's ``clip_grad_norm_`` over every trained parameter, exactly
    as before per-group clipping existed). ``max_norm=None``: nothing is clipped, factors are 1."""
    if max_norm is None:
        norms = group_norms(groups)
        return norms, torch.ones_like(norms)
    if mode == "global":
        norms = group_norms(groups)
        total = torch.nn.utils.clip_grad_norm_([p for _, params in groups for p in params], max_norm)
        factor = torch.clamp(max_norm / (total.float() + _EPS), max=1.0)
        return norms, factor.expand_as(norms).to(norms.device)
    totals = [torch.nn.utils.clip_grad_norm_(params, max_norm).float() for _, params in groups]
    norms = torch.stack([t.to(totals[0].device) for t in totals])
    return norms, torch.clamp(max_norm / (norms + _EPS), max=1.0)
