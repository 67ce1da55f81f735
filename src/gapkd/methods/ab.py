"""Heo et al., "Knowledge Transfer via Distillation of Activation Boundaries Formed by Hidden Neurons"
(AAAI 2019), as RepDistiller runs it on CIFAR-100 (``--distill abound -a 0 -b 1``, distiller_zoo/AB.py,
helper/pretrain.py).

Two phases in one resumable run, switched by the epoch (``StepInfo.epoch``), not by the training loop:

1. Initialisation, the first ``init_epochs`` epochs (RepDistiller's ``--init_epochs`` 30): the student's
   stages and the connectors learn the teacher's activation boundaries with the alternative (hinge-squared)
   loss on the pre-ReLU outputs of every stage,
   ``sum_i 2^(i-n+1) * sum |(s+m)^2 [s>-m, t<=0] + (s-m)^2 [s<=m, t>0]| / batch * 3/1000``
   (margin m = 1); no cross-entropy, so the classifier is untouched.
2. Classification, the remaining epochs: cross-entropy only (RepDistiller sets the AB term to 0 here;
   ``ab_weight`` > 0 keeps it as the paper's optional variant).

Where we differ from RepDistiller, and why: it runs the initialisation as 30 extra epochs with a separate
optimiser (lr 0.05, no decay) and the student in eval mode (BN on its running statistics); here the phase
is the first ``init_epochs`` of the run, under the run's one optimiser and schedule, with the student in
train mode like every other method. The recipes (configs/generate.py) add ``init_epochs`` to the epochs
and shift the step milestones by as much, so the classification phase keeps the published 240-epoch
schedule and the initialisation runs at the base learning rate 0.05, as in RepDistiller.
"""
from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..core.errors import ConfigError
from .base import Distiller, StepOutput, hparams, probe_features, register_method
from .fitnet import hint_regressor

#: why AB, FT and FSP refuse DDP: parameters without a gradient in a step would stall DDP's reduction
PHASED_DDP_REASON = ("trains different parameters in its two phases, and DDP (as gapkd wraps it) expects a "
                     "gradient for every trained parameter in every step")
PREACT_MODELS = "CIFAR ResNets (resnet8...resnet110, resnet8x4, resnet32x4), torchvision-style ResNets, wrn_*, vgg*"


def require_preact(features, role: str, method: str) -> None:
    """A clear error when a model's ``forward_features`` fills no ``preact`` (pre-ReLU stage outputs)."""
    if not features.preact:
        raise ConfigError(
            f"{method} distils pre-ReLU stage outputs (Features.preact), which the {role} does not provide. "
            f"Models that do: {PREACT_MODELS}; choose one of those as {role}, or another method."
        )


def ab_loss(student: list[Tensor], teacher: list[Tensor], margin: float = 1.0, scale: float = 3e-3) -> Tensor:
    """RepDistiller's ABLoss, summed: stage i of n weighs 2^(i-n+1); each term is summed over all
    elements and divided by the batch size, then scaled by ``scale`` (3/1000 there)."""
    n, batch = len(student), student[0].shape[0]
    total = student[0].new_zeros((), dtype=torch.float32)
    for i, (s, t) in enumerate(zip(student, teacher)):
        s, t = s.float(), t.float()
        term = (s + margin).pow(2) * ((s > -margin) & (t <= 0)) + (s - margin).pow(2) * ((s <= margin) & (t > 0))
        total = total + 2.0 ** (i - n + 1) * term.sum() / batch
    return total * scale


@hparams
class ABHparams:
    init_epochs: Annotated[int, Field(ge=0, description="epochs of the initialisation phase at the start of the run, 0 for none (RepDistiller: 30)")] = 30
    margin: Annotated[float, Field(gt=0, description="activation-boundary margin m (RepDistiller/paper: 1.0)")] = 1.0
    loss_scale: Annotated[float, Field(gt=0, description="scale of the AB loss after dividing by the batch (RepDistiller: 3/1000)")] = 3e-3
    ce_weight: Annotated[float, Field(ge=0, description="cross-entropy weight after the initialisation (RepDistiller: 1)")] = 1.0
    ab_weight: Annotated[float, Field(ge=0, description="AB loss weight after the initialisation (RepDistiller: 0)")] = 0.0


@register_method("ab", "abound")
class AB(Distiller):
    """Activation boundaries: the first init_epochs train the student's stages + connectors (conv+BN where shapes differ) on loss 'ab' over pre-ReLU stage outputs; then 'ce' (plus 'ab' if ab_weight > 0)."""

    Hparams = ABHparams
    supports_ddp = False
    ddp_unsupported_reason = PHASED_DDP_REASON

    def __init__(self, student, teacher=None, *, task=None, **hyper):
        super().__init__(student, teacher, task=task, **hyper)
        s_probe, t_probe = probe_features(student, task), probe_features(self.teacher, task)
        require_preact(s_probe, "student", "AB")
        require_preact(t_probe, "teacher", "AB")
        if len(s_probe.preact) != len(t_probe.preact):
            raise ConfigError(
                f"AB pairs stage i of the student with stage i of the teacher, but the student has {len(s_probe.preact)} "
                f"stages and the teacher {len(t_probe.preact)}; choose models with as many stages."
            )
        # RepDistiller's Connector: the identity where shapes match, else conv + BN (no ReLU: the target is pre-ReLU)
        self.connectors = nn.ModuleList(
            nn.Identity() if tuple(s.shape[1:]) == tuple(t.shape[1:]) else nn.Sequential(*list(hint_regressor(s.shape[1:], t.shape[1:]))[:2])
            for s, t in zip(s_probe.preact, t_probe.preact)
        )

    def in_init(self, step) -> bool:
        return step.epoch < self.hparams.init_epochs

    def ab(self, student_preact, images) -> Tensor:
        teacher = self.teacher_forward(images)
        mapped = [connector(f) for connector, f in zip(self.connectors, student_preact)]
        return ab_loss(mapped, teacher.preact, self.hparams.margin, self.hparams.loss_scale)

    def forward(self, images, labels, step):
        h = self.hparams
        if not self.in_init(step) and h.ab_weight == 0:  # RepDistiller's second phase: the student and CE alone
            logits = self.student(images)
            return StepOutput({"ce": h.ce_weight * F.cross_entropy(logits, labels)}, logits)
        features = self.student.forward_features(images)
        if self.in_init(step):
            return StepOutput({"ab": self.ab(features.preact, images)}, features.logits)
        losses = {"ce": h.ce_weight * F.cross_entropy(features.logits, labels)}
        if h.ab_weight > 0:
            losses["ab"] = h.ab_weight * self.ab(features.preact, images)
        return StepOutput(losses, features.logits)
