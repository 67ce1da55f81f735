"""The StagedNet contract every zoo model follows: stem -> stages[0..N-1] -> head.

Models keep the parameter names of the widely used zoos (RepDistiller / mdistiller /
torchvision) so their checkpoints load exactly; the contract is therefore expressed as
methods and properties rather than fixed attribute names.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Features:
    """What ``forward_features`` returns. ``stages[i]`` is stage i's output after its final
    activation; ``preact`` (only filled where a model supports it) the same before it."""

    stages: list[Tensor]
    pooled: Tensor
    logits: Tensor
    preact: list[Tensor] = field(default_factory=list)


class StagedNet(nn.Module):
    """Base class: subclasses implement ``forward_stem``, ``stages`` and ``classifier``."""

    def __init__(self, num_classes: int, in_channels: int, stage_channels: list[int]):
        super().__init__()
        self.num_classes = int(num_classes)
        self.in_channels = int(in_channels)
        self.stage_channels = list(stage_channels)

    # --- to implement -------------------------------------------------------------
    def forward_stem(self, x: Tensor) -> Tensor:
        """Everything before stage 0 (may be the identity)."""
        raise NotImplementedError

    @property
    def stages(self) -> list[nn.Module]:
        """The stage modules in order (a plain list: they are registered under their own names)."""
        raise NotImplementedError

    @property
    def classifier(self) -> nn.Module:
        """The final linear layer, applied to the pooled features."""
        raise NotImplementedError

    # --- shared -------------------------------------------------------------------
    def forward_pool(self, x: Tensor) -> Tensor:
        """Global pooling of the last stage's output to a (N, C) vector."""
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward_head(self, x: Tensor) -> tuple[Tensor, Tensor]:
        pooled = self.forward_pool(x)
        return pooled, self.classifier(pooled)

    def forward_features(self, x: Tensor) -> Features:
        x = self.forward_stem(x)
        outputs = []
        for stage in self.stages:
            x = stage(x)
            outputs.append(x)
        pooled, logits = self.forward_head(x)
        return Features(stages=outputs, pooled=pooled, logits=logits)

    def forward(self, x: Tensor) -> Tensor:
        x = self.forward_stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.forward_head(x)[1]


def init_conv_bn(module: nn.Module) -> None:
    """The initialisation of the CIFAR zoos: Kaiming-normal convs, BN weight 1 and bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
