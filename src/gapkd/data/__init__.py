"""Datasets (uint8 tensors + labels + class names + normalisation) and on-device loaders."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from ..errors import DataError
from ..registry import Registry
from .core import ImageData, Split, cache_dir, check_labels, resolve_data_root, stratified_holdout, subsample
from .loader import Batch, DeviceLoader, Normalizer
from . import sources

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


def load_dataset(cfg) -> ImageData:
    """Read the dataset a DataConfig names (from its root / path), checked for bad labels and shapes."""
    reader = DATASETS.get(cfg.name)
    return check_labels(reader(resolve_data_root(cfg.root), cfg))


@dataclass
class DataBundle:
    """The three loaders of a run plus the dataset facts models and methods need."""

    data: ImageData
    train: DeviceLoader
    val: DeviceLoader | None
    test: DeviceLoader

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


def build_data(cfg, device: torch.device, seed: int, channels_last: bool = False, data: ImageData | None = None) -> DataBundle:
    data = data if data is not None else load_dataset(cfg)
    train, val, test = split_data(data, cfg, seed)
    normalizer = Normalizer(data.mean, data.std, device, channels_last)
    make = lambda split, train_mode, batch: DeviceLoader(  # noqa: E731
        split, batch, normalizer, device, train=train_mode, seed=seed,
        crop_padding=cfg.augment.crop_padding, flip=cfg.augment.flip, drop_last=cfg.drop_last and train_mode,
    )
    return DataBundle(
        data=replace(data, train=train),
        train=make(train, True, cfg.batch_size),
        val=make(val, False, cfg.eval_batch_size) if len(val) else None,
        test=make(test, False, cfg.eval_batch_size),
    )


__all__ = [
    "DATASETS", "ImageData", "Split", "Batch", "DeviceLoader", "Normalizer", "DataBundle",
    "load_dataset", "build_data", "split_data", "resolve_data_root", "cache_dir", "stratified_holdout",
]
