"""`gapkd export`: write a run's deployable model as ONNX or TorchScript, checked against PyTorch.

The deployable is what the run's method ships (``Distiller.deployable()``): the plain student for
most methods (DFPT-KD included), the student with its projector and the teacher's classifier for
SimKD. Its checkpoint (``checkpoints/best.pt`` or ``last.pt``) records how to rebuild it.

The exported file is written only after its outputs on real test images of the run's dataset
match PyTorch's within a tolerance; a sidecar ``<file>.json`` records the input shape, the
normalisation the model expects, the class names and the measured difference."""
from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from .core.errors import CheckpointError, ConfigError, GapkdError, suggest
from .core.rundir import RunDir

FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
CHECKPOINTS = ("best", "last")
#: what ONNX export and its check import; all come with ``pip install "gapkd[export]"``
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
#: weights above this many bytes go to an ONNX external-data file (protobuf refuses files over 2 GiB)
EXTERNAL_DATA_BYTES = 1 << 30


class ExportError(GapkdError):
    """An exported model whose outputs differ from PyTorch's, or an exporter failure."""


def export(run_dir: str | os.PathLike, format: str = "onnx", out: str | os.PathLike | None = None, *,
           checkpoint: str = "best", samples: int = 8, tolerance: float = 1e-3, data_root: str | None = None) -> dict[str, Any]:
    """Export a run's deployable model and check it against PyTorch on real inputs.

    Args:
        run_dir: a run directory (it holds ``config.yaml`` and ``checkpoints/{best,last}.pt``).
        format: ``"onnx"`` (needs ``pip install "gapkd[export]"``; checked with onnxruntime) or
            ``"torchscript"`` (traced at the run's image size; the batch size may vary).
        out: the file to write; default ``RUN_DIR/export/<checkpoint>.onnx`` or
            ``RUN_DIR/export/<checkpoint>.torchscript.pt``.
        checkpoint: ``"best"`` (best validation epoch) or ``"last"``.
        samples: how many test images of the run's dataset the check runs on (the export itself
            traces the first two, so the check also covers another batch size).
        tolerance: the largest max-abs difference of logits accepted.
        data_root: where the run's dataset is, when not where the run found it.

    Returns:
        What was written and measured: ``path``, ``metadata`` (the sidecar JSON's path),
        ``max_abs_diff``, ``samples``, ``format``, ``model``, ``method``, ``checkpoint``.

    Raises:
        ConfigError: an unknown format or checkpoint name, or not a run directory.
        CheckpointError: the checkpoint is missing.
        ExportError: the exported outputs differ from PyTorch's by more than ``tolerance``.
        GapkdError: an optional package ONNX export needs is missing.
    """
    from .build import load_model
    from .config import build_config
    from .core.rundir import read_model_payload
    from .data import build_data

    fmt, ckpt, cfg_path = _check_request(run_dir, format, checkpoint, samples)
    if fmt == "onnx":
        _require(ONNX_PACKAGES, "ONNX export")
    run = RunDir(run_dir)
    cfg = build_config(None, cfg_path, {"data": {"root": data_root}} if data_root else None)
    bundle = build_data(cfg.data, torch.device("cpu"), cfg.seed)
    images = _real_inputs(bundle, samples)
    model, name = load_model(ckpt, bundle.data, role="student")
    model = model.eval()
    with torch.no_grad():
        reference = model(images)
    target = Path(out) if out is not None else run.export_dir / f"{Path(ckpt).stem}{FORMATS[fmt]}"
    target.parent.mkdir(parents=True, exist_ok=True)
    # written into a scratch folder beside the target and moved into place only once it checks out
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".export-") as scratch:
        staged = Path(scratch) / target.name
        with _quiet_exporters():
            if fmt == "onnx":
                _export_onnx(model, images[:2], staged)
            else:
                _export_torchscript(model, images[:2], staged)
            outputs = _run_exported(fmt, staged, images)
        diff = float((outputs - reference).abs().max())
        if not diff <= tolerance:  # also refuses NaN
            raise ExportError(
                f"the {fmt} export of {ckpt} differs from PyTorch by up to {diff:.3g} on {len(images)} test images "
                f"(tolerance {tolerance:g}); nothing was written. Report it with the model's name ({name}), or "
                f"try the other format (--format {'torchscript' if fmt == 'onnx' else 'onnx'})."
            )
        for produced in Path(scratch).iterdir():  # the model file and, for large ONNX models, its .data file
            os.replace(produced, target.parent / produced.name)
    payload = read_model_payload(ckpt)
    data = bundle.data
    result = {
        "path": str(target), "metadata": str(target) + ".json", "format": fmt, "checkpoint": str(ckpt), "model": name,
        "method": cfg.method.name, "deployable": payload.get("deployable", {}).get("method", "student"),
        "epoch": payload.get("epoch"), "val_acc": payload.get("val_acc"), "samples": len(images),
        "max_abs_diff": diff, "tolerance": tolerance,
        "input": {"name": "images", "shape": ["batch", data.in_channels, data.image_size, data.image_size],
                  "dtype": "float32", "mean": list(data.mean), "std": list(data.std),
                  "preprocessing": "x = (uint8_image / 255 - mean) / std, per channel, NCHW"},
        "output": {"name": "logits", "shape": ["batch", data.num_classes]},
        "classes": list(data.classes),
    }
    Path(result["metadata"]).write_text(json.dumps(result, indent=2) + "\n")
    return result


def _check_request(run_dir, format: str, checkpoint: str, samples: int) -> tuple[str, Path, Path]:
    """The format, checkpoint file and config file of a request, or one clear error."""
    fmt = str(format).lower()
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}.{suggest(fmt, FORMATS)} Formats: {', '.join(FORMATS)}.")
    if checkpoint not in CHECKPOINTS:
        raise ConfigError(f"checkpoint must be 'best' or 'last', got {checkpoint!r}.")
    if samples < 1:
        raise ConfigError(f"samples must be at least 1, got {samples}.")
    run = RunDir(run_dir)
    cfg_path = run.config
    if not cfg_path.is_file():
        what = "does not exist" if not run.path.exists() else "holds no config.yaml"
        raise ConfigError(f"{run_dir} {what}, so it is not a gapkd run directory; pass the folder a `gapkd train` or "
                          "`gapkd distill` run wrote (e.g. runs/<name>).")
    ckpt = run.checkpoint(checkpoint)
    if not ckpt.is_file():
        raise CheckpointError(f"{ckpt} does not exist: the run has not finished an epoch yet"
                              + (" (or has not finished: last.pt is written at the end; use --checkpoint best)."
                                 if checkpoint == "last" else "."))
    return fmt, ckpt, cfg_path


def _require(packages: tuple[str, ...], what: str) -> None:
    missing = []
    for package in packages:
        try:
            importlib.import_module(package)
        except ImportError:
            missing.append(package)
    if missing:
        raise GapkdError(f"{what} needs {', '.join(packages)}; missing: {', '.join(missing)}. "
                         'Install them with: pip install "gapkd[export]"')


def _real_inputs(bundle, samples: int) -> torch.Tensor:
    """The first ``samples`` test images, normalised as the model saw them in training (at least two)."""
    images = []
    for batch in bundle.test:
        images.append(batch.images)
        if sum(len(i) for i in images) >= samples:
            break
    images = torch.cat(images)[:max(samples, 2)]
    if len(images) < 2:
        raise ConfigError("the run's test split holds fewer than two images; the export check needs two or more.")
    return images.contiguous()


@contextlib.contextmanager
def _quiet_exporters():
    """The exporters' progress lines and upstream deprecation notices (torch.jit is deprecated in
    favour of torch.export, which ONNX export already uses) are not the user's concern here."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._export")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    try:
        torch.onnx.export(model, (example,), str(path), input_names=["images"], output_names=["logits"],
                          dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, verbose=False,
                          external_data=size > EXTERNAL_DATA_BYTES)
    except Exception as error:  # the exporter's own errors are long; keep the first line and the fix
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ExportError(f"ONNX export failed: {first}. Try --format torchscript.") from error


def _export_torchscript(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    traced = torch.jit.trace(model, example, check_trace=False)  # checked below, on more images
    torch.jit.save(traced, str(path))


def _run_exported(fmt: str, path: Path, images: torch.Tensor) -> torch.Tensor:
    """The exported file's logits for ``images``, loaded back the way a deployment would load it."""
    if fmt == "onnx":
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(["logits"], {"images": images.numpy()})[0])
    loaded = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return loaded(images)
