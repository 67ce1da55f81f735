"""Ahn et al., "Variational Information Distillation for Knowledge Transfer" (VID, CVPR 2019).

For each paired stage, the teacher's map t is modelled as a Gaussian whose mean a small network
predicts from the student's map s (1x1 conv -> ReLU -> 1x1 conv -> ReLU -> 1x1 conv, no biases,
C_T channels throughout) and whose per-channel variance is softplus(log_scale) + eps, a free
parameter started at ``init_pred_var``; the loss is the mean negative log-likelihood
0.5 * ((mu(s) - t)^2 / var + log var) (the constant dropped), after average-pooling the larger map to
the smaller. This is the authors' code (github.com/ssahn0215/variational-information-distillation)
as RepDistiller and mdistiller run it, with their CIFAR-100 defaults (``CFG.VID``: CE 1, weight 1,
init_pred_var 5, eps 1e-5), summed over every stage both models share. The paper also distils the
logit layer with a heteroscedastic variance; the codes, and we, do not."""
from __future__ import annotations

import math
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from .base import Distiller, StepOutput, hparams, probe_features, register_method
from .losses import match_spatial
from .pairing import shared_stage_count


def vid_regressor(student_channels: int, teacher_channels: int) -> nn.Sequential:
    """mu(s): three bias-free 1x1 convolutions with ReLUs between, student channels -> teacher channels."""
    def conv(cin, cout):
        return nn.Conv2d(cin, cout, kernel_size=1, bias=False)

    return nn.Sequential(conv(student_channels, teacher_channels), nn.ReLU(), conv(teacher_channels, teacher_channels), nn.ReLU(),
                         conv(teacher_channels, teacher_channels))


def vid_variance(log_scale: Tensor, eps: float) -> Tensor:
    """The per-channel variance: softplus(log_scale) + eps."""
    return F.softplus(log_scale.float()) + eps


def vid_nll(mean: Tensor, target: Tensor, variance: Tensor) -> Tensor:
    """Mean over every element of 0.5 * ((mean - target)^2 / var + log var), var per channel (dim 1)."""
    variance = variance.view(1, -1, *([1] * (mean.dim() - 2)))
    return (0.5 * ((mean.float() - target.float()).pow(2) / variance + variance.log())).mean()


@hparams
class VIDHparams:
    beta: Annotated[float, Field(ge=0, description="weight of the NLL summed over stages (RepDistiller/mdistiller CIFAR-100: 1)")] = 1.0
    init_pred_var: Annotated[float, Field(gt=0, description="initial variance of every teacher channel")] = 5.0
    eps: Annotated[float, Field(gt=0, description="lower bound added to the variance")] = 1e-5
    ce_weight: Annotated[float, Field(ge=0, description="weight of cross-entropy on the labels")] = 1.0


@register_method("vid")
class VID(Distiller):
    """Variational information distillation: CE + beta * sum over stages of the Gaussian NLL of the teacher's map given the student's."""

    Hparams = VIDHparams
    loss_terms = ("ce", "vid")
    extra_modules = {"regressors": "per stage: 1x1 conv -> ReLU -> 1x1 conv -> ReLU -> 1x1 conv to the teacher's channels",
                     "log_scales": "per stage: one variance parameter per teacher channel"}

    def __init__(self, student, teacher=None, *, task=None, **hyper):
        super().__init__(student, teacher, task=task, **hyper)
        h = self.hparams
        student_stages, teacher_stages = probe_features(student, task).stages, probe_features(self.teacher, task).stages
        self.pairs = shared_stage_count(student_stages, teacher_stages, "VID")
        pairs = list(zip(student_stages[:self.pairs], teacher_stages[:self.pairs]))
        self.regressors = nn.ModuleList(vid_regressor(s.shape[1], t.shape[1]) for s, t in pairs)
        start = math.log(math.expm1(h.init_pred_var - h.eps))  # softplus(start) + eps = init_pred_var
        self.log_scales = nn.ParameterList(nn.Parameter(torch.full((t.shape[1],), start)) for _, t in pairs)

    def forward(self, images, labels, step):
        teacher = self.teacher_forward(images)
        features = self.student.forward_features(images)
        h = self.hparams
        vid = 0.0
        for regressor, log_scale, s, t in zip(self.regressors, self.log_scales, features.stages, teacher.stages):
            s, t = match_spatial(s, t)
            vid = vid + vid_nll(regressor(s), t, vid_variance(log_scale, h.eps))
        return StepOutput({"ce": h.ce_weight * F.cross_entropy(features.logits, labels), "vid": h.beta * vid}, features.logits)
