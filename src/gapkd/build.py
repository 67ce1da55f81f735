"""Models and distillers from a run's config: what :mod:`gapkd.api` builds before training or evaluating."""
from __future__ import annotations

import os

import torch

from .config import ModelConfig, RunConfig
from .data import DataBundle, ImageData
from .engine.runtime import Runtime
from .methods import METHODS, Distiller, TaskInfo
from .methods.checkpoint import model_from_checkpoint
from .models import create_model
from .models.fold import fold_batchnorm


def build_model(model_cfg: ModelConfig, data: ImageData, role: str) -> torch.nn.Module:
    """Create a zoo model sized for ``data`` and load its checkpoint when one is named (every weight
    but the classifier's with ``init_head=reset``: the classifier keeps its fresh initialisation)."""
    if not model_cfg.checkpoint:
        return create_model(model_cfg.name, num_classes=data.num_classes, in_channels=data.in_channels, **model_cfg.options)
    return model_from_checkpoint(model_cfg.checkpoint, data.num_classes, data.in_channels, name=model_cfg.name,
                                 options=model_cfg.options, role=role, reset_head=model_cfg.init_head == "reset", dataset=data.name)[0]


def load_model(checkpoint: str | os.PathLike, data: ImageData, model_name: str | None = None, role: str = "model") -> tuple[torch.nn.Module, str]:
    """A model from a checkpoint file and its architecture's name, read from the file (ours) or given by ``model_name``."""
    return model_from_checkpoint(checkpoint, data.num_classes, data.in_channels, name=model_name, role=role, dataset=data.name)


def build_distiller(cfg: RunConfig, data: ImageData, num_train: int | None = None) -> Distiller:
    """The configured method around its student and teacher. ``data.train`` must be the training
    split itself (``bundle.data``): memory banks such as CRD's are keyed by its sample ids."""
    method = METHODS.get(cfg.method.name)
    student = build_model(cfg.student, data, "student")
    teacher = build_model(cfg.teacher, data, "teacher") if cfg.teacher is not None and method.needs_teacher else None
    train = data.train
    if num_train is not None and num_train != len(train):
        raise ValueError(f"num_train={num_train} but data.train holds {len(train)} samples: pass bundle.data, the split trained on")
    task = TaskInfo(data.num_classes, data.in_channels, data.image_size, len(train), train.indices, train.labels)
    return method(student, teacher, task=task, **cfg.method.hparams)


def prepare_distiller(cfg: RunConfig, bundle: DataBundle, device: torch.device, runtime: Runtime | None = None) -> Distiller:
    """build_distiller, then made fast for training on ``device``: the frozen teacher's BatchNorm
    folded into its convs (train.fold_teacher_bn), channels_last memory format where it is on,
    and the training forward compiled with train.compile (``runtime``: resolved from cfg.train when not given)."""
    runtime = runtime or Runtime.from_train(cfg.train, device)
    distiller = build_distiller(cfg, bundle.data, bundle.train.num_samples)
    if distiller.teacher is not None and cfg.train.fold_teacher_bn:
        data = bundle.data
        fold_batchnorm(distiller.teacher, torch.randn(2, data.in_channels, data.image_size, data.image_size))
    distiller = runtime.place(distiller)
    if runtime.compile:
        distiller.compile(backend=runtime.compile, mode=runtime.compile_mode)  # the training step's forward: teacher, student and losses in one graph
    return distiller
