"""Datasets as uint8 image tensors, labels, class names and normalisation statistics."""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..core.errors import DataError


@dataclass
class Split:
    """One split: ``images`` uint8 (N, C, H, W), ``labels`` int64 (N,), ``indices`` the row of
    each sample in its source split (stable ids, e.g. for CRD's memory bank)."""

    images: Tensor
    labels: Tensor
    indices: Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, rows: Tensor) -> "Split":
        return Split(self.images[rows], self.labels[rows], self.indices[rows])


@dataclass
class ImageData:
    """A whole dataset: train and test splits plus what a model needs to know about it."""

    name: str
    classes: list[str]
    train: Split
    test: Split
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return int(self.train.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train.images.shape[-1])


def make_split(images: np.ndarray, labels: np.ndarray) -> Split:
    """Build a Split from NHWC or NCHW (or NHW grey) uint8 arrays, checking what can go wrong."""
    images = np.asarray(images)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if images.dtype != np.uint8:
        raise DataError(f"images must be uint8, got {images.dtype}; scale them to 0..255 first.")
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise DataError(f"images must have shape (N, H, W), (N, H, W, C) or (N, C, H, W) with C 1 or 3; got {images.shape}.")
    if not images.flags.writeable:  # e.g. np.frombuffer views: torch needs writable memory
        images = images.copy()
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{images.shape[0]} images but {labels.shape[0]} labels: the files do not belong together.")
    return Split(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels), torch.arange(labels.shape[0]))


def check_labels(data: ImageData) -> ImageData:
    for split_name, split in (("train", data.train), ("test", data.test)):
        if len(split) == 0:
            raise DataError(f"the {split_name} split of {data.name!r} is empty; check the data folder.")
        low, high = int(split.labels.min()), int(split.labels.max())
        if low < 0 or high >= data.num_classes:
            raise DataError(
                f"{split_name} labels of {data.name!r} range over {low}..{high} but there are {data.num_classes} classes; "
                "labels must be 0..num_classes-1."
            )
    if not isinstance(data.train, Split):  # files streamed from disk: sized by their loader's transforms
        return data
    if data.train.images.shape[1:] != data.test.images.shape[1:]:
        raise DataError(
            f"train images are {tuple(data.train.images.shape[1:])} but test images {tuple(data.test.images.shape[1:])}; "
            "resize them to one size first."
        )
    return data


def channel_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (sample) std of uint8 images, in [0, 1] units, from exact histograms."""
    levels = torch.arange(256, dtype=torch.float64)
    means, stds = [], []
    for channel in range(images.shape[1]):
        histogram = torch.bincount(images[:, channel].reshape(-1), minlength=256).double()
        count = histogram.sum()
        mean = (histogram * levels).sum() / count
        var = (histogram * (levels - mean) ** 2).sum() / max(count - 1, 1)
        means.append(float(mean / 255))
        stds.append(float(var.sqrt() / 255))
    return tuple(means), tuple(stds)


def stratified_holdout(labels: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Split row numbers into (keep, held_out) with ``fraction`` of each class held out,
    deterministically from ``seed``. Both are sorted; they are disjoint and cover all rows."""
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"a held-out fraction must be in [0, 1), got {fraction}.")
    generator = torch.Generator().manual_seed(int(seed))
    held = []
    for cls in torch.unique(labels).tolist():
        rows = torch.nonzero(labels == cls).flatten()
        rows = rows[torch.randperm(rows.numel(), generator=generator)]
        held.append(rows[: int(round(fraction * rows.numel()))])
    held_out = torch.sort(torch.cat(held)).values if held else torch.zeros(0, dtype=torch.long)
    mask = torch.ones(labels.numel(), dtype=torch.bool)
    mask[held_out] = False
    return torch.nonzero(mask).flatten(), held_out


def subsample(split: Split, count: int | None, seed: int) -> Split:
    """A class-stratified random subset of ``count`` samples (all when None)."""
    if count is None or count >= len(split):
        return split
    if count < 1:
        raise DataError(f"a subset must keep at least 1 sample, got {count}.")
    _, kept = stratified_holdout(split.labels, count / len(split), seed)
    return split.take(kept)


def resolve_data_root(root: str | os.PathLike | None = None) -> Path:
    """The data root: the explicit argument, then $GAPKD_DATA, then ~/.cache/gapkd/data."""
    if root:
        return Path(root).expanduser()
    if os.environ.get("GAPKD_DATA"):
        return Path(os.environ["GAPKD_DATA"]).expanduser()
    return cache_dir() / "data"


def cache_dir() -> Path:
    """Where decoded datasets are cached: $GAPKD_CACHE, else ~/.cache/gapkd."""
    return Path(os.environ.get("GAPKD_CACHE") or Path.home() / ".cache" / "gapkd").expanduser()


def with_name(data: ImageData, name: str) -> ImageData:
    return replace(data, name=name)
