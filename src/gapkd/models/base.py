"""The StagedNet contract every zoo model follows: stem -> stages[0..N-1] -> head.

Models keep the parameter names of the widely used zoos (RepDistiller / mdistiller /
torchvision) so their checkpoints load exactly; the contract is therefore expressed as
methods and properties rather than fixed attribute names.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

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
    """Base class: subclasses implement ``forward_stem``, ``stages`` (or call ``set_stages``) and
    ``classifier``. The head is always global average pooling followed by ``classifier``."""

    #: Parameter-name layouts of other codebases for the same architecture, tried by
    #: ``load_state_dict_strict`` when a state dict does not fit as it is:
    #: {source: [(regex on a key, replacement), ...]}.
    foreign_key_layouts: ClassVar[dict[str, list[tuple[str, str]]]] = {}

    def __init__(self, num_classes: int, in_channels: int, stage_channels: list[int]):
        super().__init__()
        self.num_classes = int(num_classes)
        self.in_channels = int(in_channels)
        self.stage_channels = list(stage_channels)

    def set_stages(self, *stages: nn.Module | list[nn.Module]) -> None:
        """Declare the stages in order. A stage given as a list of modules the model already owns
        runs them in sequence; it is kept out of the module registry, so parameter names stay
        those of the original zoo (and state dicts hold no duplicates)."""
        chains = [nn.Sequential(*stage) if isinstance(stage, (list, tuple)) else stage for stage in stages]
        self.__dict__["_stage_list"] = chains

    def checkpoint_hint(self, mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]) -> str:
        """An extra sentence for a failed load, given {key: (file shape, model shape)}; '' if none."""
        return ""

    def train(self, mode: bool = True) -> "StagedNet":
        super().train(mode)
        for stage in self.__dict__.get("_stage_list", []):
            stage.training = mode  # the unregistered chains' own flag (their parts are ours)
        return self

    # --- to implement -------------------------------------------------------------
    def forward_stem(self, x: Tensor) -> Tensor:
        """Everything before stage 0 (may be the identity)."""
        raise NotImplementedError

    @property
    def stages(self) -> list[nn.Module]:
        """The stage modules in order (a plain list: they are registered under their own names)."""
        if "_stage_list" not in self.__dict__:
            raise NotImplementedError(f"{type(self).__name__} declares no stages (call set_stages in __init__)")
        return list(self.__dict__["_stage_list"])

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


def init_conv_bn(module: nn.Module, linear_std: float | None = None) -> None:
    """The initialisation of the CIFAR and torchvision zoos: Kaiming-normal (fan-out) convs with zero
    bias, BN weight 1 and bias 0; with ``linear_std``, linear layers N(0, std) with zero bias
    (otherwise PyTorch's default)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0, linear_std)
            nn.init.zeros_(m.bias)
