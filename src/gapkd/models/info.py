"""Model facts for `gapkd list models -v`: parameters, stage channels, FLOPs at the intended input size."""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from .registry import MODELS, create_model


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_flops(model: torch.nn.Module, input_size: int, in_channels: int = 3) -> int:
    """Multiply-accumulates x 2 of one forward pass on a single image (torch's flop counter)."""
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.zeros(1, in_channels, input_size, input_size))
    return int(counter.get_total_flops())


def describe_model(name: str, num_classes: int = 100) -> str:
    entry = MODELS.get(name)
    model = create_model(name, num_classes=num_classes)
    flops = count_flops(model, entry.input_size)
    return (
        f"{name:<21} params {count_parameters(model) / 1e6:6.2f}M  stages {model.stage_channels}  "
        f"FLOPs {flops / 1e6:8.1f}M @ {entry.input_size}px  ({num_classes} classes)"
    )
