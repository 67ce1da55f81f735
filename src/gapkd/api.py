"""The Python API the CLI calls: build a run from a config, train it, evaluate checkpoints."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from .config import DataConfig, RunConfig, build_config
from .data import DataBundle, ImageData, build_data
from .engine import distributed
from .engine.checkpoint import safe_load
from .engine.runlog import environment, tensorboard_writer_class
from .engine.trainer import autocast_context, fit, resolve_channels_last
from .engine.trainer import evaluate as evaluate_heads  # `evaluate` below is the public checkpoint evaluation
from . import teacher_cache
from .errors import CheckpointError, ConfigError
from .methods import METHODS, Distiller, TaskInfo
from .models import create_model, extract_state_dict, load_state_dict_strict
from .models.fold import fold_batchnorm


def resolve_device(name: str) -> torch.device:
    """``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` as a torch device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but no CUDA device is available; use train.device=cpu (or auto).")
    return device


def build_model(model_cfg, data: ImageData, role: str) -> torch.nn.Module:
    """Create a zoo model sized for ``data`` and load its checkpoint when one is named (every weight
    but the classifier's with ``init_head=reset``: the classifier keeps its fresh initialisation)."""
    model = create_model(model_cfg.name, num_classes=data.num_classes, in_channels=data.in_channels, **model_cfg.options)
    if model_cfg.checkpoint:
        reset = model_cfg.init_head == "reset"
        source = f"{role} checkpoint {model_cfg.checkpoint}"
        if role == "teacher":
            fix = (f"a teacher must be trained for {data.name}: train one first, starting from this file (gapkd train -c <the "
                   f"teacher's recipe> student.name={model_cfg.name} student.checkpoint={model_cfg.checkpoint} student.init_head=reset).")
        else:
            fix = f"set {role}.init_head=reset to start from its other weights with a fresh {data.num_classes}-class classifier."
        payload = safe_load(model_cfg.checkpoint)
        if isinstance(payload, dict) and payload.get("format") == "gapkd-model":
            if payload.get("num_classes") not in (None, data.num_classes) and not reset:
                raise CheckpointError(
                    f"{source} was trained for {payload['num_classes']} classes but {data.name} has {data.num_classes}; {fix}"
                )
            if payload.get("model", model_cfg.name).lower() != model_cfg.name.lower():
                raise CheckpointError(
                    f"{role} checkpoint {model_cfg.checkpoint} holds a {payload['model']!r}, but {role}.name is "
                    f"{model_cfg.name!r}; set {role}.name={payload['model']}."
                )
            if payload.get("deployable"):  # the student wrapped by its method (SimKD: projector + teacher classifier)
                spec = payload["deployable"]
                if reset:
                    raise CheckpointError(
                        f"{source} is a {spec['method']} deployable model (the student wrapped with its method's parts), "
                        f"which {role}.init_head=reset cannot start from; use a plainly trained {model_cfg.name} checkpoint."
                    )
                model = METHODS.get(spec["method"]).rebuild_deployable(model, spec["options"])
        load_state_dict_strict(model, extract_state_dict(payload), source=source, reset_head=reset, head_hint=fix[0].upper() + fix[1:])
    return model


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


def prepare_distiller(cfg: RunConfig, bundle: DataBundle, device: torch.device) -> Distiller:
    """build_distiller, then made fast for training on ``device``: the frozen teacher's BatchNorm
    folded into its convs (train.fold_teacher_bn), channels_last memory format where it is on,
    and the training forward compiled with train.compile."""
    distiller = build_distiller(cfg, bundle.data, bundle.train.num_samples)
    if distiller.teacher is not None and cfg.train.fold_teacher_bn:
        data = bundle.data
        fold_batchnorm(distiller.teacher, torch.randn(2, data.in_channels, data.image_size, data.image_size))
    distiller = distiller.to(device)
    if resolve_channels_last(device, cfg.train.amp, cfg.train.channels_last):
        distiller = distiller.to(memory_format=torch.channels_last)
    if cfg.train.compile:
        backend = "inductor" if cfg.train.compile is True else cfg.train.compile
        mode = None if cfg.train.compile_mode == "default" else cfg.train.compile_mode
        distiller.compile(backend=backend, mode=mode)  # the training step's forward: teacher, student and losses in one graph
    return distiller


def run_dir_for(cfg: RunConfig) -> Path:
    """Where a run writes: ``out_dir/name`` (the name defaults to one derived from the config and its hash)."""
    return Path(cfg.out_dir) / (cfg.name or cfg.default_name())


def run(cfg: RunConfig, *, echo: bool = True, overwrite: bool = False, data: ImageData | None = None, on_epoch=None) -> dict[str, Any]:
    """Train (or distil) one run to completion, resuming it if it was interrupted; returns summary.json.
    ``on_epoch``: see :func:`gapkd.engine.trainer.fit` (pipelines keep extra checkpoints with it).
    Launched by torchrun, every process calls this; they train together (DDP) and rank 0 writes."""
    run_dir = run_dir_for(cfg)
    summary_path = run_dir / "summary.json"
    dist, device = distributed.setup(resolve_device(cfg.train.device))
    distributed.check_batch_size(cfg.data.batch_size, dist)
    main = dist.is_main
    echo = echo and main
    if overwrite and run_dir.exists() and main:
        shutil.rmtree(run_dir)
    dist.barrier()
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        if summary.get("config_hash") == cfg.hparams_hash():
            if echo:
                print(f"{run_dir} is already finished (pass --overwrite to run it again).")
            return summary
        raise ConfigError(f"{run_dir} holds a finished run with a different config; choose another run.name or pass --overwrite.")
    if cfg.train.tensorboard:
        tensorboard_writer_class()  # fail now, not after reading the data and measuring the teacher
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(cfg.seed)
    bundle = build_data(cfg.data, device, cfg.seed, resolve_channels_last(device, cfg.train.amp, cfg.train.channels_last), data=data)
    distiller = prepare_distiller(cfg, bundle, device)
    if dist.enabled:
        distributed.check_supported(distiller)  # before anything is written
    amp_ctx, _ = autocast_context(device, cfg.train.amp)
    # data.views > 0: the teacher's logits on every fixed view, computed once and shared (gapkd.teacher_cache)
    cache_info, cache = teacher_cache.attach(cfg, bundle, distiller, device, amp_ctx, log=print if echo else _quiet, dist=dist)
    hooks = [h for h in (on_epoch, _diagnostics_hook(cfg, distiller, bundle, amp_ctx)) if h is not None] if main else []
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
        env = environment(device)
        env["data"] = {"train": bundle.train.num_samples, "val": bundle.val.num_samples if bundle.val else 0,
                       "test": bundle.test.num_samples, "classes": bundle.num_classes}
        env["distributed"] = {"world_size": dist.world_size, "backend": dist.backend}
        (run_dir / "env.json").write_text(json.dumps(env, indent=2) + "\n")
    if distiller.teacher is not None and main:  # only rank 0 writes the summary that reports it
        cached = run_dir / "teacher_acc.json"  # measured once per run, not again on every resume
        if cached.exists():
            teacher_acc = json.loads(cached.read_text())
        else:
            teacher_acc = teacher_cache.cached_accuracy(cache, bundle) if cache else _teacher_accuracy(cfg, bundle, device, amp_ctx)
            cached.write_text(json.dumps(teacher_acc) + "\n")
    result = fit(distiller, bundle, cfg, run_dir, device, echo=echo, on_epoch=_chain(hooks), dist=dist)
    summary = result.summary
    if distiller.teacher is not None and main:
        summary.update(teacher_acc, **cache_info)
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    if dist.enabled:
        dist.barrier()
        summary = json.loads(summary_path.read_text())  # every process returns rank 0's summary
    return summary


def _quiet(message: str) -> None:
    pass


def _chain(hooks: list):
    """One on_epoch hook that runs several; each sees the keys the earlier ones added."""
    if not hooks:
        return None

    def on_epoch(distiller, epoch, record):
        extra: dict = {}
        for hook in hooks:
            extra.update(hook(distiller, epoch, {**record, **extra}) or {})
        return extra

    return on_epoch


def _diagnostics_hook(cfg: RunConfig, distiller: Distiller, bundle: DataBundle, amp_ctx):
    """train.diagnostics: the decomposition of teacher vs student on the validation split, each epoch."""
    if not cfg.train.diagnostics or distiller.teacher is None:
        return None
    if bundle.val is None:
        raise ConfigError("train.diagnostics logs on the validation split, and this run has none; set data.val_fraction>0 "
                          "or train.diagnostics=false.")
    from .analysis import decomposition_diagnostics

    temperature = getattr(distiller.hparams, "temperature", 4.0)
    return decomposition_diagnostics(distiller, bundle.val, temperature, amp_ctx)


def model_accuracy(model: torch.nn.Module, bundle: DataBundle, amp_ctx) -> dict[str, float]:
    """Top-1 accuracy (%) of a plain model on the test split and, when there is one, the validation split."""
    from .methods.ce import CrossEntropy

    probe = CrossEntropy(model).eval()
    out = {"test": evaluate_heads(probe, bundle.test, amp_ctx)["student"]}
    if bundle.val is not None:
        out["val"] = evaluate_heads(probe, bundle.val, amp_ctx)["student"]
    return out


def _teacher_accuracy(cfg: RunConfig, bundle: DataBundle, device: torch.device, amp_ctx) -> dict[str, float]:
    """The teacher's accuracy as it was trained: built afresh from its checkpoint (the distiller's copy
    may have its BatchNorm folded, which can move a bf16 prediction or two)."""
    teacher = build_model(cfg.teacher, bundle.data, "teacher").to(device).eval()
    if resolve_channels_last(device, cfg.train.amp, cfg.train.channels_last):
        teacher = teacher.to(memory_format=torch.channels_last)
    return {f"teacher_{split}_acc": value for split, value in model_accuracy(teacher, bundle, amp_ctx).items()}


def train(config: str | os.PathLike | None = None, overrides: list[str] | dict | None = None, **kwargs: Any) -> dict[str, Any]:
    """Train a model with labels only (a teacher, or a from-scratch baseline): `gapkd train`.

    Args:
        config: a YAML recipe (keys: data, student, method, optim, schedule, train, seed, name, out_dir).
        overrides: changes on top of it, as ``key=value`` strings (``["train.epochs=5"]``) or a
            nested dict (``{"train": {"epochs": 5}}``). The model trained is ``student``.
        **kwargs: passed to :func:`run`: ``echo`` (per-epoch lines, default True), ``overwrite``
            (delete an existing run directory of the same name first), ``data`` (an
            :class:`~gapkd.data.ImageData` to train on instead of ``data.name``).

    Returns:
        The run's summary.json: ``run`` (the run directory's name), ``best_val_acc``,
        ``test_acc_at_best_val``, ... The model is in ``<out_dir>/<run>/checkpoints/best.pt`` (best
        validation epoch) and ``last.pt``.

    Example:
        ```python
        summary = gapkd.train(overrides={"student": {"name": "resnet20"}, "data": {"name": "digits"},
                                         "train": {"epochs": 2}, "name": "teacher"})
        ```
    """
    cfg = build_config({"method": {"name": "ce"}}, config, overrides)
    return run(cfg, **kwargs)


def distill(config: str | os.PathLike | None = None, overrides: list[str] | dict | None = None, **kwargs: Any) -> dict[str, Any]:
    """Distil a student from a trained teacher with the method the config names (default kd): `gapkd distill`.

    Args:
        config: a YAML recipe; it names ``teacher`` (with its ``checkpoint``), ``student`` and ``method``.
        overrides: changes on top of it, as ``key=value`` strings or a nested dict; method
            hyper-parameters sit beside the method's name (``method.temperature=4``).
        **kwargs: as for :func:`train`.

    Returns:
        The run's summary.json, with the teacher's accuracy added (``teacher_val_acc``,
        ``teacher_test_acc``). The deployable student is in ``<out_dir>/<run>/checkpoints/best.pt``.

    Example:
        ```python
        gapkd.distill(overrides={"teacher": {"name": "resnet20", "checkpoint": "runs/teacher/checkpoints/best.pt"},
                                 "student": {"name": "resnet8"}, "method": {"name": "dkd"}, "data": {"name": "digits"}})
        ```
    """
    cfg = build_config({"method": {"name": "kd"}}, config, overrides)
    return run(cfg, **kwargs)


def load_model(checkpoint: str | os.PathLike, data: ImageData, model_name: str | None = None, role: str = "model") -> tuple[torch.nn.Module, str]:
    """A model from a checkpoint file and its architecture's name, read from the file (ours) or given by ``model_name``."""
    from .config import ModelConfig

    payload = safe_load(checkpoint)
    ours = isinstance(payload, dict) and payload.get("format") == "gapkd-model"
    name = model_name or (payload.get("model") if isinstance(payload, dict) else None)
    if not name:
        flag = "--model" if role == "model" else f"--{role}-model"
        raise ConfigError(f"{checkpoint} does not record its architecture; pass {flag} NAME.")
    options = payload.get("options", {}) if ours else {}
    return build_model(ModelConfig(name=name, checkpoint=str(checkpoint), options=options), data, role), name


def data_config(data: DataConfig | dict | list[str] | None = None, command: str = "this command") -> DataConfig:
    """A validated :class:`~gapkd.config.DataConfig` from a DataConfig, a dict of data keys
    (``{"name": "digits"}``) or ``data.key=value`` strings (what `gapkd eval` takes)."""
    from .config import merge, parse_overrides

    if isinstance(data, DataConfig):
        return data
    if isinstance(data, (list, tuple)):
        tree = parse_overrides(list(data))
        unknown = [k for k in tree if k != "data"]
        if unknown:
            raise ConfigError(f"{command} takes only data.* overrides, got {unknown}.")
        data = tree.get("data", {})
    try:
        return DataConfig.model_validate(merge({}, data or {}))
    except Exception as error:  # pydantic's message names the key
        raise ConfigError(f"bad data option: {error}") from None


def evaluate(checkpoint: str | os.PathLike, data: DataConfig | dict | list[str] | None = None, *, model: str | None = None, device: str = "auto",
             amp: str = "auto") -> dict:
    """Top-1 accuracy (%) of a model checkpoint on a dataset's validation and test splits (`gapkd eval`).

    Args:
        checkpoint: a checkpoint from `gapkd train`/`distill` (``RUN_DIR/checkpoints/best.pt``) or a
            foreign state dict (then name its architecture with ``model``).
        data: the dataset: a dict of data keys (``{"name": "cifar10-jpg", "path": "..."}``),
            ``data.key=value`` strings, or a :class:`~gapkd.config.DataConfig`; default digits.
        model: the architecture, when the checkpoint does not record it.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        amp: ``"auto"`` (bf16 on CUDA and on CPUs with native bf16), ``"off"``, ``"bf16"`` or ``"fp16"``, as train.amp.

    Returns:
        ``{"model", "checkpoint", "dataset", "val_acc" (when there is a validation split), "test_acc"}``.
    """
    return evaluate_checkpoint(checkpoint, data_config(data, "evaluate"), model, device, amp)


def check_data(data: DataConfig | dict | list[str] | None = None, *, workers: int | None = None, limit: int | None = None,
               seed: int = 0, echo: bool = False) -> dict:
    """Check a dataset before a long run (`gapkd data check`): what a run would read, read whole now.

    Streamed datasets (imagenet, cub200, image-folder-stream) are listed by the loader's own
    readers and every image is decoded whole as the loader decodes it; the decoded ones are loaded
    as a run loads them (tarballs of small images are decoded and cached, as a run does). Nothing
    else is written.

    Args:
        data: the dataset, as for :func:`evaluate`: a dict of data keys, ``data.key=value`` strings
            or a :class:`~gapkd.config.DataConfig`.
        workers: decoding processes (default ``data.workers``, else min(8, CPU cores)); 0 decodes here.
        limit: decode only this many images, drawn at random with ``seed``, for a quick pass
            (the counts per split and class still cover every file).
        seed: the seed of that sample.
        echo: print a progress line to stderr every 30 seconds while decoding.

    Returns:
        The report: ``splits`` (images, classes, per-class min/max/empty per split), ``carved``
        (the run's train/val/test sizes), ``class_lists_agree``, ``missing_in_test``, ``unknown_in_test``;
        for streamed data ``decode`` (``checked``, ``unreadable_count``, ``unreadable`` (the first 20, each
        with its error), ``converted_to_rgb`` (counts per mode, not errors), ``smallest``); for decoded
        data ``image_shape`` and ``label_range``; ``problems`` (one line each, with the fix) and ``ok``.
        Layout errors that stop the listing itself (no ``train/``, a missing file) raise
        :class:`~gapkd.errors.DataError` as a run would.
    """
    from .data.check import check_dataset

    return check_dataset(data_config(data, "check_data"), workers=workers, limit=limit, seed=seed, echo=echo)


def evaluate_checkpoint(checkpoint: str | os.PathLike, data_cfg, model_name: str | None = None, device: str = "auto",
                        amp: str = "auto") -> dict:
    """Accuracy of a model checkpoint on the validation and test splits of a dataset. ``amp`` as train.amp,
    with the memory format a run with that setting uses, so a run's own checkpoint scores what it logged."""
    torch_device = resolve_device(device)
    channels_last = resolve_channels_last(torch_device, amp)
    bundle = build_data(data_cfg, torch_device, 0, channels_last)
    model, name = load_model(checkpoint, bundle.data, model_name)
    model = model.to(torch_device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    amp_ctx, _ = autocast_context(torch_device, amp)
    accuracy = model_accuracy(model, bundle, amp_ctx)
    return {"model": name, "checkpoint": str(checkpoint), "dataset": data_cfg.name,
            **{f"{split}_acc": value for split, value in accuracy.items()}}


def analyze_checkpoints(teacher_checkpoint: str | os.PathLike, student_checkpoint: str | os.PathLike, data_cfg, split: str = "val", *,
                        teacher_model: str | None = None, student_model: str | None = None, temperature: float = 4.0,
                        device: str = "auto") -> dict:
    """`gapkd analyze`: decomposition, agreement, calibration and spreads of a teacher and a student on one split."""
    from .analysis import analyze_models

    if split not in ("val", "test"):
        raise ConfigError(f"split must be 'val' or 'test', got {split!r}.")
    torch_device = resolve_device(device)
    bundle = build_data(data_cfg, torch_device, 0)
    loader = bundle.val if split == "val" else bundle.test
    if loader is None:
        raise ConfigError("this dataset config holds out no validation split (data.val_fraction=0); use --split test.")
    teacher, teacher_name = load_model(teacher_checkpoint, bundle.data, teacher_model, "teacher")
    student, student_name = load_model(student_checkpoint, bundle.data, student_model, "student")
    amp_ctx, _ = autocast_context(torch_device, "auto")
    report = analyze_models(teacher.to(torch_device), student.to(torch_device), loader, temperature, amp_ctx=amp_ctx,
                            class_names=bundle.data.classes)
    header = {"teacher": teacher_name, "student": student_name, "teacher_checkpoint": str(teacher_checkpoint),
              "student_checkpoint": str(student_checkpoint), "dataset": data_cfg.name, "split": split}
    return {**header, **report}
