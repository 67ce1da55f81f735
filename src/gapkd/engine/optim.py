"""Optimisers and learning-rate schedules built from the config. Schedules are per step,
so warm-up and cosine are smooth and resume lands on the exact same learning rate."""
from __future__ import annotations

import math

import torch


def build_optimizer(param_groups: list[dict], cfg) -> torch.optim.Optimizer:
    groups = []
    for group in param_groups:
        params = [p for p in group["params"] if p.requires_grad]
        if params:
            extra = {k: v for k, v in group.items() if k not in ("params", "lr_mult")}
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


def build_scheduler(optimizer, cfg, epochs: int, steps_per_epoch: int, base_lr: float):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, epochs, steps_per_epoch, base_lr))
