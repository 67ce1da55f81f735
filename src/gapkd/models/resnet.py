"""ResNet-18/34/50/101 with torchvision's module names (``conv1``, ``bn1``, ``layer1.0.downsample.0``,
``fc``), so torchvision (and SimKD / mdistiller ImageNet) state dicts load exactly.

Option ``stem``:
- ``'imagenet'`` (default for ``resnet18`` ... ``resnet101``): 7x7 stride-2 conv + BN + ReLU +
  3x3 stride-2 max-pool, for 224x224 inputs.
- ``'cifar'`` (default for ``resnet18_cifar`` ... ``resnet101_cifar``): 3x3 stride-1 conv + BN +
  ReLU, no max-pool, for 32x32 inputs. This is the CIFAR ResNet of the RepDistiller / mdistiller
  zoo (their ``ResNet18`` / ``ResNet50``): the same network; their state dicts, which name the
  shortcut ``shortcut`` and the classifier ``linear``, are renamed on load.

Why ``resnet50_cifar`` and not ``ResNet50``: model names are case-insensitive, and SimKD and
mdistiller's ImageNet recipes also call torchvision's ResNet-50 ``ResNet50``; the name therefore
goes to the torchvision-style model, and a CIFAR recipe names ``resnet50_cifar`` (or
``resnet50`` with ``stem: cifar``). Loading a CIFAR-stem checkpoint into an ImageNet-stem
model fails with a message that says so.

Stages: ``layer1`` ... ``layer4`` (outputs after each stage's final ReLU); stem as above; head:
global average pooling + ``fc``.
"""
from __future__ import annotations

from functools import partial

from torch import Tensor, nn

from ..core.errors import ConfigError
from .base import StagedNet, init_conv_bn
from .cifar_resnet import BasicBlock, Bottleneck, ResidualPreact, make_resnet_layer
from .registry import register_model

STEMS = ("imagenet", "cifar")


class ResNet(ResidualPreact, StagedNet):
    foreign_key_layouts = {
        "RepDistiller / mdistiller CIFAR ResNet (resnetv2.py)": [(r"\.shortcut\.", ".downsample."), (r"^linear\.", "fc.")],
    }

    def __init__(self, block, layers: list[int], num_classes: int = 1000, in_channels: int = 3, stem: str = "imagenet", zero_init_residual: bool = False):
        if stem not in STEMS:
            raise ConfigError(f"ResNet stem must be one of {STEMS}, got {stem!r}: 'imagenet' for 224px inputs, 'cifar' for 32px.")
        widths = [64, 128, 256, 512]
        super().__init__(num_classes, in_channels, [w * block.expansion for w in widths])
        self.stem = stem
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        else:
            self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        inplanes = 64
        for index, (width, blocks) in enumerate(zip(widths, layers), start=1):
            setattr(self, f"layer{index}", make_resnet_layer(block, inplanes, width, blocks, 1 if index == 1 else 2))
            inplanes = width * block.expansion
        self.fc = nn.Linear(inplanes, num_classes)
        self.set_stages(self.layer1, self.layer2, self.layer3, self.layer4)
        init_conv_bn(self)
        if zero_init_residual:  # each residual branch starts at zero (Goyal et al. 2017)
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.bn3.weight if isinstance(m, Bottleneck) else m.bn2.weight)

    def forward_stem(self, x: Tensor) -> Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    @property
    def classifier(self) -> nn.Module:
        return self.fc

    def checkpoint_hint(self, mismatched) -> str:
        if "conv1.weight" in mismatched:
            file_kernel = mismatched["conv1.weight"][0][-1]
            other = "cifar" if file_kernel == 3 else "imagenet"
            if other != self.stem:
                return f"The file's stem is a {file_kernel}x{file_kernel} conv: build the model with stem='{other}'."
        return ""


_DEPTHS = {"resnet18": (BasicBlock, [2, 2, 2, 2]), "resnet34": (BasicBlock, [3, 4, 6, 3]),
           "resnet50": (Bottleneck, [3, 4, 6, 3]), "resnet101": (Bottleneck, [3, 4, 23, 3])}

for _name, (_block, _layers) in _DEPTHS.items():
    register_model(_name, partial(ResNet, _block, _layers), input_size=224, family="resnet")
    register_model(f"{_name}_cifar", partial(ResNet, _block, _layers, stem="cifar"), input_size=32, family="cifar-resnet")
