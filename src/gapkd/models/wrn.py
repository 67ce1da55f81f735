"""Wide ResNets of the RepDistiller / mdistiller CIFAR zoo (wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2).

Pre-activation blocks (BN -> ReLU -> conv). Module names match that zoo (``conv1``,
``block1.layer.0.convShortcut``, ``bn1``, ``fc``) so its checkpoints load exactly.

Stages: ``block1``, ``block2`` and ``block3`` followed by the network's final BN + ReLU
(``bn1``, ``relu``), so the last stage ends in an activation and the head is pooling + ``fc``.
The first two stage outputs are block sums (a pre-activation network has no activation there),
which is also what the zoo's feature list holds. ``Features.preact`` holds what the zoo's
``preact=True`` features hold: each stage output through the BN that precedes the next ReLU
(``block2.layer.0.bn1``, ``block3.layer.0.bn1``, ``bn1``), computed once (the next block reuses it,
so a training step updates those BNs' running statistics once, not twice).
"""
from __future__ import annotations

from functools import partial

import torch.nn.functional as F
from torch import Tensor, nn

from .base import Features, StagedNet, init_conv_bn
from .registry import register_model


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes
        # a projection shortcut only where the width or resolution changes
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)

    def forward(self, x: Tensor, normed: Tensor | None = None) -> Tensor:
        """``normed``: ``bn1(x)`` when the caller already computed it (kept, so not activated in place)."""
        activated = self.relu1(self.bn1(x)) if normed is None else F.relu(normed)
        # with a projection the shortcut starts from the activated input, otherwise from x itself
        shortcut = x if self.equal_in_out else self.convShortcut(activated)
        out = self.relu2(self.bn2(self.conv1(activated)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return shortcut + self.conv2(out)


class NetworkBlock(nn.Module):
    def __init__(self, num_layers: int, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.layer = nn.Sequential(
            *[BasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate) for i in range(num_layers)]
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(StagedNet):
    """WRN-depth-width: conv3x3 stem, three stages of (depth-4)/6 blocks, BN-ReLU, pool, fc."""

    def __init__(self, depth: int, widen_factor: int, num_classes: int = 100, in_channels: int = 3, drop_rate: float = 0.0):
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4 (16, 22, 28, 40, ...), got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        super().__init__(num_classes, in_channels, widths[1:])
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(widths[3], num_classes)
        self.set_stages(self.block1, self.block2, [self.block3, self.bn1, self.relu])
        init_conv_bn(self)
        nn.init.zeros_(self.fc.bias)

    def forward_stem(self, x: Tensor) -> Tensor:
        return self.conv1(x)

    def preact_bns(self) -> list[nn.BatchNorm2d]:
        """The BN each stage output goes through before the next ReLU (OFD's margins)."""
        return [self.block2.layer[0].bn1, self.block3.layer[0].bn1, self.bn1]

    def forward_features(self, x: Tensor) -> Features:
        """As StagedNet's, plus ``preact`` (see the module docstring)."""
        x = self.forward_stem(x)
        stages, preact, normed = [], [], None
        for block, bn in zip((self.block1, self.block2, self.block3), self.preact_bns()):
            x = block.layer[0](x, normed)
            for layer in block.layer[1:]:
                x = layer(x)
            normed = bn(x)
            preact.append(normed)
            stages.append(x)
        stages[-1] = F.relu(normed)  # the last stage ends in the network's final BN + ReLU
        pooled, logits = self.forward_head(stages[-1])
        return Features(stages=stages, pooled=pooled, logits=logits, preact=preact)

    @property
    def classifier(self) -> nn.Module:
        return self.fc


for _depth, _width in [(16, 1), (16, 2), (40, 1), (40, 2)]:
    register_model(f"wrn_{_depth}_{_width}", partial(WideResNet, _depth, _width), f"wrn{_depth}_{_width}", input_size=32, family="cifar-wrn")
