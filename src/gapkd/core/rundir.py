"""The run directory and the model checkpoint format, in one place.

A run writes ``config.yaml`` (the resolved config), ``env.json``, ``metrics.jsonl``, ``train.log``,
``teacher_acc.json`` (distillation runs), ``summary.json``, ``tensorboard/`` (train.tensorboard),
``export/`` (gapkd export) and ``checkpoints/{state,best,last}.pt``. :class:`RunDir` names every one
of them; nothing else spells these paths.

``best.pt`` and ``last.pt`` hold a self-describing *model payload* (``format: gapkd-model``): the
deployable weights plus what rebuilds them. :func:`model_payload` writes one and
:func:`read_model_payload` / :func:`is_model_payload` read one; ``state.pt`` is the loop's own
resume state (see :mod:`gapkd.engine.trainer`)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import CheckpointError
from .io import safe_load

#: the ``format`` key of a model payload
MODEL_FORMAT = "gapkd-model"
MODEL_FORMAT_VERSION = 1


class RunDir:
    """Every path of one run directory. Behaves as a path where one is expected (``os.fspath``, ``/``)."""

    CONFIG, ENV, METRICS, LOG, SUMMARY = "config.yaml", "env.json", "metrics.jsonl", "train.log", "summary.json"
    TEACHER_ACC, TENSORBOARD, EXPORT, CHECKPOINTS = "teacher_acc.json", "tensorboard", "export", "checkpoints"
    STATE = "state.pt"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @classmethod
    def for_config(cls, cfg) -> "RunDir":
        """Where a run writes: ``out_dir/name`` (the name defaults to one derived from the config and its hash)."""
        return cls(Path(cfg.out_dir) / (cfg.name or cfg.default_name()))

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config(self) -> Path:
        return self.path / self.CONFIG

    @property
    def env(self) -> Path:
        return self.path / self.ENV

    @property
    def metrics(self) -> Path:
        return self.path / self.METRICS

    @property
    def log(self) -> Path:
        return self.path / self.LOG

    @property
    def summary(self) -> Path:
        return self.path / self.SUMMARY

    @property
    def teacher_acc(self) -> Path:
        return self.path / self.TEACHER_ACC

    @property
    def tensorboard(self) -> Path:
        return self.path / self.TENSORBOARD

    @property
    def export_dir(self) -> Path:
        return self.path / self.EXPORT

    @property
    def checkpoints(self) -> Path:
        return self.path / self.CHECKPOINTS

    @property
    def state(self) -> Path:
        """The loop's resume state (optimiser, scheduler, history), rewritten every checkpoint_every epochs."""
        return self.checkpoints / self.STATE

    @property
    def best(self) -> Path:
        """The model payload of the best validation epoch."""
        return self.checkpoint("best")

    @property
    def last(self) -> Path:
        """The model payload of the last epoch."""
        return self.checkpoint("last")

    def checkpoint(self, which: str) -> Path:
        """``checkpoints/<which>.pt``: best, last, or a pipeline's own (eskd's best_within_e<N>)."""
        return self.checkpoints / f"{which}.pt"

    def read_summary(self) -> dict[str, Any] | None:
        """summary.json of a finished run, or None while it is not finished."""
        return json.loads(self.summary.read_text()) if self.summary.is_file() else None

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __truediv__(self, other: str | os.PathLike) -> Path:
        return self.path / other

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RunDir) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)


def model_payload(distiller, cfg, epoch: int, val_acc) -> dict[str, Any]:
    """The model payload of ``distiller`` (a :class:`~gapkd.methods.Distiller`) trained by ``cfg``:
    its deployable weights plus how to rebuild them (a deployable other than the plain student,
    e.g. SimKD's, also names the method that rebuilds it and that method's spec)."""
    student = cfg.student
    spec = distiller.deployable_spec()
    return {
        "format": MODEL_FORMAT,
        "version": MODEL_FORMAT_VERSION,
        "model": student.name,
        "options": dict(student.options),
        "num_classes": getattr(distiller.student, "num_classes", None),
        "in_channels": getattr(distiller.student, "in_channels", None),
        "method": cfg.method.name,
        "epoch": epoch,
        "val_acc": val_acc,
        "state_dict": {k: v.detach().cpu() for k, v in distiller.deployable().state_dict().items()},
        **({"deployable": {"method": cfg.method.name, "options": spec}} if spec is not None else {}),
    }


def is_model_payload(payload: Any) -> bool:
    """Whether a loaded checkpoint is our model payload (else: a foreign state dict)."""
    return isinstance(payload, dict) and payload.get("format") == MODEL_FORMAT


def read_model_payload(path: str | os.PathLike) -> dict[str, Any]:
    """The model payload in ``path`` (weights-only loading); a clear error when it is something else."""
    payload = safe_load(path)
    if not is_model_payload(payload):
        raise CheckpointError(f"{path} is not a gapkd model checkpoint (checkpoints/best.pt or last.pt of a run); "
                              "load foreign weights with gapkd.models.load_checkpoint(model, path).")
    return payload
