"""VGGs with batch norm of the RepDistiller / mdistiller CIFAR zoo (vgg8, vgg11, vgg13, vgg16,
vgg19; that zoo's ``vggN`` names mean its ``vggN_bn`` models, accepted here as aliases).

Module names match that zoo (``block0`` ... ``block4`` of conv-BN-ReLU with the last ReLU left
out, ``pool0`` ... ``pool3``, ``classifier``) so its checkpoints load exactly.

Stem: ``block0`` + ReLU. Stage i (0..3) is ``pool{i}`` -> ``block{i+1}`` -> ReLU, i.e. each stage
starts with the zoo's max-pool and ends in the activation; stage outputs equal the zoo's
features f1..f4. As in the zoo, ``pool3`` (before the last stage) only runs for 64x64 inputs
(Tiny-ImageNet), which is when that stage's input is 8x8; on 32x32 inputs the last two stages
share one 4x4 resolution. The head is global average pooling + ``classifier`` (512 -> classes).
``Features.preact`` holds each stage's output before its ReLU (the zoo's ``preact=True`` features).
"""
from __future__ import annotations

from functools import partial

import torch.nn.functional as F
from torch import Tensor, nn

from .base import Features, StagedNet, init_conv_bn
from .registry import register_model

# channels of the convs in block0 ... block4
CONFIGS = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def make_block(channels: list[int], in_channels: int) -> nn.Sequential:
    """conv3x3-BN-ReLU per entry, without the final ReLU (the stage applies it)."""
    layers: list[nn.Module] = []
    for width in channels:
        layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        in_channels = width
    return nn.Sequential(*layers[:-1])


class PoolAtSide(nn.Module):
    """Applies ``pool`` only to inputs of the given height (the zoo's 64x64-input rule)."""

    def __init__(self, pool: nn.Module, side: int):
        super().__init__()
        self.pool = pool
        self.side = side

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(x) if x.shape[-2] == self.side else x


class VGG(StagedNet):
    def __init__(self, config: list[list[int]], num_classes: int = 100, in_channels: int = 3):
        super().__init__(num_classes, in_channels, [c[-1] for c in config[1:]])
        self.block0 = make_block(config[0], in_channels)
        self.block1 = make_block(config[1], config[0][-1])
        self.block2 = make_block(config[2], config[1][-1])
        self.block3 = make_block(config[3], config[2][-1])
        self.block4 = make_block(config[4], config[3][-1])
        self.pool0 = nn.MaxPool2d(2, 2)
        self.pool1 = nn.MaxPool2d(2, 2)
        self.pool2 = nn.MaxPool2d(2, 2)
        self.pool3 = nn.MaxPool2d(2, 2)
        self.classifier = nn.Linear(config[4][-1], num_classes)
        self.set_stages(
            [self.pool0, self.block1, nn.ReLU()],
            [self.pool1, self.block2, nn.ReLU()],
            [self.pool2, self.block3, nn.ReLU()],
            [PoolAtSide(self.pool3, 8), self.block4, nn.ReLU()],
        )
        init_conv_bn(self, linear_std=0.01)

    def forward_stem(self, x: Tensor) -> Tensor:
        return F.relu(self.block0(x))

    def preact_bns(self) -> list[nn.BatchNorm2d]:
        """The last BN of each stage's block, whose output is the stage's pre-activation (OFD's margins)."""
        return [self.block1[-1], self.block2[-1], self.block3[-1], self.block4[-1]]

    def forward_features(self, x: Tensor) -> Features:
        """As StagedNet's, plus ``preact``: each stage's output before its ReLU."""
        x = self.forward_stem(x)
        stages, preact = [], []
        for stage in self.stages:
            preact.append(stage[:-1](x))  # pool + block; the stage's last module is its ReLU
            x = F.relu(preact[-1])
            stages.append(x)
        pooled, logits = self.forward_head(x)
        return Features(stages=stages, pooled=pooled, logits=logits, preact=preact)

    @property
    def classifier(self) -> nn.Module:
        return self._modules["classifier"]


for _name, _config in CONFIGS.items():
    register_model(_name, partial(VGG, _config), f"{_name}_bn", input_size=32, family="cifar-vgg")
