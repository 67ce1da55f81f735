"""gapkd: knowledge distillation across the teacher-student capacity gap."""
__version__ = "0.1.0"

from .api import distill, evaluate_checkpoint, run, train  # noqa: E402
from .config import RunConfig, build_config  # noqa: E402
from .models import create_model, list_models, load_checkpoint  # noqa: E402

__all__ = ["__version__", "train", "distill", "run", "evaluate_checkpoint", "RunConfig", "build_config", "create_model", "list_models", "load_checkpoint"]
