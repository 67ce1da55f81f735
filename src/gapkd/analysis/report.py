"""Run a teacher and a student over one split and report how their predictions relate:
the KD-loss decomposition, top-1 agreement, calibration and inner-class spreads."""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import Tensor, nn

from ..methods.decomposition import decompose, spread_per_class
from .metrics import accuracy, expected_calibration_error, top1_agreement


@torch.inference_mode()
def collect_logits(model: nn.Module, loader, amp_ctx: Callable = contextlib.nullcontext) -> tuple[Tensor, Tensor]:
    """``model``'s logits over a whole split (in order) and the labels, as float64 / int64 on the CPU."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for batch in loader.epoch(0):
        with amp_ctx():
            logits.append(model(batch.images).double().cpu())
        labels.append(batch.labels.cpu())
    model.train(was_training)
    return torch.cat(logits), torch.cat(labels)


def compare_logits(teacher_logits: Tensor, student_logits: Tensor, labels: Tensor, temperature: float = 4.0,
                   bins: int = 15, class_names: list[str] | None = None) -> dict:
    """The whole report for one split, from the two models' logits (accuracies, agreement and ECE in %)."""
    teacher_logits, student_logits = teacher_logits.double(), student_logits.double()
    terms = decompose(teacher_logits, student_logits, labels, temperature).as_dict()
    counts = torch.bincount(labels, minlength=teacher_logits.shape[1])
    spread_t = spread_per_class(teacher_logits, labels, temperature)
    spread_s = spread_per_class(student_logits, labels, temperature)
    names = class_names or [str(c) for c in range(teacher_logits.shape[1])]
    return {
        "samples": int(labels.numel()),
        "temperature": temperature,
        "teacher_acc": accuracy(teacher_logits, labels),
        "student_acc": accuracy(student_logits, labels),
        "agreement": top1_agreement(teacher_logits, student_logits),
        "teacher_ece": expected_calibration_error(teacher_logits, labels, bins),
        "student_ece": expected_calibration_error(student_logits, labels, bins),
        **terms,
        "inner_share": terms["inner"] / terms["kd"] if terms["kd"] > 0 else 0.0,
        "per_class": [
            {"class": names[c], "samples": int(counts[c]), "spread_teacher": float(spread_t[c]), "spread_student": float(spread_s[c])}
            for c in range(len(names)) if counts[c] > 0
        ],
    }


def analyze_models(teacher: nn.Module, student: nn.Module, loader, temperature: float = 4.0, *,
                   amp_ctx: Callable = contextlib.nullcontext, class_names: list[str] | None = None) -> dict:
    """Run both models over ``loader`` (one split) and return :func:`compare_logits`' report."""
    teacher_logits, labels = collect_logits(teacher, loader, amp_ctx)
    student_logits, _ = collect_logits(student, loader, amp_ctx)
    return compare_logits(teacher_logits, student_logits, labels, temperature, class_names=class_names)


#: the rows of the terminal table: (key, label, format)
TABLE_ROWS = [
    ("samples", "samples", "{:d}"),
    ("teacher_acc", "teacher top-1 (%)", "{:.2f}"),
    ("student_acc", "student top-1 (%)", "{:.2f}"),
    ("agreement", "top-1 agreement (%)", "{:.2f}"),
    ("teacher_ece", "teacher ECE (%, 15 bins)", "{:.2f}"),
    ("student_ece", "student ECE (%, 15 bins)", "{:.2f}"),
    ("kd", "L_KD = KL(T||S) mean", "{:.5f}"),
    ("class", "  L_class (class-wise similarity)", "{:.5f}"),
    ("inner", "  L_inner (inner-class distribution)", "{:.5f}"),
    ("inner_share", "  L_inner / L_KD", "{:.3f}"),
    ("tckd", "DKD TCKD (mean)", "{:.5f}"),
    ("nckd", "DKD NCKD (mean, unweighted)", "{:.5f}"),
    ("nckd_weighted", "  (1 - p_t^T) * NCKD (mean)", "{:.5f}"),
    ("spread_teacher", "D_T teacher inner-class spread", "{:.5f}"),
    ("spread_student", "D_S student inner-class spread", "{:.5f}"),
]


def format_report(report: dict) -> str:
    """A plain two-column table of a report (the per-class spreads stay in the JSON)."""
    width = max(len(label) for _, label, _ in TABLE_ROWS)
    lines = [f"{label:<{width}}  {fmt.format(report[key])}" for key, label, fmt in TABLE_ROWS if key in report]
    return "\n".join(lines)


def decomposition_diagnostics(distiller: nn.Module, loader, temperature: float, amp_ctx: Callable = contextlib.nullcontext):
    """An ``on_epoch`` hook for the engine's fit(): the decomposition of the (frozen) teacher vs the
    deployable model on ``loader`` (the validation split), as ``diag/*`` metrics. The teacher's
    logits are computed once, here: it never changes."""
    teacher_logits, labels = collect_logits(distiller.teacher, loader, amp_ctx)

    def on_epoch(distiller, epoch: int, record: dict) -> dict[str, float]:
        student_logits, _ = collect_logits(distiller.deployable(), loader, amp_ctx)
        terms = decompose(teacher_logits, student_logits, labels, temperature).as_dict()
        out = {f"diag/{key}": value for key, value in terms.items()}
        out["diag/agreement"] = top1_agreement(teacher_logits, student_logits)
        return out

    return on_epoch
