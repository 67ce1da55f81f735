"""KD methods: every method is a :class:`Distiller` registered in :data:`METHODS`."""
from .base import METHODS, Distiller, StepInfo, StepOutput, TaskInfo, freeze, hparams, register_method
from .checkpoint import model_from_checkpoint
from . import ce, kd, dkd, dist, ctkd, logit_kd, fitnet, at, feature_kd, simkd, crd, reviewkd, aid, dfpt  # noqa: F401  (register)
from . import sp, cc, vid, rkd, pkt, nst, kdsvd  # noqa: F401  (register; issue 18 part A)
from . import ab, ft, fsp, ofd  # noqa: F401  (register; issue 18 part B)
from . import nkd, wttm, sdd, mlkd, dgkd  # noqa: F401  (register; issue 19)

__all__ = ["METHODS", "Distiller", "StepInfo", "StepOutput", "TaskInfo", "freeze", "hparams", "list_methods", "model_from_checkpoint",
           "register_method"]


def list_methods() -> list[str]:
    return METHODS.names()
