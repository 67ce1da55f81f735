"""The teacher-output cache: a frozen teacher's logits on every (training image, fixed view) — and on
the validation and test images — computed once in a batched inference pass and memory-mapped by
every run that shares the teacher, the data and the views (``data.views=K``, :mod:`gapkd.data.views`).

A cache is one folder ``<root>/<teacher>-<key>`` holding ``meta.json`` (the full key, the arrays'
shapes and sha256 checksums) and ``.npy`` arrays: ``train`` (N, K, C) float32 (or, with
``data.teacher_cache_topk=k``, ``train_values`` / ``train_index`` (N, K, k) and ``train_fill`` (N, K)),
``val`` and ``test`` (N, C). The key holds the teacher checkpoint's sha256, the dataset's fingerprint
(the bytes of every image, label and sample id of the splits), the view spec and augmentation, the
precision the teacher runs at (resolved amp, channels_last, device type, torch version), BN folding
and top-k. It is built in a temporary folder and renamed into place, so concurrent builders leave one
valid folder; a folder whose key or checksums do not match is rebuilt (with a one-line warning), never read.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from .core.errors import ConfigError
from .data.core import cache_dir

FORMAT = 1
META = "meta.json"


def cache_root(data_cfg) -> Path:
    """Where teacher caches live: data.teacher_cache_dir, else $GAPKD_CACHE/teacher-logits."""
    return Path(data_cfg.teacher_cache_dir).expanduser() if data_cfg.teacher_cache_dir else cache_dir() / "teacher-logits"


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _tensor_digest(digest, *tensors: Tensor) -> None:
    for tensor in tensors:
        array = tensor.detach().cpu().contiguous().numpy()
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(array.tobytes())


def dataset_fingerprint(bundle) -> str:
    """sha256 of what the cache's logits depend on in the data: every image (or file path), label and id
    of the training, validation and test splits as the run loads them."""
    digest = hashlib.sha256(bundle.data.name.encode())
    for loader in (bundle.train, bundle.val, bundle.test):
        if loader is None:
            digest.update(b"none")
        elif hasattr(loader, "images"):  # in memory
            _tensor_digest(digest, loader.images, loader.labels, loader.indices)
        else:  # streamed from files: their paths, labels and ids
            split = loader.split
            digest.update("\n".join(split.path(row) for row in range(len(split))).encode())
            _tensor_digest(digest, split.labels, split.indices)
    return digest.hexdigest()


def cache_key(cfg, bundle, device: torch.device, amp: str, channels_last: bool) -> dict:
    """Everything the cached logits depend on (see the module's docstring)."""
    from .data import is_streaming

    augment = cfg.data.augment
    if is_streaming(cfg.data.name):
        augmentation = {"size": bundle.data.image_size, "scale": list(augment.scale), "ratio": list(augment.ratio),
                        "flip": augment.flip, "eval_crop_fraction": augment.eval_crop_fraction}
    else:
        augmentation = {"crop_padding": augment.crop_padding, "flip": augment.flip}
    return {
        "format": FORMAT,
        "teacher": {"name": cfg.teacher.name, "options": cfg.teacher.options, "checkpoint_sha256": file_sha256(cfg.teacher.checkpoint)},
        "data": {"name": cfg.data.name, "fingerprint": dataset_fingerprint(bundle)},
        "views": {"count": cfg.data.views, "seed": cfg.data.view_seed, "augment": augmentation},
        "precision": {"amp": amp, "channels_last": channels_last, "device": device.type, "torch": torch.__version__},
        "fold_teacher_bn": cfg.train.fold_teacher_bn,
        "topk": cfg.data.teacher_cache_topk,
    }


def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


# ---------------------------------------------------------------------------------
# Reading


@dataclass
class LogitTable:
    """The training logits of a cache, (N, K, C) as stored or as top-k; :meth:`lookup` gathers a batch."""

    full: Tensor | None  # (N, K, C) float32, memory-mapped
    values: Tensor | None = None  # top-k: (N, K, k) float32
    index: Tensor | None = None  # top-k: (N, K, k) int32 class ids
    fill: Tensor | None = None  # top-k: (N, K) the logit of every class outside the top k
    num_classes: int = 0
    dtype: torch.dtype = torch.float32  # what the teacher's forward returns (bf16 under autocast): lookups give it back

    @property
    def shape(self) -> tuple[int, ...]:
        rows, views = (self.full if self.full is not None else self.fill).shape[:2]
        return rows, views, self.num_classes

    def to(self, device: torch.device) -> "LogitTable":
        """A copy on ``device`` (a GPU gathers its batches there, without a host round trip per step)."""
        move = lambda t: t.to(device) if t is not None else None  # noqa: E731
        return LogitTable(move(self.full), move(self.values), move(self.index), move(self.fill), self.num_classes, self.dtype)

    def lookup(self, rows: Tensor, views: Tensor, device: torch.device) -> Tensor:
        home = (self.full if self.full is not None else self.fill).device
        rows, views = rows.to(home), views.to(home)
        if self.full is not None:
            logits = self.full[rows, views]
        else:
            logits = self.fill[rows, views][:, None].repeat(1, self.num_classes)
            logits.scatter_(1, self.index[rows, views].long(), self.values[rows, views])
        return logits.to(device=device, dtype=self.dtype, non_blocking=True)


@dataclass
class TeacherCache:
    """An opened, verified cache folder."""

    folder: Path
    meta: dict
    train: LogitTable
    val: Tensor | None  # (N, C) float32
    test: Tensor


def _load(folder: Path, name: str) -> Tensor:
    # copy-on-write mapping: torch gets a writable view, the file is never written
    return torch.from_numpy(np.load(folder / f"{name}.npy", mmap_mode="c"))


def open_cache(folder: Path, key: dict) -> TeacherCache:
    """Open a cache folder after checking its key and every array's size and sha256; ValueError says why not."""
    meta_path = folder / META
    if not meta_path.is_file():
        raise ValueError("meta.json is missing")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"meta.json is unreadable ({error})") from None
    if meta.get("key") != key:
        raise ValueError("its key does not match this teacher, data, views or precision")
    for name, expected in meta["arrays"].items():
        path = folder / f"{name}.npy"
        if not path.is_file():
            raise ValueError(f"{path.name} is missing")
        if path.stat().st_size != expected["bytes"]:
            raise ValueError(f"{path.name} has {path.stat().st_size} bytes, not {expected['bytes']} (truncated?)")
        if file_sha256(path) != expected["sha256"]:
            raise ValueError(f"{path.name} fails its sha256 checksum (corrupted)")
    dtype = getattr(torch, meta["logits_dtype"])
    arrays = meta["arrays"]
    if "train" in arrays:
        train = LogitTable(_load(folder, "train"), num_classes=meta["num_classes"], dtype=dtype)
    else:
        train = LogitTable(None, _load(folder, "train_values"), _load(folder, "train_index"), _load(folder, "train_fill"),
                           num_classes=meta["num_classes"], dtype=dtype)
    val = _load(folder, "val") if "val" in arrays else None
    return TeacherCache(folder, meta, train, val, _load(folder, "test"))


def _discard(folder: Path) -> None:
    """Move a folder out of the way, then delete it (a reader never sees it half deleted)."""
    trash = folder.with_name(f".{folder.name}.trash-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        os.rename(folder, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


# ---------------------------------------------------------------------------------
# Building


def view_batches(loader, view: int, batch_size: int):
    """(rows, normalised images) of every training row at fixed view ``view``, in row order."""
    n = loader.num_samples
    if hasattr(loader, "view_images"):  # in memory (gapkd.data.views.ViewLoader)
        for start in range(0, n, batch_size):
            rows = torch.arange(start, min(start + batch_size, n), device=loader.device)
            yield rows, loader.normalize(loader.view_images(rows, torch.full_like(rows, view)))
        return
    from .data.streaming import ImageFiles, collate  # streamed: decode each image at this view in the workers

    dataset = ImageFiles(loader.split, loader.size, train=True, seed=loader.seed, epoch=0, scale=loader.scale, ratio=loader.ratio,
                         flip=loader.flip, crop_fraction=loader.crop_fraction, views=np.full(n, view), view_seed=loader.views.seed)
    batches = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=loader.workers, collate_fn=collate)
    start = 0
    for images, _, _ in batches:
        rows = torch.arange(start, start + images.shape[0])
        start += images.shape[0]
        yield rows, loader.normalize(images.to(loader.device).permute(0, 3, 1, 2))


def _topk_parts(logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """(values, class ids, fill) of the top-k approximation: the other C-k logits all get ``fill``, chosen so
    that at temperature 1 they share exactly the probability mass the top k leave over."""
    logits = logits.float()
    values, index = logits.topk(k, dim=1)
    rest = logits.shape[1] - k
    lse = torch.logsumexp(logits, dim=1)
    kept = torch.exp(values - lse[:, None]).sum(1)
    fill = lse + torch.log((1 - kept).clamp_min(1e-30) / max(rest, 1))
    return values, index.int(), fill


class _Writer:
    """Fills the .npy arrays of one cache in a temporary folder, then finalises meta.json."""

    def __init__(self, folder: Path):
        self.folder, self.arrays, self.shapes = folder, {}, {}

    def array(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        self.arrays[name] = np.lib.format.open_memmap(self.folder / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)
        return self.arrays[name]

    def finish(self, meta: dict) -> None:
        for array in self.arrays.values():
            array.flush()
        self.arrays.clear()
        meta["arrays"] = {}
        for path in sorted(self.folder.glob("*.npy")):
            with open(path, "rb+") as handle:
                os.fsync(handle.fileno())
            meta["arrays"][path.stem] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
        (self.folder / META).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")


@torch.inference_mode()
def build_cache(folder: Path, key: dict, teacher: torch.nn.Module, bundle, amp_ctx, batch_size: int,
                log: Callable[[str], None] = lambda message: None) -> None:
    """Run the frozen teacher once over every (training row, view) and the val/test splits and write the
    cache atomically to ``folder`` (another process that got there first wins; ours is discarded)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    try:
        writer = _Writer(temporary)
        loader, count, topk = bundle.train, key["views"]["count"], key["topk"]
        n, c = loader.num_samples, bundle.num_classes
        dtype = None

        def logits_of(images: Tensor) -> Tensor:
            nonlocal dtype
            with amp_ctx():
                out = teacher.forward_features(images).logits  # what Distiller.teacher_forward computes
            dtype = out.dtype
            return out.float().cpu()

        if topk is None:
            full = writer.array("train", (n, count, c), np.float32)
        else:
            values, index, fill = (writer.array("train_values", (n, count, topk), np.float32),
                                   writer.array("train_index", (n, count, topk), np.int32), writer.array("train_fill", (n, count), np.float32))
        for view in range(count):
            for rows, images in view_batches(loader, view, batch_size):
                logits, rows = logits_of(images), rows.cpu().numpy()
                if topk is None:
                    full[rows, view] = logits.numpy()
                else:
                    parts = _topk_parts(logits, topk)
                    values[rows, view], index[rows, view], fill[rows, view] = (p.numpy() for p in parts)
            log(f"teacher cache: view {view + 1}/{count} done")
        for name, split in (("val", bundle.val), ("test", bundle.test)):
            if split is None:
                continue
            out = writer.array(name, (split.num_samples, c), np.float32)
            start = 0
            for batch in split.epoch(0):
                logits = logits_of(batch.images)
                out[start:start + logits.shape[0]] = logits.numpy()
                start += logits.shape[0]
        writer.finish({"key": key, "num_classes": c, "logits_dtype": str(dtype).removeprefix("torch."), "rows": n})
        try:
            os.rename(temporary, folder)
        except OSError:  # another process renamed its complete cache into place first: keep that one
            if not (folder / META).is_file():
                raise
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)


def obtain(cfg, bundle, teacher: torch.nn.Module, device: torch.device, amp: str, channels_last: bool, amp_ctx,
           log: Callable[[str], None] = print) -> tuple[TeacherCache, str]:
    """The verified cache of this teacher, data and views, built first when missing or invalid.
    Returns it and how it was obtained: ``hit``, ``built`` or ``rebuilt`` (an invalid one was replaced)."""
    key = cache_key(cfg, bundle, device, amp, channels_last)
    folder = cache_root(cfg.data) / f"{cfg.teacher.name}-{key_hash(key)}"
    status = "built"
    if folder.exists():
        try:
            return open_cache(folder, key), "hit"
        except (ValueError, OSError) as problem:  # OSError: files removed under us by a process discarding it
            warnings.warn(f"teacher cache {folder} is not usable ({problem}); rebuilding it", stacklevel=2)
            _discard(folder)
            status = "rebuilt"
    log(f"teacher cache: computing {cfg.teacher.name}'s logits on {bundle.train.num_samples} images x {cfg.data.views} views "
        f"into {folder}")
    build_cache(folder, key, teacher, bundle, amp_ctx, max(cfg.data.eval_batch_size, cfg.data.batch_size), log)
    return open_cache(folder, key), status


def attach(cfg, bundle, distiller, device: torch.device, amp_ctx, log: Callable[[str], None] = print,
           dist=None) -> tuple[dict, TeacherCache | None]:
    """With data.views > 0 and a method that reads the teacher's logits, feed the training loader the cached
    logits (built once; shared by every run of the same teacher, data and views). Returns what happened
    (``{"teacher_cache": "hit" | "built" | "rebuilt" | "off"}``, for summary.json and ``gapkd study status``;
    empty when no cache applies) and the cache."""
    from .engine.runtime import resolve_amp, resolve_channels_last

    if cfg.data.views == 0 or distiller.teacher is None or not type(distiller).uses_teacher_cache():
        return {}, None
    if not cfg.data.teacher_cache:
        return {"teacher_cache": "off"}, None
    topk = cfg.data.teacher_cache_topk
    if topk is not None and topk >= bundle.num_classes:
        raise ConfigError(f"data.teacher_cache_topk={topk} keeps all {bundle.num_classes} classes of {cfg.data.name}: drop it "
                          f"(the full logits are cached) or set it below {bundle.num_classes}.")
    amp, channels_last = resolve_amp(device, cfg.train.amp), resolve_channels_last(device, cfg.train.amp, cfg.train.channels_last)
    if dist is not None and dist.enabled and not dist.is_main:
        dist.barrier()  # rank 0 builds it; the others open it
    started = time.perf_counter()
    cache, status = obtain(cfg, bundle, distiller.teacher, device, amp, channels_last, amp_ctx, log)
    seconds = time.perf_counter() - started
    if dist is not None and dist.enabled and dist.is_main:
        dist.barrier()
    if cache.train.shape[:2] != (bundle.train.num_samples, cfg.data.views):
        raise ValueError(f"teacher cache {cache.folder} holds {cache.train.shape[:2]} (rows, views), not "
                         f"{(bundle.train.num_samples, cfg.data.views)}")
    table = cache.train
    if device.type != "cpu" and _nbytes(table) <= DEVICE_TABLE_BYTES:
        table = table.to(device)
    bundle.train.teacher_logits = table
    return {"teacher_cache": status, "teacher_cache_dir": str(cache.folder), "teacher_cache_seconds": seconds}, cache


#: a table up to this size is copied to an accelerator; a larger one stays memory-mapped in host memory
DEVICE_TABLE_BYTES = 4 << 30


def _nbytes(table: LogitTable) -> int:
    return sum(t.numel() * t.element_size() for t in (table.full, table.values, table.index, table.fill) if t is not None)


def cached_accuracy(cache: TeacherCache, bundle) -> dict[str, float]:
    """The teacher's top-1 accuracy (%) on the test and validation splits from its cached logits."""
    out = {}
    for name, logits, loader in (("test", cache.test, bundle.test), ("val", cache.val, bundle.val)):
        if loader is None or logits is None:
            continue
        labels = loader.labels if hasattr(loader, "labels") else loader.split.labels
        out[f"teacher_{name}_acc"] = 100.0 * float((logits.argmax(1) == labels.cpu()).sum()) / max(len(labels), 1)
    return out
