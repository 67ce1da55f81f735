"""Chen et al., "Knowledge Distillation with the Reused Teacher Classifier" (SimKD, CVPR 2022).

A projector maps the student's last-stage feature map to the teacher's last-stage channels
and is trained, with the student, to match the teacher's feature map (MSE). The student then
predicts through the projector and the teacher's frozen classifier: the deployable model is
student backbone + projector + teacher classifier (:class:`SimKDStudent`)."""
from __future__ import annotations

from typing import Annotated, Any

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..core.errors import ConfigError
from ..models.base import StagedNet
from .base import Distiller, StepOutput, hparams, probe_features, register_method


@hparams
class SimKDHparams:
    factor: Annotated[int, Field(ge=1)] = 2
    """projector bottleneck: its hidden layers have teacher_channels // factor channels"""
    feature_weight: Annotated[float, Field(ge=0)] = 1.0
    """weight of the MSE between projected student and teacher last-stage features"""
    ce_weight: Annotated[float, Field(ge=0)] = 0.0
    """weight of cross-entropy on the student's (projector + teacher classifier) logits; the paper uses none"""


class SimKDProjector(nn.Module):
    """conv1x1-BN-ReLU, conv3x3-BN-ReLU, conv1x1-BN-ReLU from student to teacher channels, after
    average-pooling the student map to ``size`` when it is larger than the teacher's."""

    def __init__(self, in_channels: int, out_channels: int, factor: int = 2, size: tuple[int, int] | None = None):
        super().__init__()
        hidden = out_channels // factor
        if hidden < 1:
            raise ConfigError(f"method.factor={factor} leaves no hidden channels for a {out_channels}-channel teacher; lower it.")
        self.in_channels, self.out_channels, self.factor = in_channels, out_channels, factor
        self.size = tuple(size) if size is not None else None
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            x = F.adaptive_avg_pool2d(x, self.size)
        return self.layers(x)


class SimKDStudent(StagedNet):
    """What SimKD ships: the student's stem and stages, the projector as one more stage, and
    the teacher's classifier on the pooled projection. (The student's own classifier is kept,
    unused and untrained, so the backbone keeps its zoo parameter names.)"""

    def __init__(self, backbone: StagedNet, projector: SimKDProjector, classifier: nn.Module):
        super().__init__(backbone.num_classes, backbone.in_channels, [*backbone.stage_channels, projector.out_channels])
        self.backbone = backbone
        self.projector = projector
        self.teacher_classifier = classifier

    def forward_stem(self, x: Tensor) -> Tensor:
        return self.backbone.forward_stem(x)

    @property
    def stages(self) -> list[nn.Module]:
        return [*self.backbone.stages, self.projector]

    @property
    def classifier(self) -> nn.Module:
        return self.teacher_classifier


@register_method("simkd")
class SimKD(Distiller):
    """SimKD: projector to the teacher's last-stage features (MSE), prediction by the teacher's frozen classifier."""

    Hparams = SimKDHparams

    def __init__(self, student, teacher=None, *, task=None, **hyper: Any):
        super().__init__(student, teacher, task=task, **hyper)
        student_map = probe_features(student, task).stages[-1]
        teacher_map = probe_features(self.teacher, task).stages[-1]
        # spatial alignment as in the SimKD code: the larger of the two maps is average-pooled to the smaller
        common = tuple(min(a, b) for a, b in zip(student_map.shape[-2:], teacher_map.shape[-2:]))
        self.target_size = common if tuple(teacher_map.shape[-2:]) != common else None
        projector = SimKDProjector(
            student_map.shape[1], teacher_map.shape[1], self.hparams.factor,
            common if tuple(student_map.shape[-2:]) != common else None,
        )
        student.classifier.requires_grad_(False)  # never used: the teacher's classifier predicts
        self.student = SimKDStudent(student, projector, self.teacher.classifier)

    def forward(self, images, labels, step):
        target = self.teacher_forward(images).stages[-1]
        if self.target_size is not None:
            target = F.adaptive_avg_pool2d(target, self.target_size)
        features = self.student.forward_features(images)
        h = self.hparams
        losses = {"simkd": h.feature_weight * F.mse_loss(features.stages[-1].float(), target.float())}
        if h.ce_weight > 0:
            losses["ce"] = h.ce_weight * F.cross_entropy(features.logits, labels)
        return StepOutput(losses, features.logits)

    def deployable_spec(self) -> dict[str, Any]:
        projector = self.student.projector
        return {"student_channels": projector.in_channels, "teacher_channels": projector.out_channels,
                "factor": projector.factor, "size": list(projector.size) if projector.size else None}

    @classmethod
    def rebuild_deployable(cls, student: nn.Module, options: dict[str, Any]) -> SimKDStudent:
        projector = SimKDProjector(options["student_channels"], options["teacher_channels"], options["factor"], options["size"])
        return SimKDStudent(student, projector, nn.Linear(options["teacher_channels"], student.num_classes))
