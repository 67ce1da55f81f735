"""gapkd: knowledge distillation across the teacher-student capacity gap.

The Python API mirrors the ``gapkd`` command: :func:`train`, :func:`distill`, :func:`evaluate`,
:func:`export`, :func:`check_data` (``gapkd data check``) and :class:`Study` (``gapkd study``)."""
from .api import check_data, distill, evaluate, evaluate_checkpoint, model_from_checkpoint, run, train
from .config import RunConfig, build_config
from .core.rundir import RunDir
from .core.version import __version__
from .deploy import export
from .models import create_model, list_models, load_checkpoint, wrap_model
from .study.study import Study

__all__ = ["__version__", "train", "distill", "evaluate", "export", "check_data", "Study", "run", "evaluate_checkpoint", "RunConfig",
           "RunDir", "build_config", "create_model", "list_models", "load_checkpoint", "model_from_checkpoint", "wrap_model"]
