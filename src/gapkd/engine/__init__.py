"""The one training loop, optimisers and schedules, checkpoints and run logging."""
from ..core.io import atomic_save, safe_load
from .trainer import FitResult, evaluate, fit

__all__ = ["FitResult", "atomic_save", "evaluate", "fit", "safe_load"]
