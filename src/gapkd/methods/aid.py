"""AID teacher adaptation — our reading of the abstract of "A Good Teacher Adapts Their
Knowledge for Distillation" (Qian, Le, Harandi, ICCV 2025); the paper's own formulas are not
public. Before distillation, the teacher is fine-tuned so that its inner-class distribution
fits what the student's architecture produces (a reference student S_ref trained with CE),
while it stays accurate and keeps the original teacher T0's class-wise similarity:

    L_AID = ce_weight * CE(z_T, y) + beta * L_inner(T || S_ref) + gamma * L_class(T0 || T)

with L_inner and L_class from :mod:`gapkd.methods.decomposition` at temperature tau, both
multiplied by tau^2 when ``temperature_scaling`` is on (the default, chosen on validation; see
docs/aid.md).

L_inner needs class means. ``class_means="batch"`` takes them over the batch, as the
decomposition is written; a class with one sample in the batch then contributes exactly 0 (its
mean is itself), which at 100 classes and batch 64 is about half the batch. ``"running"`` (the
default) takes them from running sums over the batches seen so far (decayed by
``running_decay`` per step, the current batch included), so every sample contributes. The means
of the adapted teacher are held constant in the gradient: with exact batch means the gradient
through the mean is zero anyway, so the two modes agree, value and gradient, on the first step.

The trainable module is the teacher being adapted: it is this Distiller's ``student``, so the
engine trains it, evaluates it and saves it as best.pt / last.pt. T0 is the frozen ``teacher``;
S_ref is frozen too and lives in ``reference``, left out of the checkpoints (it is reloaded
from ``reference_checkpoint`` whenever the method is built).
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..core import distributed
from ..core.errors import ConfigError
from .base import Distiller, StepOutput, TaskInfo, freeze, hparams, register_method
from .decomposition import class_similarity, inner_class


@hparams
class AIDAdaptHparams:
    temperature: Annotated[float, Field(gt=0)] = 4.0
    """tau of the softmax in both KL terms"""
    beta: Annotated[float, Field(ge=0)] = 1.0
    """adaptation strength: weight of L_inner(adapted teacher || reference student)"""
    gamma: Annotated[float, Field(ge=0)] = 1.0
    """weight of L_class(original teacher || adapted teacher): keeps T0's class-wise similarity"""
    ce_weight: Annotated[float, Field(ge=0)] = 1.0
    """weight of the cross-entropy that keeps the adapted teacher accurate"""
    temperature_scaling: bool = True
    """multiply both KL terms by tau^2 (Hinton's gradient scaling); off = the terms as written (under 1% of the loss)"""
    class_means: Literal["running", "batch"] = "running"
    """class means of L_inner: running sums over batches (every sample counts) or the batch's own (singletons count 0)"""
    running_decay: Annotated[float, Field(ge=0, lt=1)] = 0.99
    """class_means=running: per-step decay of the running sums (0 = the batch alone; 0.99 ~ the last 100 steps)"""
    reference_checkpoint: Optional[str] = None
    """checkpoint of the reference student S_ref (of the student's architecture), e.g. a CE baseline"""
    reference_model: Optional[str] = None
    """S_ref's architecture; default: the name recorded in its gapkd checkpoint"""


@register_method("aid-adapt")
class AIDAdapt(Distiller):
    """AID teacher adaptation (our reading of the abstract): CE + beta*L_inner(T||S_ref) + gamma*L_class(T0||T)."""

    Hparams = AIDAdaptHparams
    teacher_needs = "logits"  # T0's logits only (the cache serves them with data.views > 0); S_ref still runs

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, *, task: TaskInfo | None = None,
                 reference: nn.Module | None = None, **hyper: Any):
        super().__init__(student, teacher, task=task, **hyper)
        if reference is None:
            reference = self._load_reference(task)
        self.reference = freeze(reference)
        classes = task.num_classes if task is not None else self.student.num_classes
        # running class sums (rows: class, columns: probability of each class) and counts of the adapted
        # teacher ("teacher_*") and of S_ref ("reference_*"); saved in state.pt so a resumed run continues them
        for role in ("teacher", "reference"):
            self.register_buffer(f"running_{role}_sums", torch.zeros(classes, classes))
            self.register_buffer(f"running_{role}_counts", torch.zeros(classes))

    def _load_reference(self, task: TaskInfo | None) -> nn.Module:
        from .checkpoint import model_from_checkpoint

        h = self.hparams
        if not h.reference_checkpoint:
            raise ConfigError(
                "aid-adapt needs a reference student: set method.reference_checkpoint=PATH (a CE-trained model of the "
                "student's architecture, e.g. runs/<scratch run>/checkpoints/best.pt), or use the `gapkd aid` pipeline, "
                "which trains one."
            )
        if not Path(h.reference_checkpoint).is_file():
            raise ConfigError(f"method.reference_checkpoint={h.reference_checkpoint} does not exist; train the reference student first.")
        num_classes = task.num_classes if task is not None else self.student.num_classes
        in_channels = task.in_channels if task is not None else self.student.in_channels
        return model_from_checkpoint(h.reference_checkpoint, num_classes, in_channels, name=h.reference_model, role="reference",
                                     name_hint="set method.reference_model=NAME")[0]

    def forward(self, images, labels, step):
        h = self.hparams
        original_logits = self.teacher_logits(images, step)
        with torch.no_grad():
            reference_logits = self.reference(images)
        logits = self.student(images)
        scale = h.temperature**2 if h.temperature_scaling else 1.0
        if h.class_means == "batch":
            inner = inner_class(logits, reference_logits, labels, h.temperature)
        else:
            inner = self.running_inner_class(logits, reference_logits, labels)
        return StepOutput(
            {
                "ce": h.ce_weight * F.cross_entropy(logits, labels),
                "inner": h.beta * scale * inner,
                "class": h.gamma * scale * class_similarity(original_logits, logits, labels, h.temperature),
            },
            logits,
        )

    def running_inner_class(self, logits: torch.Tensor, reference_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """L_inner with running class means: (1/n) sum_i [KL(p_i || q_i) - sum_k p_ik log(p_bar_yi,k / q_bar_yi,k)],
        which is the decomposition's L_inner when the means are the batch's. The running sums take the current
        batch first (in training mode), so every class in the batch has a mean."""
        tau = self.hparams.temperature
        log_p = F.log_softmax(logits.float() / tau, dim=1)
        log_q = F.log_softmax(reference_logits.float() / tau, dim=1)
        p = log_p.exp()
        with torch.no_grad():
            p_bar = self._running_means("teacher", p.detach(), labels)[labels]
            q_bar = self._running_means("reference", log_q.exp(), labels)[labels]
        kl = (p * (log_p - log_q)).sum(1)
        return (kl - (torch.xlogy(p, p_bar) - torch.xlogy(p, q_bar)).sum(1)).mean()

    def _running_means(self, role: str, probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        sums, counts = getattr(self, f"running_{role}_sums"), getattr(self, f"running_{role}_counts")
        batch_sums = sums.new_zeros(sums.shape).index_add(0, labels, probs.to(sums.dtype))
        batch_counts = torch.bincount(labels, minlength=counts.numel()).to(counts.dtype)
        dist = distributed.current()  # under DDP every process adds the whole global batch: the sums stay equal
        batch_sums, batch_counts = distributed.all_reduce_sum(batch_sums, dist), distributed.all_reduce_sum(batch_counts, dist)
        decay = self.hparams.running_decay
        new_sums, new_counts = decay * sums + batch_sums, decay * counts + batch_counts
        if self.training:
            sums.copy_(new_sums)
            counts.copy_(new_counts)
        return new_sums / new_counts.clamp(min=1e-12).unsqueeze(1)

    def train(self, mode: bool = True) -> "AIDAdapt":
        super().train(mode)
        if hasattr(self, "reference"):
            self.reference.eval()
        return self

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapted teacher and the running class sums: T0 and S_ref are frozen and rebuilt from their checkpoints."""
        return {k: v for k, v in super().trainable_state_dict().items() if not k.startswith("reference.")}
