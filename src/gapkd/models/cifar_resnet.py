"""CIFAR ResNets of the RepDistiller / mdistiller zoo (resnet8 ... resnet110, resnet8x4,
resnet32x4). Parameter names match that zoo so its checkpoints load exactly."""
from __future__ import annotations

from functools import partial

import torch.nn.functional as F
from torch import Tensor, nn

from .base import Features, StagedNet, init_conv_bn
from .registry import register_model


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward_preact(self, x: Tensor) -> Tensor:
        """The block's output before its final ReLU."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(out)) + identity

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.forward_preact(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward_preact(self, x: Tensor) -> Tensor:
        """The block's output before its final ReLU."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out)) + identity

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.forward_preact(x))


def make_resnet_layer(block, inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """One ResNet stage in torchvision's layout: the first block strides and, when the shape
    changes, projects the shortcut with ``downsample`` = (1x1 conv, BN)."""
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, planes * block.expansion, 1, stride, bias=False),
            nn.BatchNorm2d(planes * block.expansion),
        )
    layers = [block(inplanes, planes, stride, downsample)]
    layers += [block(planes * block.expansion, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class ResidualPreact:
    """Mixin for StagedNets whose stages are sequences of :class:`BasicBlock` / :class:`Bottleneck`:
    ``forward_features`` also fills ``preact`` (each stage's output before its last ReLU; ReviewKD's
    teacher targets, AB's and OFD's features), and :meth:`preact_bns` names the BN inside each of those
    sums (OFD's margins)."""

    def forward_features(self, x: Tensor) -> Features:
        x = self.forward_stem(x)
        stages, preact = [], []
        for stage in self.stages:
            for block in stage[:-1]:
                x = block(x)
            preact.append(stage[-1].forward_preact(x))
            x = F.relu(preact[-1])  # not in place: the pre-activation tensor is kept
            stages.append(x)
        pooled, logits = self.forward_head(x)
        return Features(stages=stages, pooled=pooled, logits=logits, preact=preact)

    def preact_bns(self) -> list[nn.BatchNorm2d]:
        """The last BN of each stage's last block: the residual branch of the pre-activation sum."""
        return [stage[-1].bn3 if isinstance(stage[-1], Bottleneck) else stage[-1].bn2 for stage in self.stages]


class CifarResNet(ResidualPreact, StagedNet):
    """conv3x3 -> BN -> ReLU stem, three stages (strides 1, 2, 2), global pool, fc."""

    def __init__(self, depth: int, widths: list[int], block: str = "basic", num_classes: int = 100, in_channels: int = 3):
        if block == "basic":
            if (depth - 2) % 6:
                raise ValueError("basic-block CIFAR ResNet depth must be 6n+2 (8, 14, 20, 32, ...)")
            n, block_cls = (depth - 2) // 6, BasicBlock
        else:
            if (depth - 2) % 9:
                raise ValueError("bottleneck CIFAR ResNet depth must be 9n+2")
            n, block_cls = (depth - 2) // 9, Bottleneck
        super().__init__(num_classes, in_channels, [w * block_cls.expansion for w in widths[1:]])
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = make_resnet_layer(block_cls, widths[0], widths[1], n, 1)
        self.layer2 = make_resnet_layer(block_cls, widths[1] * block_cls.expansion, widths[2], n, 2)
        self.layer3 = make_resnet_layer(block_cls, widths[2] * block_cls.expansion, widths[3], n, 2)
        self.fc = nn.Linear(widths[3] * block_cls.expansion, num_classes)
        init_conv_bn(self)

    def forward_stem(self, x: Tensor) -> Tensor:
        return self.relu(self.bn1(self.conv1(x)))

    @property
    def stages(self) -> list[nn.Module]:
        return [self.layer1, self.layer2, self.layer3]

    @property
    def classifier(self) -> nn.Module:
        return self.fc


_CIFAR_RESNETS = {
    "resnet8": (8, [16, 16, 32, 64]),
    "resnet14": (14, [16, 16, 32, 64]),
    "resnet20": (20, [16, 16, 32, 64]),
    "resnet32": (32, [16, 16, 32, 64]),
    "resnet44": (44, [16, 16, 32, 64]),
    "resnet56": (56, [16, 16, 32, 64]),
    "resnet110": (110, [16, 16, 32, 64]),
    "resnet8x4": (8, [32, 64, 128, 256]),
    "resnet32x4": (32, [32, 64, 128, 256]),
}

for _name, (_depth, _widths) in _CIFAR_RESNETS.items():
    register_model(_name, partial(CifarResNet, _depth, _widths), input_size=32, family="cifar-resnet")
