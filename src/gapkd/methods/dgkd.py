"""Son et al., "Densely Guided Knowledge Distillation using Multiple Teacher Assistants" (DGKD, ICCV 2021).

Every larger model guides each smaller one: the student learns from the teacher and from every
assistant trained before it, each through a Hinton KD term, and at every step each guide's term
is dropped with probability ``drop_probability`` (the paper's stochastic DGKD, a regulariser
like dropout over teachers). When every guide is drawn for dropping, one of them, drawn
uniformly, is kept, so each step distils from at least one model (our choice; the paper does
not say what happens then). The draws come from torch's generator, which the training loop
seeds per epoch, so runs and resumes are reproducible.

This method holds the guides beyond the recipe's teacher in ``guides`` (model name, checkpoint,
options); the ``dgkd`` pipeline (gapkd pipeline dgkd) trains the assistants in turn and fills it."""
from __future__ import annotations

from typing import Annotated, Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from .base import Distiller, StepOutput, freeze, hparams, register_method
from .checkpoint import model_from_checkpoint
from .losses import kd_kl


@hparams
class Guide:
    name: str
    """model name (gapkd list models)"""
    checkpoint: str
    """its trained weights (an earlier stage's best.pt)"""
    options: dict[str, Any] = Field(default_factory=dict)
    """model options"""


@hparams
class DGKDHparams:
    temperature: Annotated[float, Field(gt=0)] = 4.0
    """softmax temperature of every KD term"""
    ce_weight: Annotated[float, Field(ge=0)] = 0.1
    """weight of cross-entropy on the labels"""
    kd_weight: Annotated[float, Field(ge=0)] = 0.9
    """weight of each guide's tau^2 * KL term (the terms are summed)"""
    drop_probability: Annotated[float, Field(ge=0, lt=1)] = 0.5
    """chance that a guide's term is dropped at a step (stochastic DGKD); 0 keeps every guide"""
    guides: list[Guide] = ()
    """models besides teacher.* that guide the student, largest first (the dgkd pipeline sets them)"""

@register_method("dgkd", "densely-guided-kd")
class DGKD(Distiller):
    """Densely guided KD: CE + kd_weight * sum of tau^2 * KL from the teacher and every earlier assistant, guides dropped at random."""

    Hparams = DGKDHparams
    # uses the logits of the teacher and of every guide only

    def __init__(self, student, teacher=None, *, task=None, **hyper):
        super().__init__(student, teacher, task=task, **hyper)
        self.guides = nn.ModuleList(freeze(self._load(guide, task)) for guide in self.hparams.guides)

    @staticmethod
    def _load(guide, task) -> nn.Module:
        if task is None:
            raise ValueError("dgkd builds its guides for the data's classes: pass task=TaskInfo(...) to the distiller")
        spec = guide if isinstance(guide, dict) else vars(guide)
        return model_from_checkpoint(spec["checkpoint"], task.num_classes, task.in_channels, name=spec["name"],
                                     options=spec.get("options") or {}, role="teacher")[0]

    def train(self, mode: bool = True) -> "DGKD":
        super().train(mode)
        for guide in getattr(self, "guides", []):
            guide.eval()
        return self

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The student only: the teacher and the guides are frozen (and rebuilt from their checkpoints)."""
        return {k: v for k, v in super().trainable_state_dict().items() if not k.startswith("guides.")}

    def kept_guides(self) -> Tensor:
        """A boolean per guide (the teacher first): whose term this step keeps."""
        count = 1 + len(self.guides)
        kept = torch.rand(count) >= self.hparams.drop_probability
        if not kept.any():
            kept[torch.randint(count, ())] = True
        return kept

    def forward(self, images, labels, step):
        h = self.hparams
        logits = self.student(images)
        kept = self.kept_guides().tolist()
        models = [self.teacher, *self.guides]
        with torch.no_grad():
            guide_logits = [model(images) for model, keep in zip(models, kept) if keep]
        kd = sum(kd_kl(logits, target, h.temperature) for target in guide_logits)
        return StepOutput({"ce": h.ce_weight * F.cross_entropy(logits, labels), "kd": h.kd_weight * kd}, logits)
