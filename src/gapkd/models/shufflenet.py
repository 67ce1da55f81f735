"""ShuffleNet V1 and V2 of the RepDistiller / mdistiller CIFAR zoo (``ShuffleV1``, ``ShuffleV2``)
and SimKD's wider ``ShuffleV2_1_5``. Module names match those zoos (``conv1``, ``bn1``,
``layer1.0.conv1`` ..., ``linear``; V2 adds ``conv2``/``bn2``) so their checkpoints load exactly.

Both use the zoo's CIFAR stem (1x1 conv to 24 channels, BN, ReLU; no stride, no max-pool).
Stages: ``layer1``..``layer3``; V2 adds its 1x1 ``conv2`` + ``bn2`` + ReLU (-> 1024 channels) as a
last stage of its own, so the head is pooling + ``linear`` everywhere. ShuffleV1 stage outputs
end in a ReLU; a ShuffleV2 stage ends with a channel shuffle of half activated, half passed-through
channels, as in the zoo. The zoo pools with a fixed 4x4 window (global on 32x32 inputs); we pool
globally. Initialisation is PyTorch's default, as in the zoo.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import StagedNet
from .registry import register_model


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """[N, g*c, H, W] -> interleave the g groups' channels."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleV1Block(nn.Module):
    """Grouped 1x1 -> shuffle -> depthwise 3x3 -> grouped 1x1; stride 2 concatenates an avg-pooled
    shortcut, stride 1 adds the identity."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int):
        super().__init__()
        self.stride = stride
        mid = out_planes // 4
        self.first_groups = 1 if in_planes == 24 else groups  # the stem's 24 channels are not grouped
        self.conv1 = nn.Conv2d(in_planes, mid, 1, groups=self.first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_planes, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential(nn.AvgPool2d(3, 2, 1)) if stride == 2 else nn.Sequential()

    def forward(self, x: Tensor) -> Tensor:
        out = channel_shuffle(F.relu(self.bn1(self.conv1(x))), self.first_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        residual = self.shortcut(x)
        return F.relu(torch.cat([out, residual], 1) if self.stride == 2 else out + residual)


class ShuffleNetV1(StagedNet):
    def __init__(self, out_planes=(240, 480, 960), num_blocks=(4, 8, 4), groups: int = 3, num_classes: int = 100, in_channels: int = 3):
        super().__init__(num_classes, in_channels, list(out_planes))
        self.conv1 = nn.Conv2d(in_channels, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        planes = 24
        for index, (out, blocks) in enumerate(zip(out_planes, num_blocks), start=1):
            # the first block concatenates its input, so its branch makes out - input channels
            layer = [ShuffleV1Block(planes, out - planes, 2, groups)] + [ShuffleV1Block(out, out, 1, groups) for _ in range(1, blocks)]
            setattr(self, f"layer{index}", nn.Sequential(*layer))
            planes = out
        self.linear = nn.Linear(out_planes[-1], num_classes)
        self.set_stages(self.layer1, self.layer2, self.layer3)

    def forward_stem(self, x: Tensor) -> Tensor:
        return F.relu(self.bn1(self.conv1(x)))

    @property
    def classifier(self) -> nn.Module:
        return self.linear


class ShuffleV2Block(nn.Module):
    """Split the channels in half; one half passes, the other goes 1x1 -> depthwise 3x3 -> 1x1;
    concatenate and shuffle."""

    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.conv1 = nn.Conv2d(half, half, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, 3, 1, 1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)

    def forward(self, x: Tensor) -> Tensor:
        half = x.shape[1] // 2
        passed, branch = x[:, :half], x[:, half:]
        out = F.relu(self.bn1(self.conv1(branch)))
        out = F.relu(self.bn3(self.conv3(self.bn2(self.conv2(out)))))
        return channel_shuffle(torch.cat([passed, out], 1), 2)


class ShuffleV2DownBlock(nn.Module):
    """Stride 2: a depthwise-then-1x1 path and a 1x1-depthwise-1x1 path, concatenated and shuffled."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 2, 1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: Tensor) -> Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], 1), 2)


# width -> (stage channels, last conv channels); blocks per stage (3, 7, 3) after a down block
SHUFFLE_V2_WIDTHS = {1.0: ((116, 232, 464), 1024), 1.5: ((176, 352, 704), 1024)}


class ShuffleNetV2(StagedNet):
    def __init__(self, net_size: float = 1.0, num_classes: int = 100, in_channels: int = 3):
        if net_size not in SHUFFLE_V2_WIDTHS:
            raise ValueError(f"ShuffleNetV2 net_size must be one of {sorted(SHUFFLE_V2_WIDTHS)}, got {net_size}")
        widths, last = SHUFFLE_V2_WIDTHS[net_size]
        super().__init__(num_classes, in_channels, [*widths, last])
        self.conv1 = nn.Conv2d(in_channels, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        channels = 24
        for index, (out, blocks) in enumerate(zip(widths, (3, 7, 3)), start=1):
            setattr(self, f"layer{index}", nn.Sequential(ShuffleV2DownBlock(channels, out), *[ShuffleV2Block(out) for _ in range(blocks)]))
            channels = out
        self.conv2 = nn.Conv2d(channels, last, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(last)
        self.linear = nn.Linear(last, num_classes)
        self.set_stages(self.layer1, self.layer2, self.layer3, [self.conv2, self.bn2, nn.ReLU()])

    def forward_stem(self, x: Tensor) -> Tensor:
        return F.relu(self.bn1(self.conv1(x)))

    @property
    def classifier(self) -> nn.Module:
        return self.linear


register_model("ShuffleV1", ShuffleNetV1, "shufflenetv1", input_size=32, family="cifar-shufflenet")
register_model("ShuffleV2", partial(ShuffleNetV2, 1.0), "shufflenetv2", input_size=32, family="cifar-shufflenet")
register_model("ShuffleV2_1_5", partial(ShuffleNetV2, 1.5), "shufflenetv2_x1_5", input_size=32, family="cifar-shufflenet")
