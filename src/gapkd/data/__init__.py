"""Datasets (uint8 tensors + labels + class names + normalisation) and on-device loaders."""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from ..core.errors import ConfigError, DataError
from ..core.registry import Registry
from . import sources, streaming, views
from .core import ImageData, Split, cache_dir, check_labels, resolve_data_root, stratified_holdout, subsample
from .loader import Batch, DeviceLoader, Normalizer
from .streaming import DEFAULT_IMAGE_SIZE, FileSplit, FolderData, StreamingLoader

#: name -> reader(root: Path, config: DataConfig) -> ImageData
DATASETS: Registry[Callable[..., ImageData]] = Registry("dataset")

CIFAR10_JPG_SHA256 = "45b041e867f5a40f79bfde38d3dd1fd511103d50068c1afecf6445e25234d4db"
CIFAR10_JPG_FILE = "cifar10-jpg-q75.tar.gz"


@DATASETS.register("cifar10", "cifar-10")
def _cifar10(root: Path, cfg) -> ImageData:
    return sources.read_cifar("cifar10", root, verify=cfg.verify, allow_download=cfg.download)


@DATASETS.register("cifar100", "cifar-100")
def _cifar100(root: Path, cfg) -> ImageData:
    return sources.read_cifar("cifar100", root, verify=cfg.verify, allow_download=cfg.download)


@DATASETS.register("mnist")
def _mnist(root: Path, cfg) -> ImageData:
    return sources.read_mnist("mnist", root, verify=cfg.verify, allow_download=cfg.download)


@DATASETS.register("fashion-mnist", "fashion_mnist", "fmnist")
def _fashion(root: Path, cfg) -> ImageData:
    return sources.read_mnist("fashion-mnist", root, verify=cfg.verify, allow_download=cfg.download)


@DATASETS.register("digits")
def _digits(root: Path, cfg) -> ImageData:
    return sources.read_digits()


@DATASETS.register("cifar10-jpg", "cifar10_jpg")
def _cifar10_jpg(root: Path, cfg) -> ImageData:
    """The lossy JPEG copy of CIFAR-10 (50k/10k) packed as one tarball."""
    if cfg.path:
        path = Path(cfg.path).expanduser()
    else:
        candidates = [root / CIFAR10_JPG_FILE, root / "cifar10-jpg" / CIFAR10_JPG_FILE]
        path = next((c for c in candidates if c.exists()), None)
        if path is None:
            raise DataError(
                f"cifar10-jpg: {CIFAR10_JPG_FILE} is not in {candidates[0].parent} or {candidates[1].parent}. "
                "Pass data.path=/path/to/cifar10-jpg-q75.tar.gz, or point --data-root / GAPKD_DATA at its folder."
            )
    return sources.read_image_tree(path, "cifar10-jpg", sha256=CIFAR10_JPG_SHA256 if cfg.verify else None)


@DATASETS.register("image-folder", "imagefolder", "image-tar")
def _image_folder(root: Path, cfg) -> ImageData:
    """Any folder or tarball of equally sized small images laid out split/class/file."""
    if not cfg.path:
        raise DataError("image-folder needs data.path=FOLDER_OR_TARBALL (laid out train/<class>/*.jpg, test/<class>/*.jpg).")
    return sources.read_image_tree(Path(cfg.path), Path(cfg.path).name)


# Too big for memory: streamed from disk by worker processes (gapkd.data.streaming)
STREAMING_DATASETS = ("imagenet", "cub200", "image-folder-stream")


@DATASETS.register("imagenet", "ilsvrc2012", "imagenet-1k")
def _imagenet(root: Path, cfg) -> FolderData:
    """ImageNet-1k streamed from train/<wnid>/*.JPEG and val/<wnid>/*.JPEG (val reported as test)."""
    path = Path(cfg.path).expanduser() if cfg.path else root / "imagenet"
    return streaming.read_split_tree(path, "imagenet", cfg.image_size or DEFAULT_IMAGE_SIZE, test_names=("val",))


@DATASETS.register("cub200", "cub-200", "cub-200-2011", "cub_200_2011")
def _cub200(root: Path, cfg) -> FolderData:
    """CUB-200-2011 streamed with its official train/test split (or from train/ and val|test/ folders)."""
    path = Path(cfg.path).expanduser() if cfg.path else root / "CUB_200_2011"
    return streaming.read_cub200(path, cfg.image_size or DEFAULT_IMAGE_SIZE)


@DATASETS.register("image-folder-stream", "imagefolder-stream")
def _image_folder_stream(root: Path, cfg) -> FolderData:
    """Any folder of images of any size laid out train/<class>/ and val|test/<class>/, streamed."""
    if not cfg.path:
        raise DataError("image-folder-stream needs data.path=FOLDER (laid out train/<class>/*.jpg and val/<class>/*.jpg or test/<class>/*.jpg).")
    return streaming.read_split_tree(Path(cfg.path), Path(cfg.path).name, cfg.image_size or DEFAULT_IMAGE_SIZE)


def is_streaming(name: str) -> bool:
    return DATASETS.canonical(name) in STREAMING_DATASETS


def load_dataset(cfg) -> ImageData:
    """Read the dataset a DataConfig names (from its root / path), checked for bad labels and shapes."""
    reader = DATASETS.get(cfg.name)
    if cfg.image_size is not None and not is_streaming(cfg.name):
        raise ConfigError(
            f"data.image_size applies to the streaming datasets ({', '.join(STREAMING_DATASETS)}); {cfg.name!r} is decoded "
            "once at its own size. Remove data.image_size (or use image-folder-stream for a folder of larger images)."
        )
    return check_labels(reader(resolve_data_root(cfg.root), cfg))


@dataclass
class DataBundle:
    """The three loaders of a run plus the dataset facts models and methods need."""

    data: ImageData
    train: DeviceLoader | StreamingLoader
    val: DeviceLoader | StreamingLoader | None
    test: DeviceLoader | StreamingLoader

    @property
    def num_classes(self) -> int:
        return self.data.num_classes


def split_data(data: ImageData, cfg, seed: int) -> tuple[Split, Split, Split]:
    """train / validation (carved from train, stratified, fixed split seed) / test."""
    keep, held = stratified_holdout(data.train.labels, cfg.val_fraction, cfg.split_seed)
    train, val = data.train.take(keep), data.train.take(held)
    train = subsample(train, cfg.train_subset, cfg.split_seed)
    if cfg.train_subset is not None and len(val):
        val = subsample(val, max(1, int(round(cfg.train_subset * cfg.val_fraction / (1 - cfg.val_fraction)))), cfg.split_seed)
    test = subsample(data.test, cfg.test_subset, cfg.split_seed)
    if len(train) == 0:
        raise DataError("the training split is empty; lower data.val_fraction or raise data.train_subset.")
    return train, val, test


def check_trainable(bundle: "DataBundle", cfg) -> None:
    """Refuse the splits a run would train on silently wrong: no validation split where one was asked
    for (nothing to select on; test accuracy would stand in for it), or a single class to learn."""
    train, num_classes = bundle.data.train, bundle.num_classes
    if cfg.val_fraction > 0 and bundle.val is None:  # else the run would select on nothing and log test accuracy as val
        raise DataError(
            f"data.val_fraction={cfg.val_fraction:g} leaves no validation image"
            + (f" of data.train_subset={cfg.train_subset}" if cfg.train_subset is not None else "")
            + f" ({num_classes} classes, each rounded down to none); raise data.train_subset or data.val_fraction, "
            "or set data.val_fraction=0 to train without a validation split (the last epoch is reported)."
        )
    if len(torch.unique(train.labels)) < 2:
        raise DataError(f"the training split holds a single class ({len(train)} images); a classifier needs at least two: "
                        "raise data.train_subset or check the data.")


def build_data(cfg, device: torch.device, seed: int, channels_last: bool = False, data: ImageData | None = None) -> DataBundle:
    data = data if data is not None else load_dataset(cfg)
    train, val, test = split_data(data, cfg, seed)
    normalizer = Normalizer(data.mean, data.std, device, channels_last)
    if isinstance(data, FolderData):
        if cfg.augment.strong:
            raise DataError(f"data.augment.strong (a strongly augmented second view, batched on the device) works with in-memory "
                            f"datasets; {cfg.name} streams from disk. Drop data.augment.strong, or use a method without a strong view.")
        augment, workers = cfg.augment, cfg.workers if cfg.workers is not None else min(8, os.cpu_count() or 1)
        make = lambda split, train_mode, batch: StreamingLoader(  # noqa: E731
            split, batch, normalizer, device, train=train_mode, size=data.image_size, seed=seed, scale=augment.scale,
            ratio=augment.ratio, flip=augment.flip, crop_fraction=augment.eval_crop_fraction,
            drop_last=cfg.drop_last and train_mode, workers=workers,
        )
    else:
        make = lambda split, train_mode, batch: DeviceLoader(  # noqa: E731
            split, batch, normalizer, device, train=train_mode, seed=seed,
            crop_padding=cfg.augment.crop_padding, flip=cfg.augment.flip, drop_last=cfg.drop_last and train_mode,
            strong=cfg.augment.strong,
        )
    if cfg.views > 0:  # fixed augmented views (gapkd.data.views)
        make_train = views.fixed_view_loader(cfg, train, normalizer, device, seed, make, streamed=isinstance(data, FolderData))
    else:
        make_train = make(train, True, cfg.batch_size)
    return DataBundle(
        data=replace(data, train=train),
        train=make_train,
        val=make(val, False, cfg.eval_batch_size) if len(val) else None,
        test=make(test, False, cfg.eval_batch_size),
    )


__all__ = [
    "DATASETS", "ImageData", "Split", "Batch", "DeviceLoader", "Normalizer", "DataBundle",
    "FileSplit", "FolderData", "StreamingLoader", "STREAMING_DATASETS", "is_streaming",
    "load_dataset", "build_data", "split_data", "check_trainable", "resolve_data_root", "cache_dir", "stratified_holdout",
]
