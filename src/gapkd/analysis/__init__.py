"""Analysis of teacher-student pairs: KD-loss decompositions, agreement, calibration."""
from ..methods.decomposition import (
    Decomposition,
    class_similarity,
    decompose,
    dkd_terms,
    inner_class,
    kd_loss,
    spread,
    spread_per_class,
)
from .metrics import accuracy, expected_calibration_error, top1_agreement
from .report import analyze_models, collect_logits, compare_logits, decomposition_diagnostics, format_report

__all__ = [
    "Decomposition", "class_similarity", "decompose", "dkd_terms", "inner_class", "kd_loss", "spread", "spread_per_class",
    "accuracy", "expected_calibration_error", "top1_agreement",
    "analyze_models", "collect_logits", "compare_logits", "decomposition_diagnostics", "format_report",
]
