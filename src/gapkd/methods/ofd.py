"""Heo et al., "A Comprehensive Overhaul of Feature Distillation" (ICCV 2019), as mdistiller runs it on
CIFAR-100 (mdistiller/distillers/OFD.py; CE weight 1, feature weight 0.001, 1x1 connectors).

- Features: the pre-ReLU outputs of the stages (``Features.preact``), the last ``k`` of each network where
  their stage counts differ (k = the smaller count; mdistiller's ``_align_list``).
- Connector per stage (trained, not deployed): conv (kernel ``connector_kernel``, no bias) + BN from the
  student's channels to the teacher's, conv weights N(0, 2/(k*k*C_out)), BN weight 1, bias 0.
- Margin per teacher channel, from the BN before that ReLU (``preact_bns()`` of the model: weight gamma,
  bias beta): the expectation of the pre-activation given it is negative under N(beta, gamma^2),
  ``m = beta - |gamma| phi(beta/|gamma|) / Phi(-beta/|gamma|)``, or ``-3|gamma|`` where
  ``Phi(-beta/|gamma|) <= 0.001``. Computed once, from the trained teacher.
- Partial L2 on the teacher map pooled to the student's size, with t' = max(t, m): ``(s - t')^2`` except where
  ``s <= t' <= 0``; summed over channels and positions, averaged over the batch; stage i of n weighs
  ``1 / 2^(n-1-i)``. The paper writes the same loss; the original code divides by the batch and 1000,
  which mdistiller's feature weight 0.001 reproduces.
"""
from __future__ import annotations

import math
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..core.errors import ConfigError
from .ab import PREACT_MODELS, require_preact
from .base import Distiller, StepOutput, hparams, probe_features, register_method


def ofd_margin(gamma: Tensor, beta: Tensor) -> Tensor:
    """Per-channel margin from a BN's weight and bias (float64 inside, returned as float32)."""
    std, mean = gamma.detach().double().abs(), beta.detach().double()
    z = -mean / std
    cdf = torch.special.ndtr(z)
    expected = mean - std * torch.exp(-0.5 * z.pow(2)) / math.sqrt(2 * math.pi) / cdf
    return torch.where(cdf > 1e-3, expected, -3 * std).float()


def ofd_stage_loss(student: Tensor, teacher: Tensor, margin: Tensor) -> Tensor:
    """Partial L2 between the connector's output and the teacher's pre-ReLU map (already at the student's size)."""
    student, teacher = student.float(), teacher.float()
    target = torch.maximum(teacher, margin.view(1, -1, 1, 1))
    mask = (student > target) | (target > 0)
    return ((student - target).pow(2) * mask).sum() / student.shape[0]


def connector(s_channels: int, t_channels: int, kernel: int) -> nn.Sequential:
    conv = nn.Conv2d(s_channels, t_channels, kernel, 1, (kernel - 1) // 2, bias=False)
    nn.init.normal_(conv.weight, 0, math.sqrt(2.0 / (kernel * kernel * t_channels)))
    return nn.Sequential(conv, nn.BatchNorm2d(t_channels))


@hparams
class OFDHparams:
    feat_weight: Annotated[float, Field(ge=0, description="weight of the partial-L2 feature loss (mdistiller CIFAR: 0.001)")] = 1e-3
    ce_weight: Annotated[float, Field(ge=0, description="weight of cross-entropy on the labels (mdistiller: 1)")] = 1.0
    connector_kernel: Annotated[int, Field(ge=1, description="kernel size of the connector conv, odd (mdistiller: 1)")] = 1


@register_method("ofd")
class OFD(Distiller):
    """Overhaul of feature distillation: 'ce' + 'ofd', a partial L2 with margins from the teacher's BN statistics between connector(student pre-ReLU stage) (conv+BN per stage) and the teacher's pre-ReLU stage."""

    Hparams = OFDHparams

    def __init__(self, student, teacher=None, *, task=None, **hyper):
        super().__init__(student, teacher, task=task, **hyper)
        h = self.hparams
        if h.connector_kernel % 2 == 0:
            raise ConfigError(f"method.connector_kernel={h.connector_kernel} must be odd (1 or 3) so the connector keeps the map's size.")
        s_probe, t_probe = probe_features(student, task), probe_features(self.teacher, task)
        require_preact(s_probe, "student", "OFD")
        require_preact(t_probe, "teacher", "OFD")
        bns = getattr(self.teacher, "preact_bns", None)
        if bns is None:
            raise ConfigError(
                f"OFD takes its margins from the BN before each of the teacher's stage ReLUs (preact_bns()), which "
                f"{type(self.teacher).__name__} does not name. Teachers that do: {PREACT_MODELS}."
            )
        self.num_stages = n = min(len(s_probe.preact), len(t_probe.preact))
        t_maps, t_bns = t_probe.preact[-n:], bns()[-n:]
        self.connectors = nn.ModuleList(
            connector(s.shape[1], t.shape[1], h.connector_kernel) for s, t in zip(s_probe.preact[-n:], t_maps)
        )
        for i, (bn, t) in enumerate(zip(t_bns, t_maps)):
            if bn.num_features != t.shape[1]:
                raise ConfigError(f"the teacher's preact_bns()[{i}] has {bn.num_features} channels but its stage has {t.shape[1]}.")
            self.register_buffer(f"margin{i}", ofd_margin(bn.weight, bn.bias), persistent=False)

    def margins(self) -> list[Tensor]:
        return [getattr(self, f"margin{i}") for i in range(self.num_stages)]

    def forward(self, images, labels, step):
        h, n = self.hparams, self.num_stages
        teacher = self.teacher_forward(images)
        features = self.student.forward_features(images)
        loss = 0.0
        for i, (conn, s, t, margin) in enumerate(zip(self.connectors, features.preact[-n:], teacher.preact[-n:], self.margins())):
            mapped = conn(s)
            loss = loss + ofd_stage_loss(mapped, F.adaptive_avg_pool2d(t, mapped.shape[-2:]), margin) / 2 ** (n - 1 - i)
        return StepOutput(
            {"ce": h.ce_weight * F.cross_entropy(features.logits, labels), "ofd": h.feat_weight * loss},
            features.logits,
        )
