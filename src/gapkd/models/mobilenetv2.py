"""MobileNetV2 in two layouts.

``MobileNetV2`` (alias ``mobile_half``): the CIFAR variant of the RepDistiller / mdistiller zoo,
width x0.5, expansion 6, a stride-2 stem and stride 1 in the 24-channel group; module names
as in that zoo (``conv1``, ``blocks.i.j.conv.k``, ``conv2``, ``classifier.0``). ``MobileNetV2_1_0``
is the same at width x1.0 (SimKD's name). The zoo pools with a fixed 2x2 window sized for 32x32
inputs; we pool globally, which is the same on 32x32 inputs and works on any size.
Stages (as the zoo's feature taps): blocks[0:2], blocks[2], blocks[3:5], blocks[5:7], then the
1x1 ``conv2`` (-> 1280 channels, BN, ReLU) as a last stage of its own, so the head is pooling +
the linear classifier. Inverted-residual outputs are linear (no activation), by design of the
architecture; the last stage ends in a ReLU.

``MobileNetV2_Imagenet`` (alias ``mobilenet_v2``): torchvision's ImageNet MobileNetV2 x1.0 with
torchvision's module names (``features.N``, ``classifier.1``) and ReLU6, so torchvision and
SimKD state dicts load exactly. Stem: ``features.0``; stages: features[1:4], [4:7], [7:14],
[14:18] (strides 4, 8, 16, 32, as SimKD taps them) and ``features.18`` (1x1 conv -> 1280).
The head applies torchvision's dropout (p=0.2 by default) before the linear layer.
"""
from __future__ import annotations

from functools import partial

from torch import Tensor, nn

from .base import StagedNet, init_conv_bn
from .registry import register_model

# (expansion, channels, blocks, stride) per group, before the width multiplier
_GROUPS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def conv_bn_act(inp: int, oup: int, kernel: int, stride: int, activation: type[nn.Module], groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(inp, oup, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(oup), activation(inplace=True)]


class InvertedResidual(nn.Module):
    """The CIFAR zoo's block: 1x1 expand (always, even for expansion 1), 3x3 depthwise, 1x1 linear
    projection; ``conv`` indices 0-7 as in that zoo."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            *conv_bn_act(inp, hidden, 1, 1, nn.ReLU),
            *conv_bn_act(hidden, hidden, 3, stride, nn.ReLU, groups=hidden),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2Cifar(StagedNet):
    def __init__(self, width_mult: float = 0.5, expand_ratio: int = 6, num_classes: int = 100, in_channels: int = 3):
        channels = int(32 * width_mult)
        super().__init__(num_classes, in_channels, [])
        self.conv1 = nn.Sequential(*conv_bn_act(in_channels, channels, 3, 2, nn.ReLU))
        self.blocks = nn.ModuleList()
        cifar_groups = [(t, c, n, 1 if c == 24 else s) for t, c, n, s in _GROUPS]  # no downsampling at 24 channels
        for t, c, n, s in cifar_groups:
            out = int(c * width_mult)
            layers = []
            for i in range(n):
                layers.append(InvertedResidual(channels, out, s if i == 0 else 1, expand_ratio if t != 1 else 1))
                channels = out
            self.blocks.append(nn.Sequential(*layers))
        last = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = nn.Sequential(*conv_bn_act(channels, last, 1, 1, nn.ReLU))
        self.classifier = nn.Sequential(nn.Linear(last, num_classes))
        b = self.blocks
        self.set_stages([b[0], b[1]], b[2], [b[3], b[4]], [b[5], b[6]], self.conv2)
        self.stage_channels = [int(c * width_mult) for c in (24, 32, 96, 320)] + [last]
        init_conv_bn(self, linear_std=0.01)

    def forward_stem(self, x: Tensor) -> Tensor:
        return self.conv1(x)

    @property
    def classifier(self) -> nn.Module:
        return self._modules["classifier"][0]


def round_channels(value: float, divisor: int = 8) -> int:
    """Channels rounded to the nearest multiple of ``divisor``, never more than 10% below ``value``
    (the rounding rule of the MobileNet papers' reference code)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class ConvBNReLU6(nn.Sequential):
    def __init__(self, inp: int, oup: int, kernel: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(*conv_bn_act(inp, oup, kernel, stride, nn.ReLU6, groups))


class InvertedResidualV2(nn.Module):
    """torchvision's block: the 1x1 expansion is left out for expansion 1; ``conv`` indices as there."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = [ConvBNReLU6(inp, hidden, 1)] if expand_ratio != 1 else []
        layers += [ConvBNReLU6(hidden, hidden, 3, stride, groups=hidden), nn.Conv2d(hidden, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2Imagenet(StagedNet):
    def __init__(self, width_mult: float = 1.0, dropout: float = 0.2, num_classes: int = 1000, in_channels: int = 3):
        super().__init__(num_classes, in_channels, [])
        channels = round_channels(32 * width_mult)
        last = round_channels(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [ConvBNReLU6(in_channels, channels, 3, 2)]
        for t, c, n, s in _GROUPS:
            out = round_channels(c * width_mult)
            for i in range(n):
                features.append(InvertedResidualV2(channels, out, s if i == 0 else 1, t))
                channels = out
        features.append(ConvBNReLU6(channels, last, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last, num_classes))
        f = self.features
        self.set_stages(f[1:4], f[4:7], f[7:14], f[14:18], f[18])
        self.stage_channels = [round_channels(c * width_mult) for c in (24, 32, 96, 320)] + [last]
        init_conv_bn(self, linear_std=0.01)

    def forward_stem(self, x: Tensor) -> Tensor:
        return self.features[0](x)

    def forward_head(self, x: Tensor) -> tuple[Tensor, Tensor]:
        pooled = self.forward_pool(x)
        return pooled, self._modules["classifier"](pooled)  # dropout, then the linear layer

    @property
    def classifier(self) -> nn.Module:
        return self._modules["classifier"][1]


register_model("MobileNetV2", partial(MobileNetV2Cifar, 0.5), "mobile_half", "mobilenetv2_x0_5", input_size=32, family="cifar-mobilenet")
register_model("MobileNetV2_1_0", partial(MobileNetV2Cifar, 1.0), "mobile_half_double", input_size=32, family="cifar-mobilenet")
register_model("MobileNetV2_Imagenet", MobileNetV2Imagenet, "mobilenet_v2", input_size=224, family="mobilenet")
