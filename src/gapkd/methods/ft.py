"""Kim et al., "Paraphrasing Complex Network: Network Compression via Factor Transfer" (NeurIPS 2018), as
RepDistiller runs it on CIFAR-100 (``--distill factor -a 0 -b 200``, distiller_zoo/FT.py, the Paraphraser
and Translator of models/util.py, helper/pretrain.py).

Modules: a *paraphraser* on the teacher's last stage output (encoder: three 3x3 convs with LeakyReLU(0.1),
C -> C -> rate*C -> rate*C, no BN; decoder: three 3x3 transposed convs back to C) and a *translator* on the
student's last stage output (three 3x3 convs with BN and LeakyReLU(0.1), C_s -> C_s -> rate*C_t -> rate*C_t).
The factor of a map is ``normalize(mean_c f^2)`` flattened; the FT loss is the mean absolute difference
of the student's (translator) and teacher's (paraphraser encoder) factors, the larger map pooled to the
smaller's size first.

Two phases in one resumable run, switched by the epoch (``StepInfo.epoch``), not by the training loop:

1. Paraphraser pre-training, the first ``init_epochs`` (RepDistiller's ``--init_epochs`` 30): only the
   paraphraser trains, to reconstruct the teacher's feature map (loss ``reconstruction``, MSE, as
   RepDistiller's ``criterion_init``), at ``paraphraser_lr_mult`` times the base learning rate (RepDistiller:
   lr 0.01 where the student is a ResNet or WRN, else the base 0.05). The student does not train.
2. Transfer, the rest: the paraphraser is frozen (its factor computed without gradient); the student and
   the translator train on ``ce_weight * CE + beta * FT``.

Where we differ from RepDistiller: it pre-trains the paraphraser with its own optimiser as extra epochs;
here the phase is the first ``init_epochs`` of the run under the run's optimiser, with the paraphraser in
its own parameter group. The recipes (configs/generate.py) add ``init_epochs`` to the epochs and shift the
step milestones, so the transfer phase keeps the published schedule. The student's logits logged during
pre-training come from an eval-mode forward without gradient (its BN statistics stay untouched, as in
RepDistiller, where the student is not run at all).
"""
from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from .ab import PHASED_DDP_REASON
from .base import Distiller, StepOutput, hparams, probe_features, register_method


def _conv_stack(conv, channels: list[int], bn: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for c_in, c_out in zip(channels[:-1], channels[1:]):
        layers += [conv(c_in, c_out, 3, 1, 1), *([nn.BatchNorm2d(c_out)] if bn else []), nn.LeakyReLU(0.1)]
    return nn.Sequential(*layers)


class Paraphraser(nn.Module):
    def __init__(self, channels: int, rate: float):
        super().__init__()
        factor = int(channels * rate)
        self.encoder = _conv_stack(nn.Conv2d, [channels, channels, factor, factor], bn=False)
        self.decoder = _conv_stack(nn.ConvTranspose2d, [factor, factor, channels, channels], bn=False)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        factor = self.encoder(x)
        return factor, self.decoder(factor)


def factor(f: Tensor, p: float = 2.0) -> Tensor:
    return F.normalize(f.float().pow(p).mean(1).flatten(1))


def ft_loss(student_factor: Tensor, teacher_factor: Tensor, p: float = 2.0) -> Tensor:
    """RepDistiller's FactorTransfer (p1 = p, p2 = 1): mean |factor(s) - factor(t)|."""
    s_h, t_h = student_factor.shape[2], teacher_factor.shape[2]
    if s_h > t_h:
        student_factor = F.adaptive_avg_pool2d(student_factor, teacher_factor.shape[2:])
    elif s_h < t_h:
        teacher_factor = F.adaptive_avg_pool2d(teacher_factor, student_factor.shape[2:])
    return (factor(student_factor, p) - factor(teacher_factor, p)).abs().mean()


@hparams
class FTHparams:
    init_epochs: Annotated[int, Field(ge=0, description="epochs of paraphraser pre-training at the start of the run, 0 for none (RepDistiller: 30)")] = 30
    beta: Annotated[float, Field(ge=0, description="weight of the factor-transfer loss (RepDistiller CIFAR: 200)")] = 200.0
    ce_weight: Annotated[float, Field(ge=0, description="weight of cross-entropy on the labels")] = 1.0
    rate: Annotated[float, Field(gt=0, le=1, description="paraphraser factor channels / teacher channels (RepDistiller: 0.5)")] = 0.5
    p: Annotated[float, Field(gt=0, description="power of the factor's channel mean (RepDistiller: 2)")] = 2.0
    paraphraser_lr_mult: Annotated[float, Field(gt=0, description="paraphraser lr / base lr (RepDistiller: 0.01/0.05 for ResNet and WRN students, else 1)")] = 0.2


@register_method("ft", "factor")
class FT(Distiller):
    """Factor transfer: the first init_epochs train only a paraphraser (conv encoder/decoder on the teacher's last stage) on loss 'reconstruction'; then the student + translator (3 conv-BN-LeakyReLU) train on 'ce' + 'ft'."""

    Hparams = FTHparams
    supports_ddp = False
    ddp_unsupported_reason = PHASED_DDP_REASON

    def __init__(self, student, teacher=None, *, task=None, **hyper):
        super().__init__(student, teacher, task=task, **hyper)
        h = self.hparams
        s_channels = probe_features(student, task).stages[-1].shape[1]
        t_channels = probe_features(self.teacher, task).stages[-1].shape[1]
        self.paraphraser = Paraphraser(t_channels, h.rate)
        self.translator = _conv_stack(nn.Conv2d, [s_channels, s_channels, int(t_channels * h.rate), int(t_channels * h.rate)], bn=True)

    def param_groups(self) -> list[dict]:
        paraphraser = {id(p) for p in self.paraphraser.parameters()}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in paraphraser]
        return [
            {"params": rest, "lr_mult": 1.0, "name": "student"},
            {"params": list(self.paraphraser.parameters()), "lr_mult": self.hparams.paraphraser_lr_mult, "name": "paraphraser"},
        ]

    def forward(self, images, labels, step):
        h = self.hparams
        teacher_map = self.teacher_forward(images).stages[-1]
        if step.epoch < h.init_epochs:
            _, reconstruction = self.paraphraser(teacher_map)
            with torch.no_grad():
                was = self.student.training
                logits = self.student.eval()(images)
                self.student.train(was)
            return StepOutput({"reconstruction": F.mse_loss(reconstruction.float(), teacher_map.float())}, logits)
        features = self.student.forward_features(images)
        with torch.no_grad():
            teacher_factor = self.paraphraser.encoder(teacher_map)
        return StepOutput(
            {
                "ce": h.ce_weight * F.cross_entropy(features.logits, labels),
                "ft": h.beta * ft_loss(self.translator(features.stages[-1]), teacher_factor, h.p),
            },
            features.logits,
        )
