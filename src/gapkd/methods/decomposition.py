"""Exact decompositions of the KD loss, on logits and labels.

Notation (one batch or one whole split): temperature tau, teacher probabilities
p_i = softmax(z_T,i / tau), student q_i = softmax(z_S,i / tau), labels y_i, n samples, n_c of
class c, class means p_bar_c = mean of p_i over {i : y_i = c} (q_bar_c likewise).

- ``kd_loss``          L_KD    = (1/n) sum_i KL(p_i || q_i)          (no tau^2 factor: kd_kl = tau^2 * L_KD)
- ``class_similarity`` L_class = (1/n) sum_c n_c KL(p_bar_c || q_bar_c)
- ``inner_class``      L_inner = L_KD - L_class, computed here from its own closed form
                       (1/n) sum_i [KL(p_i || p_bar_yi) - sum_k p_ik log(q_ik / q_bar_yi,k)],
                       so that "the parts add up" is a fact the tests can check, not a definition.
                       It is >= 0 by the joint convexity of KL.
- ``spread``           D = (1/n) sum_i KL(p_i || p_bar_yi), a model's inner-class spread (D_T, D_S).
- ``dkd_terms``        DKD's split (Zhao et al., CVPR 2022): per sample
                       KL(p || q) = TCKD + (1 - p_t^T) NCKD, with TCKD the KL of the binary
                       (target, non-target) distributions and NCKD the KL among the non-target
                       classes (renormalised).

Every function takes the teacher's logits first: it reads as KL(teacher || student). The math
runs in float32, or in float64 when the logits are float64 (the reports use float64).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def _as_float(logits: Tensor) -> Tensor:
    return logits if logits.dtype == torch.float64 else logits.float()


def _log_probs(logits: Tensor, temperature: float) -> Tensor:
    return F.log_softmax(_as_float(logits) / temperature, dim=1)


def _kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p_i || q_i) for every row, from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(1)


def class_means(probs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-class mean of ``probs`` (rows of absent classes are zero) and the class counts."""
    num_classes = probs.shape[1]
    counts = torch.bincount(labels, minlength=num_classes).to(probs.dtype)
    sums = probs.new_zeros(num_classes, num_classes).index_add(0, labels, probs)
    return sums / counts.clamp(min=1).unsqueeze(1), counts


def kd_loss(teacher_logits: Tensor, student_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """L_KD = (1/n) sum_i KL(p_i || q_i) at temperature tau."""
    return _kl_rows(_log_probs(teacher_logits, temperature), _log_probs(student_logits, temperature)).mean()


def class_similarity(teacher_logits: Tensor, student_logits: Tensor, labels: Tensor, temperature: float = 4.0) -> Tensor:
    """L_class = (1/n) sum_c n_c KL(p_bar_c || q_bar_c): how far apart the class-mean predictions are."""
    p_bar, counts = class_means(_log_probs(teacher_logits, temperature).exp(), labels)
    q_bar, _ = class_means(_log_probs(student_logits, temperature).exp(), labels)
    per_class = (torch.xlogy(p_bar, p_bar) - torch.xlogy(p_bar, q_bar)).sum(1)  # absent classes give 0
    return (counts * per_class).sum() / labels.numel()


def _spread_rows(log_p: Tensor, labels: Tensor) -> Tensor:
    """KL(p_i || p_bar_yi) for every row."""
    p = log_p.exp()
    p_bar = class_means(p, labels)[0][labels]
    return (p * log_p).sum(1) - torch.xlogy(p, p_bar).sum(1)


def spread(logits: Tensor, labels: Tensor, temperature: float = 4.0) -> Tensor:
    """D = (1/n) sum_i KL(p_i || p_bar_yi): how much a model's predictions vary inside a class."""
    return _spread_rows(_log_probs(logits, temperature), labels).mean()


def spread_per_class(logits: Tensor, labels: Tensor, temperature: float = 4.0) -> Tensor:
    """Mean KL(p_i || p_bar_c) over the samples of each class c (0 for absent classes)."""
    rows = _spread_rows(_log_probs(logits, temperature), labels)
    counts = torch.bincount(labels, minlength=logits.shape[1]).to(rows.dtype)
    return rows.new_zeros(logits.shape[1]).index_add(0, labels, rows) / counts.clamp(min=1)


def inner_class(teacher_logits: Tensor, student_logits: Tensor, labels: Tensor, temperature: float = 4.0) -> Tensor:
    """L_inner = L_KD - L_class, from its closed form (see the module docstring); >= 0."""
    log_p = _log_probs(teacher_logits, temperature)
    log_q = _log_probs(student_logits, temperature)
    p = log_p.exp()
    q_bar = class_means(log_q.exp(), labels)[0][labels]
    cross = (p * log_q).sum(1) - torch.xlogy(p, q_bar).sum(1)  # sum_k p_ik log(q_ik / q_bar_yi,k)
    return (_spread_rows(log_p, labels) - cross).mean()


def dkd_terms(teacher_logits: Tensor, student_logits: Tensor, labels: Tensor, temperature: float = 4.0) -> tuple[Tensor, Tensor, Tensor]:
    """Per sample: (TCKD, NCKD, 1 - p_t^T), with KL(p || q) = TCKD + (1 - p_t^T) * NCKD exactly."""
    teacher, student = _as_float(teacher_logits) / temperature, _as_float(student_logits) / temperature
    n, num_classes = teacher.shape
    if num_classes == 1:  # one class: every distribution is [1], every term is 0
        zero = teacher.new_zeros(n)
        return zero, zero, zero
    non_target = ~F.one_hot(labels, num_classes).bool()

    def parts(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        log_all = torch.logsumexp(z, 1)
        others = z[non_target].view(n, num_classes - 1)
        log_others = torch.logsumexp(others, 1)
        log_target = z.gather(1, labels[:, None]).squeeze(1) - log_all  # log p_t
        return log_target, log_others - log_all, others - log_others[:, None]  # log p_t, log(1 - p_t), log p_hat

    t_target, t_rest, t_hat = parts(teacher)
    s_target, s_rest, s_hat = parts(student)
    tckd = t_target.exp() * (t_target - s_target) + t_rest.exp() * (t_rest - s_rest)
    nckd = _kl_rows(t_hat, s_hat)
    return tckd, nckd, t_rest.exp()


@dataclass
class Decomposition:
    """All the terms for one set of logits; ``kd == class_ + inner == tckd + nckd_weighted``."""

    kd: float
    class_: float  # L_class
    inner: float  # L_inner
    tckd: float  # mean TCKD
    nckd: float  # mean NCKD (unweighted, as DKD's loss uses it)
    nckd_weighted: float  # mean (1 - p_t^T) * NCKD
    spread_teacher: float  # D_T
    spread_student: float  # D_S

    def as_dict(self) -> dict[str, float]:
        out = asdict(self)
        out["class"] = out.pop("class_")
        return out


def decompose(teacher_logits: Tensor, student_logits: Tensor, labels: Tensor, temperature: float = 4.0) -> Decomposition:
    """Every term above for one set of logits (use float64 logits for reports)."""
    tckd, nckd, weight = dkd_terms(teacher_logits, student_logits, labels, temperature)
    return Decomposition(
        kd=float(kd_loss(teacher_logits, student_logits, temperature)),
        class_=float(class_similarity(teacher_logits, student_logits, labels, temperature)),
        inner=float(inner_class(teacher_logits, student_logits, labels, temperature)),
        tckd=float(tckd.mean()),
        nckd=float(nckd.mean()),
        nckd_weighted=float((weight * nckd).mean()),
        spread_teacher=float(spread(teacher_logits, labels, temperature)),
        spread_student=float(spread(student_logits, labels, temperature)),
    )
