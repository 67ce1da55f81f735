"""The Python API the CLI calls: run a config (train or distil, resuming), evaluate and analyse
checkpoints, check data. Building models and distillers is :mod:`gapkd.build`; the run directory
is :class:`gapkd.core.rundir.RunDir`; the runtime (device, precision, memory format, compile) is
:class:`gapkd.engine.runtime.Runtime`, resolved once per run."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from . import teacher_cache
from .build import build_distiller, build_model, load_model, prepare_distiller  # noqa: F401  (part of this API)
from .config import DataConfig, RunConfig, build_config
from .core import distributed
from .core.errors import ConfigError
from .core.io import atomic_write_text
from .core.rundir import RunDir
from .core.runguard import RunLock, check_overwritable, read_json_or_none, remove_for_overwrite
from .data import DataBundle, ImageData, build_data, check_trainable
from .engine.runlog import environment, tensorboard_writer_class
from .engine.runtime import Runtime, resolve_device
from .engine.trainer import evaluate as evaluate_heads  # `evaluate` below is the public checkpoint evaluation
from .engine.trainer import fit
from .methods import Distiller
from .methods.checkpoint import model_from_checkpoint  # noqa: F401  (part of this API)

__all__ = ["Runtime", "analyze_checkpoints", "build_distiller", "build_model", "check_data", "data_config", "distill", "evaluate",
           "evaluate_checkpoint", "load_model", "model_accuracy", "model_from_checkpoint", "prepare_distiller", "resolve_device",
           "run", "run_dir_for", "train"]


def run_dir_for(cfg: RunConfig) -> Path:
    """Where a run writes: ``out_dir/name`` (the name defaults to one derived from the config and its hash)."""
    return RunDir.for_config(cfg).path


def run(cfg: RunConfig, *, echo: bool = True, overwrite: bool = False, data: ImageData | None = None, on_epoch=None) -> dict[str, Any]:
    """Train (or distil) one run to completion, resuming it if it was interrupted; returns summary.json.
    ``on_epoch``: see :func:`gapkd.engine.trainer.fit` (pipelines keep extra checkpoints with it).
    Launched by torchrun, every process calls this; they train together (DDP) and rank 0 writes."""
    rundir = RunDir.for_config(cfg)
    dist, device = distributed.setup(resolve_device(cfg.train.device))
    distributed.check_batch_size(cfg.data.batch_size, dist)
    main = dist.is_main
    echo = echo and main
    finished = _finished_summary(cfg, rundir, dist, overwrite, echo)
    if finished is not None:
        return finished
    _process_options(cfg)
    runtime = Runtime.from_train(cfg.train, device)
    bundle = build_data(cfg.data, device, cfg.seed, runtime.channels_last, data=data)
    check_trainable(bundle, cfg.data)
    distiller = prepare_distiller(cfg, bundle, device, runtime)
    if dist.enabled:
        distributed.check_supported(distiller)  # before anything is written
    # data.views > 0: the teacher's logits on every fixed view, computed once and shared (gapkd.teacher_cache)
    cache_info, cache = teacher_cache.attach(cfg, bundle, distiller, device, runtime.autocast, log=print if echo else _quiet, dist=dist)
    hooks = [h for h in (on_epoch, _diagnostics_hook(cfg, distiller, bundle, runtime.autocast)) if h is not None] if main else []
    teacher_acc = None
    if overwrite and main:
        check_overwritable(rundir.path, "run")  # before the lock file goes in
    # the data and the teacher are good: now this process takes the run directory (one process at a time)
    with RunLock(rundir.path) if main else contextlib.nullcontext():
        if overwrite and main:
            remove_for_overwrite(rundir.path, "run")  # only a gapkd run folder
        dist.barrier()
        if main:
            _write_run_files(cfg, rundir, bundle, dist, device)
            if distiller.teacher is not None:  # only rank 0 writes the summary that reports it
                teacher_acc = _cached_teacher_accuracy(cfg, rundir, bundle, runtime, cache)
        result = fit(distiller, bundle, cfg, rundir.path, device, echo=echo, on_epoch=_chain(hooks), dist=dist, runtime=runtime)
        summary = result.summary
        if teacher_acc is not None:
            summary.update(teacher_acc, **cache_info)
            atomic_write_text(rundir.summary, json.dumps(summary, indent=2) + "\n")
    if dist.enabled:
        dist.barrier()
        summary = rundir.read_summary()  # every process returns rank 0's summary
    return summary


def _finished_summary(cfg: RunConfig, rundir: RunDir, dist, overwrite: bool, echo: bool) -> dict | None:
    """The summary of this run when it is already finished (None with ``overwrite``)."""
    summary = None if overwrite else rundir.read_summary()  # --overwrite empties the folder later, once data and teacher check out
    if summary is None:
        return None
    if summary.get("config_hash") == cfg.hparams_hash():
        teacher_acc = read_json_or_none(rundir.teacher_acc)
        if teacher_acc and not set(teacher_acc) <= set(summary) and dist.is_main:  # killed between fit's summary and run's
            summary.update(teacher_acc)
            atomic_write_text(rundir.summary, json.dumps(summary, indent=2) + "\n")
        if echo:
            print(f"{rundir} is already finished (pass --overwrite to run it again).")
        return summary
    raise ConfigError(f"{rundir} holds a finished run with a different config; choose another run.name or pass --overwrite.")


def _process_options(cfg: RunConfig) -> None:
    """What train.* sets for the whole process: tensorboard checked early, threads, determinism, the seed."""
    if cfg.train.tensorboard:
        tensorboard_writer_class()  # fail now, not after reading the data and measuring the teacher
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(cfg.seed)


def _write_run_files(cfg: RunConfig, rundir: RunDir, bundle: DataBundle, dist, device: torch.device) -> None:
    """config.yaml (the resolved config) and env.json (versions, hardware, data sizes, processes)."""
    rundir.path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(rundir.config, cfg.to_yaml())
    env = environment(device)
    env["data"] = {"train": bundle.train.num_samples, "val": bundle.val.num_samples if bundle.val else 0,
                   "test": bundle.test.num_samples, "classes": bundle.num_classes}
    env["distributed"] = {"world_size": dist.world_size, "backend": dist.backend}
    atomic_write_text(rundir.env, json.dumps(env, indent=2) + "\n")


def _quiet(message: str) -> None:
    pass


def _cached_teacher_accuracy(cfg: RunConfig, rundir: RunDir, bundle: DataBundle, runtime: Runtime, cache=None) -> dict[str, float]:
    """The teacher's accuracy, measured once per run (teacher_acc.json), not again on every resume; from the
    teacher cache's val/test logits when the run has one (data.views > 0)."""
    cached = read_json_or_none(rundir.teacher_acc)  # None when absent, or torn by a version without atomic writes
    if cached is not None:
        return cached
    teacher_acc = teacher_cache.cached_accuracy(cache, bundle) if cache is not None else _teacher_accuracy(cfg, bundle, runtime)
    atomic_write_text(rundir.teacher_acc, json.dumps(teacher_acc) + "\n")
    return teacher_acc


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


def _teacher_accuracy(cfg: RunConfig, bundle: DataBundle, runtime: Runtime) -> dict[str, float]:
    """The teacher's accuracy as it was trained: built afresh from its checkpoint (the distiller's copy
    may have its BatchNorm folded, which can move a bf16 prediction or two)."""
    teacher = runtime.place(build_model(cfg.teacher, bundle.data, "teacher")).eval()
    return {f"teacher_{split}_acc": value for split, value in model_accuracy(teacher, bundle, runtime.autocast).items()}


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
        :class:`~gapkd.core.errors.DataError` as a run would.
    """
    from .data.check import check_dataset

    return check_dataset(data_config(data, "check_data"), workers=workers, limit=limit, seed=seed, echo=echo)


def evaluate_checkpoint(checkpoint: str | os.PathLike, data_cfg, model_name: str | None = None, device: str = "auto",
                        amp: str = "auto") -> dict:
    """Accuracy of a model checkpoint on the validation and test splits of a dataset. ``amp`` as train.amp,
    with the memory format a run with that setting uses, so a run's own checkpoint scores what it logged."""
    runtime = Runtime.resolve(device, amp)
    bundle = build_data(data_cfg, runtime.device, 0, runtime.channels_last)
    model, name = load_model(checkpoint, bundle.data, model_name)
    accuracy = model_accuracy(runtime.place(model), bundle, runtime.autocast)
    return {"model": name, "checkpoint": str(checkpoint), "dataset": data_cfg.name,
            **{f"{split}_acc": value for split, value in accuracy.items()}}


def analyze_checkpoints(teacher_checkpoint: str | os.PathLike, student_checkpoint: str | os.PathLike, data_cfg, split: str = "val", *,
                        teacher_model: str | None = None, student_model: str | None = None, temperature: float = 4.0,
                        device: str = "auto") -> dict:
    """`gapkd analyze`: decomposition, agreement, calibration and spreads of a teacher and a student on one split."""
    from .analysis import analyze_models

    if split not in ("val", "test"):
        raise ConfigError(f"split must be 'val' or 'test', got {split!r}.")
    runtime = Runtime.resolve(device, "auto", channels_last=False)
    bundle = build_data(data_cfg, runtime.device, 0)
    loader = bundle.val if split == "val" else bundle.test
    if loader is None:
        raise ConfigError("this dataset config holds out no validation split (data.val_fraction=0); use --split test.")
    teacher, teacher_name = load_model(teacher_checkpoint, bundle.data, teacher_model, "teacher")
    student, student_name = load_model(student_checkpoint, bundle.data, student_model, "student")
    report = analyze_models(runtime.place(teacher), runtime.place(student), loader, temperature, amp_ctx=runtime.autocast,
                            class_names=bundle.data.classes)
    header = {"teacher": teacher_name, "student": student_name, "teacher_checkpoint": str(teacher_checkpoint),
              "student_checkpoint": str(student_checkpoint), "dataset": data_cfg.name, "split": split}
    return {**header, **report}
