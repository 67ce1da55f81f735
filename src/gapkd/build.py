"""Models and distillers from a run's config: what :mod:`gapkd.api` builds before training or evaluating."""
from __future__ import annotations

import os
from typing import Any, Callable

import torch

from .config import ModelConfig, RunConfig
from .core.errors import ConfigError
from .data import DataBundle, ImageData
from .engine.runtime import Runtime
from .methods import METHODS, Distiller, TaskInfo
from .methods.checkpoint import model_from_checkpoint
from .models import create_model
from .models.fold import fold_batchnorm


def build_model(model_cfg: ModelConfig, data: ImageData, role: str) -> torch.nn.Module:
    """Create a zoo model sized for ``data`` and load its checkpoint when one is named (every weight
    but the classifier's with ``init_head=reset``: the classifier keeps its fresh initialisation).
    ``hf`` builds a Hugging Face model instead; ``input`` (a teacher's) adapts each batch to it."""
    probe = model_cfg.input.size if model_cfg.input is not None and model_cfg.input.size else data.image_size
    # with a checkpoint, the file gives a Hugging Face model's classifier: start from one of the data's size
    factory = _factory(data, role, probe, reset_hf_head=model_cfg.init_head == "reset" or bool(model_cfg.checkpoint))
    if not model_cfg.checkpoint:
        model = factory(model_cfg.name, model_cfg.options)
    else:
        model = model_from_checkpoint(model_cfg.checkpoint, data.num_classes, data.in_channels, name=model_cfg.name,
                                      options=model_cfg.options, role=role, reset_head=model_cfg.init_head == "reset",
                                      dataset=data.name, factory=factory)[0]
    if model_cfg.input is not None:
        from .teachers.input import adapt_input

        model = adapt_input(model, model_cfg.input, data)
    return model


def _factory(data: ImageData, role: str, probe: int, reset_hf_head: bool = True) -> Callable[[str, dict[str, Any]], torch.nn.Module]:
    """``factory(name, options)``: a zoo model for ``data``, or (name ``hf``, ``options.path``) a Hugging
    Face image classifier wrapped as a StagedNet, probed at ``probe`` pixels."""
    def factory(name: str, options: dict[str, Any]) -> torch.nn.Module:
        if name.lower() != "hf":
            return create_model(name, num_classes=data.num_classes, in_channels=data.in_channels, **options)
        from .teachers.hf import hf_model

        unknown = set(options) - {"path", "stages"}
        if unknown:
            raise ConfigError(f"{role}.options {sorted(unknown)}: a Hugging Face model takes only options.stages (how many "
                              "evenly spaced transformer blocks are its stages).")
        return hf_model(options["path"], data.num_classes, probe, role=role, stages=int(options.get("stages", 4)),
                        reset_head=reset_hf_head)

    return factory


def load_model(checkpoint: str | os.PathLike, data: ImageData, model_name: str | None = None, role: str = "model") -> tuple[torch.nn.Module, str]:
    """A model from a checkpoint file (``.pt``, ``.safetensors`` or ``zoo:SET/NAME``) and its architecture's
    name, read from the file (ours), the teacher catalogue (``zoo:``) or given by ``model_name``."""
    return model_from_checkpoint(checkpoint, data.num_classes, data.in_channels, name=model_name, role=role, dataset=data.name,
                                 factory=_factory(data, role, data.image_size))


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
