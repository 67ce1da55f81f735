"""gapkd: knowledge distillation across the teacher-student capacity gap.

The Python API mirrors the ``gapkd`` command: :func:`train`, :func:`distill`, :func:`evaluate`,
:func:`export`, :func:`check_data` (``gapkd data check``) and :class:`Study` (``gapkd study``)."""
__version__ = "0.1.0"

from .api import check_data, distill, evaluate, evaluate_checkpoint, run, train  # noqa: E402
from .config import RunConfig, build_config  # noqa: E402
from .deploy import export  # noqa: E402
from .models import create_model, list_models, load_checkpoint, wrap_model  # noqa: E402
from .study.study import Study  # noqa: E402

__all__ = ["__version__", "train", "distill", "evaluate", "export", "check_data", "Study", "run", "evaluate_checkpoint", "RunConfig",
           "build_config", "create_model", "list_models", "load_checkpoint", "wrap_model"]
