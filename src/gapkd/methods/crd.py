"""Tian et al., "Contrastive Representation Distillation" (CRD, ICLR 2020).

Student and teacher pooled features are embedded (linear + L2 norm) and contrasted, each
against a memory bank of the other's embeddings of the whole training set: the positive is
the same sample, the negatives are drawn at random (from other classes, as RepDistiller's
"exact" mode). The loss is NCE with a normalisation constant fixed on the first batch.

Memory banks are buffers, so checkpoints carry them and resume is exact. Samples are keyed
by the data layer's stable ids (``StepInfo.indices``, rows of the source split), mapped to
bank rows through ``TaskInfo.train_ids``: the bank has exactly one row per training sample,
so validation samples carved out of the source split never appear among the negatives.
Negatives are drawn with replacement (the i.i.d. noise draws NCE assumes; RepDistiller draws
them without replacement) from a generator seeded by the run and the step (not by the process).

Under DDP each process holds a slice of the global batch; CRD then trains as one process would
on the whole batch: every process draws the negatives of the whole global batch and keeps its
slice's, Z is estimated over the whole first global batch, and the memory banks are updated
with every slice's embeddings (gathered in rank order), so every process's banks stay the same."""
from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..core import distributed
from ..core.errors import ConfigError
from .base import Distiller, StepOutput, hparams, probe_features, register_method
from .losses import kd_kl


@hparams
class CRDHparams:
    ce_weight: Annotated[float, Field(ge=0)] = 1.0
    """weight of cross-entropy on the labels"""
    kd_weight: Annotated[float, Field(ge=0)] = 0.0
    """weight of Hinton's KD term (RepDistiller's "CRD+KD" uses 1.0)"""
    crd_weight: Annotated[float, Field(ge=0)] = 0.8
    """weight of the contrastive term"""
    temperature: Annotated[float, Field(gt=0)] = 4.0
    """temperature of the KD term"""
    feature_dim: Annotated[int, Field(ge=1)] = 128
    """dimension of the embedding space"""
    num_negatives: Annotated[int, Field(ge=1)] = 16384
    """negatives contrasted with each positive"""
    nce_temperature: Annotated[float, Field(gt=0)] = 0.07
    """temperature of the exponentiated similarities"""
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.5
    """memory update: row <- normalise(momentum * row + (1 - momentum) * new embedding)"""
    negatives: Literal["other-class", "any"] = "other-class"
    """draw negatives from samples of other classes (RepDistiller) or from any other sample"""


class Embed(nn.Module):
    """Linear map to the embedding space followed by L2 normalisation."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.linear(torch.flatten(x, 1)).float(), dim=1)


def nce_loss(scores: Tensor, num_data: int) -> Tensor:
    """NCE loss of CRD (its Eq. 18) for ``scores`` (B, 1 + K): normalised exponentiated
    similarities, positive first. With noise probability 1/num_data, a pair is real with
    probability P / (P + K / num_data)."""
    noise = (scores.shape[1] - 1) / num_data
    eps = 1e-7
    positive, negative = scores[:, 0], scores[:, 1:]
    log_real = torch.log(positive / (positive + noise + eps))
    log_noise = torch.log(noise / (negative + noise + eps))
    return -(log_real.sum() + log_noise.sum()) / scores.shape[0]


@register_method("crd")
class CRD(Distiller):
    """CRD: contrastive (NCE) matching of student and teacher embeddings against memory banks of the training set."""

    Hparams = CRDHparams

    def __init__(self, student, teacher=None, *, task=None, **hyper: Any):
        super().__init__(student, teacher, task=task, **hyper)
        if task is None:
            raise ValueError("CRD keeps one memory row per training sample: pass task=TaskInfo(...) to the distiller")
        h, n = self.hparams, task.num_train
        if n < 2:
            raise ConfigError("CRD needs at least 2 training samples for its memory bank.")
        ids = task.train_ids if task.train_ids is not None else torch.arange(n)
        if ids.numel() != n or torch.unique(ids).numel() != n:
            raise ValueError(f"TaskInfo.train_ids must hold {n} distinct sample ids, one per training sample")
        self.embed_student = Embed(probe_features(student, task).pooled.shape[1], h.feature_dim)
        self.embed_teacher = Embed(probe_features(self.teacher, task).pooled.shape[1], h.feature_dim)
        bound = 1.0 / math.sqrt(h.feature_dim / 3)  # RepDistiller's initialisation of the banks
        self.register_buffer("memory_student", torch.rand(n, h.feature_dim).mul_(2 * bound).sub_(bound))
        self.register_buffer("memory_teacher", torch.rand(n, h.feature_dim).mul_(2 * bound).sub_(bound))
        self.register_buffer("normalizers", torch.full((2,), -1.0))  # Z of the student and teacher anchors, set once
        # bank row of each sample id (-1: not a training sample); derived from the data, so not saved
        row_of_id = torch.full((int(ids.max()) + 1,), -1, dtype=torch.long)
        row_of_id[ids] = torch.arange(n)
        self.register_buffer("row_of_id", row_of_id, persistent=False)
        if h.negatives == "other-class":
            if task.train_labels is None:
                raise ValueError("negatives='other-class' needs TaskInfo.train_labels")
            labels = task.train_labels.long()
            counts = torch.bincount(labels, minlength=task.num_classes)
            if int(counts.max()) == n:
                raise ConfigError("CRD with negatives=other-class needs samples of at least 2 classes; set method.negatives=any.")
            self.register_buffer("row_label", labels, persistent=False)
            self.register_buffer("rows_by_class", torch.argsort(labels, stable=True), persistent=False)
            self.register_buffer("class_start", torch.cumsum(counts, 0) - counts, persistent=False)
            self.register_buffer("class_count", counts, persistent=False)
        # seeds the negatives' generator with the step: drawn from the global RNG, which the run seeds with its seed
        # before building the distiller, so the same on every process and again on resume
        self.negative_seed = int(torch.randint(0, 2**62, ()))
        self._generator: torch.Generator | None = None
        self._ids_checked = False
        self._normalizers_set = False

    def bank_rows(self, indices: Tensor | None) -> Tensor:
        """Memory-bank rows of a batch's sample ids."""
        if indices is None:
            raise ValueError("CRD needs the sample ids of each batch (StepInfo.indices)")
        if not self._ids_checked:  # one check (and one device sync) per run
            bad = (indices < 0) | (indices >= self.row_of_id.numel())
            rows = self.row_of_id[indices.clamp(0, self.row_of_id.numel() - 1)]
            if bool((bad | (rows < 0)).any()):
                raise ValueError("a batch holds sample ids that are not in the training split CRD was built for")
            self._ids_checked = True
        return self.row_of_id[indices]

    @torch.compiler.disable
    def negative_draws(self, step: int, count: int, device: torch.device) -> Tensor:
        """(count, K) uniform draws in [0, 1) for the negatives of a global batch of ``count`` samples at
        ``step``: the same numbers on every process, in any run with this seed (resumed ones included)."""
        if self._generator is None or self._generator.device != torch.device(device):
            self._generator = torch.Generator(device=device)
        self._generator.manual_seed(self.negative_seed + step)  # CPU generators use its low 32 bits: one per step
        return torch.rand((count, self.hparams.num_negatives), device=device, dtype=torch.float64, generator=self._generator)

    def sample_negatives(self, rows: Tensor, draw: Tensor) -> Tensor:
        """(B, K) bank rows drawn uniformly, with replacement, from samples other than each positive
        (of another class with negatives='other-class'), from the uniform draws ``draw`` (B, K)."""
        n = self.memory_student.shape[0]
        if self.hparams.negatives == "any":  # uniform over the n - 1 other rows
            pick = (draw * (n - 1)).long().clamp_(max=n - 2)
            return pick + (pick >= rows[:, None]).long()
        label = self.row_label[rows]
        start, count = self.class_start[label][:, None], self.class_count[label][:, None]
        pick = (draw * (n - count)).long().clamp_(max=n - count - 1)  # a position among rows of other classes
        return self.rows_by_class[pick + (pick >= start).long() * count]

    def contrast(self, v_student: Tensor, v_teacher: Tensor, rows: Tensor, negatives: Tensor,
                 batch_rows: Tensor | None = None) -> Tensor:
        """The CRD loss for unit embeddings of one batch; then the memory update of its rows. Under DDP
        ``batch_rows`` are the rows of the whole global batch (every process's, in rank order; gathered when not given)."""
        h, n = self.hparams, self.memory_student.shape[0]
        dist = distributed.current()
        candidates = torch.cat([rows[:, None], negatives], 1)  # positive first
        # the student anchor is scored against the teacher's bank and the teacher anchor against the student's;
        # one (B, n) product then a gather: far less memory than gathering (B, 1 + K, dim) bank rows
        score_student = torch.exp((v_student @ self.memory_teacher.T).gather(1, candidates) / h.nce_temperature)
        score_teacher = torch.exp((v_teacher @ self.memory_student.T).gather(1, candidates) / h.nce_temperature)
        if not self._normalizers_set:  # one check (and one device sync) per run
            if bool((self.normalizers < 0).any()):  # the first step: Z is the mean score of the (global) batch times n
                with torch.no_grad():
                    sums = torch.stack([score_student.double().sum(), score_teacher.double().sum(),
                                        torch.tensor(score_student.numel(), dtype=torch.float64, device=rows.device)])
                    sums = distributed.all_reduce_sum(sums, dist)
                    self.normalizers.copy_(sums[:2] / sums[2] * n)
            self._normalizers_set = True
        loss = nce_loss(score_student / self.normalizers[0], n) + nce_loss(score_teacher / self.normalizers[1], n)
        with torch.no_grad():  # every process updates its banks with the whole global batch
            embeddings = torch.cat(distributed.all_gather(torch.cat([v_student, v_teacher], 1).detach(), dist))
            batch_rows = torch.cat(distributed.all_gather(rows, dist)) if batch_rows is None else batch_rows
            for name, new in (("memory_student", embeddings[:, :h.feature_dim]), ("memory_teacher", embeddings[:, h.feature_dim:])):
                bank = getattr(self, name)  # out of place: autograd keeps the old banks for the backward pass
                updated = F.normalize(bank[batch_rows] * h.momentum + new * (1 - h.momentum), dim=1)
                setattr(self, name, bank.index_copy(0, batch_rows, updated))
        return loss

    def forward(self, images, labels, step):
        teacher = self.teacher_forward(images)
        student = self.student.forward_features(images)
        h = self.hparams
        rows = self.bank_rows(step.indices)
        # under DDP: the global batch's rows, and where this process's slice lies in it
        dist = distributed.current()
        slices = distributed.all_gather(rows, dist)
        start = sum(len(part) for part in slices[:dist.rank])
        batch_rows = torch.cat(slices)
        draw = self.negative_draws(step.step, len(batch_rows), rows.device)[start:start + len(rows)]
        with torch.autocast(images.device.type, enabled=False):  # exp(cos / 0.07) wants float32
            v_student = self.embed_student(student.pooled.float())
            v_teacher = self.embed_teacher(teacher.pooled.float())
            crd = self.contrast(v_student, v_teacher, rows, self.sample_negatives(rows, draw), batch_rows)
        losses = {}
        if h.ce_weight > 0:
            losses["ce"] = h.ce_weight * F.cross_entropy(student.logits, labels)
        if h.kd_weight > 0:
            losses["kd"] = h.kd_weight * kd_kl(student.logits, teacher.logits, h.temperature)
        losses["crd"] = h.crd_weight * crd
        return StepOutput(losses, student.logits)
