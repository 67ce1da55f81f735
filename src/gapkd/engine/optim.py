"""Optimisers and learning-rate schedules built from the config. Schedules are per step,
so warm-up and cosine are smooth and resume lands on the exact same learning rate."""
from __future__ import annotations

import functools
import math

import torch

#: keys of a method's param group that the optimiser and schedule read, beyond torch's own
GROUP_KEYS = ("params", "lr_mult", "wd_mult", "warmup_epochs")


def build_optimizer(param_groups: list[dict], cfg) -> torch.optim.Optimizer:
    """One optimiser over a method's param groups: ``lr_mult`` / ``wd_mult`` scale the base learning
    rate / weight decay of a group (``warmup_epochs`` is read by :func:`build_scheduler`)."""
    groups = []
    for group in param_groups:
        params = [p for p in group["params"] if p.requires_grad]
        if params:
            extra = {k: v for k, v in group.items() if k not in GROUP_KEYS}
            if group.get("wd_mult", 1.0) != 1.0:
                extra["weight_decay"] = cfg.weight_decay * group["wd_mult"]
            groups.append({**extra, "params": params, "lr": cfg.lr * group.get("lr_mult", 1.0)})
    if not groups:
        raise ValueError("the method returned no trainable parameters")
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(step: int, cfg, epochs: int, steps_per_epoch: int, base_lr: float) -> float:
    """Multiplier of the base learning rate at a global step."""
    epoch = step / steps_per_epoch
    warmup = cfg.warmup_epochs
    if warmup > 0 and epoch < warmup:
        return (step + 1) / (warmup * steps_per_epoch)
    if cfg.name == "step":
        return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    if cfg.name == "cosine":
        span = max(epochs - warmup, 1e-9)
        t = min(max((epoch - warmup) / span, 0.0), 1.0)
        floor = cfg.min_lr / base_lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
    return 1.0


def build_scheduler(optimizer, cfg, epochs: int, steps_per_epoch: int, base_lr: float, param_groups: list[dict] | None = None):
    """The per-step schedule. A method's param group with ``warmup_epochs`` > 0 also ramps its own
    learning rate linearly over that many epochs (``param_groups``: the method's groups, in the order
    given to :func:`build_optimizer`, empty ones included)."""
    schedule = lambda step: lr_factor(step, cfg, epochs, steps_per_epoch, base_lr)  # noqa: E731
    warmups = [g.get("warmup_epochs", 0.0) for g in param_groups or [] if any(p.requires_grad for p in g["params"])]
    if not any(warmups):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    lambdas = [functools.partial(_warmed, schedule, warmup * steps_per_epoch) if warmup else schedule for warmup in warmups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


def _warmed(schedule, warmup_steps: float, step: int) -> float:
    return schedule(step) * min(1.0, (step + 1) / warmup_steps)
