"""Yim et al., "A Gift from Knowledge Distillation: Fast Optimization, Network Minimization and Transfer
Learning" (CVPR 2017): the Flow of Solution Procedure, as RepDistiller runs it on CIFAR-100
(``--distill fsp -a 0 -b 50``, distiller_zoo/FSP.py, helper/pretrain.py).

FSP matrix of two consecutive feature maps a (N, C1, H, W) and b (N, C2, H, W) (the larger one average-
pooled to the smaller's size): ``G[n, j, i] = mean_hw b[n, j] * a[n, i]``. The maps are the stem output
and every stage output (RepDistiller's ``feat[:-1]``); the loss of each consecutive pair is the mean
squared difference of the student's and the teacher's matrices, summed over pairs. The channel counts
must match at the stem and every stage (the matrices are compared entry by entry), so FSP distils
within a family (resnet56 -> resnet20, resnet32x4 -> resnet8x4, wrn_40_2 -> wrn_16_2, vgg13 -> vgg8).

Two phases in one resumable run, switched by the epoch (``StepInfo.epoch``), not by the training loop:

1. Initialisation, the first ``init_epochs`` (RepDistiller's ``--init_epochs`` 30): the student's stem and
   stages learn the teacher's FSP matrices (loss ``fsp``); no cross-entropy, the classifier is untouched.
2. Classification, the rest: cross-entropy only. RepDistiller sets the FSP term to 0 here, so its
   ``-b 50`` has no effect; ``fsp_weight`` > 0 keeps the term (the paper's stage 2 is CE only too).

As for AB (methods/ab.py): RepDistiller runs the initialisation as extra epochs with its own optimiser and
the student in eval mode; here it is the first ``init_epochs`` of the run in train mode, and the recipes
add ``init_epochs`` to the epochs and shift the step milestones so the classification phase keeps the
published schedule.
"""
from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from ..core.errors import ConfigError
from .ab import PHASED_DDP_REASON
from .base import Distiller, StepOutput, hparams, probe_features, register_method


def stem_and_stages(model, images: Tensor) -> tuple[list[Tensor], Tensor]:
    """[stem output, stage outputs...] and the logits, from the StagedNet contract (forward_stem, stages, forward_head)."""
    x = model.forward_stem(images)
    maps = [x]
    for stage in model.stages:
        x = stage(x)
        maps.append(x)
    return maps, model.forward_head(x)[1]


def fsp_matrices(maps: list[Tensor]) -> list[Tensor]:
    """(N, C_{k+1}, C_k) matrix of each consecutive pair; the larger map is average-pooled to the smaller's size."""
    out = []
    for bottom, top in zip(maps[:-1], maps[1:]):
        if bottom.shape[2] > top.shape[2]:
            bottom = F.adaptive_avg_pool2d(bottom, top.shape[2:])
        elif bottom.shape[2] < top.shape[2]:
            top = F.adaptive_avg_pool2d(top, bottom.shape[2:])
        out.append(torch.einsum("nihw,njhw->nji", bottom.float(), top.float()) / (bottom.shape[2] * bottom.shape[3]))
    return out


def fsp_loss(student_maps: list[Tensor], teacher_maps: list[Tensor]) -> Tensor:
    return sum((s - t).pow(2).mean() for s, t in zip(fsp_matrices(student_maps), fsp_matrices(teacher_maps)))


@hparams
class FSPHparams:
    init_epochs: Annotated[int, Field(ge=0, description="epochs of the initialisation phase at the start of the run, 0 for none (RepDistiller: 30)")] = 30
    ce_weight: Annotated[float, Field(ge=0, description="cross-entropy weight after the initialisation (RepDistiller: 1)")] = 1.0
    fsp_weight: Annotated[float, Field(ge=0, description="FSP loss weight after the initialisation (RepDistiller: 0)")] = 0.0


@register_method("fsp")
class FSP(Distiller):
    """Flow of solution procedure: the first init_epochs train the student's stem + stages on loss 'fsp' (FSP matrices of consecutive stage pairs); then 'ce' (plus 'fsp' if fsp_weight > 0). No extra modules."""

    Hparams = FSPHparams
    supports_ddp = False
    ddp_unsupported_reason = PHASED_DDP_REASON

    def __init__(self, student, teacher=None, *, task=None, **hyper):
        super().__init__(student, teacher, task=task, **hyper)
        probe_features(student, task)  # the same task check as other methods
        channels = []
        for role, model in (("student", student), ("teacher", self.teacher)):
            try:
                with torch.no_grad():
                    was = model.training
                    parameter = next(model.parameters())
                    blank = torch.zeros(1, task.in_channels, task.image_size, task.image_size, device=parameter.device, dtype=parameter.dtype)
                    maps, _ = stem_and_stages(model.eval(), blank)
                    model.train(was)
            except (AttributeError, NotImplementedError) as error:
                raise ConfigError(f"FSP needs the {role}'s stem and stage outputs (forward_stem and stages of a StagedNet): {error}") from error
            channels.append([m.shape[1] for m in maps])
        if channels[0] != channels[1]:
            raise ConfigError(
                f"FSP compares FSP matrices entry by entry, so the channels of the stem and every stage must match: "
                f"student {channels[0]}, teacher {channels[1]}. Distil within a family (resnet56 -> resnet20, "
                f"resnet32x4 -> resnet8x4, wrn_40_2 -> wrn_16_2, vgg13 -> vgg8) or choose another method."
            )

    def fsp(self, student_maps, images) -> Tensor:
        with torch.no_grad():
            teacher_maps, _ = stem_and_stages(self.teacher, images)
        return fsp_loss(student_maps, teacher_maps)

    def forward(self, images, labels, step):
        h = self.hparams
        maps, logits = stem_and_stages(self.student, images)
        if step.epoch < h.init_epochs:
            return StepOutput({"fsp": self.fsp(maps, images)}, logits)
        losses = {"ce": h.ce_weight * F.cross_entropy(logits, labels)}
        if h.fsp_weight > 0:
            losses["fsp"] = h.fsp_weight * self.fsp(maps, images)
        return StepOutput(losses, logits)
