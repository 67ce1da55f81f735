"""Image folders too big for memory (ImageNet, CUB-200-2011, any train/val tree), streamed from
disk: worker processes decode each JPEG with Pillow and apply the standard ImageNet transforms
(train: random-resized crop + horizontal flip; evaluation: resize the shorter side, then a
center crop), uint8 batches cross to the device and are normalised there.

Every random draw comes from a generator seeded by (seed, epoch, sample row), and the epoch's
order from (seed, epoch), so an epoch's batches do not depend on the number of workers, and
resume is exact, as with :class:`gapkd.data.loader.DeviceLoader`, whose interface this shares."""
from __future__ import annotations

import copy
import math
import os
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from ..core.errors import DataError
from .core import ImageData
from .loader import Batch, Normalizer, epoch_generator, shard_slice
from .views import ViewSpec, cached_logits, epoch_views, view_rng

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STREAM_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
DEFAULT_IMAGE_SIZE = 224
CUB_FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt")


# ---------------------------------------------------------------------------------
# Datasets as lists of files


@dataclass
class FileSplit:
    """One split as files: ``files`` the paths relative to ``root`` (a numpy bytes array, so worker
    processes share it without copying), ``labels`` int64, ``indices`` stable sample ids."""

    root: str
    files: np.ndarray
    labels: Tensor
    indices: Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, rows: Tensor) -> "FileSplit":
        return FileSplit(self.root, self.files[rows.numpy()], self.labels[rows], self.indices[rows])

    def path(self, row: int) -> str:
        return os.path.join(self.root, self.files[row].decode())


def file_split(root: Path, files: list[str], labels: list[int]) -> FileSplit:
    return FileSplit(str(root), np.array([f.encode() for f in files], dtype=bytes),
                     torch.tensor(labels, dtype=torch.int64), torch.arange(len(files)))


@dataclass
class FolderData(ImageData):
    """An :class:`ImageData` whose splits are :class:`FileSplit` s, decoded per batch by a
    :class:`StreamingLoader` at ``size`` x ``size`` pixels."""

    size: int = DEFAULT_IMAGE_SIZE

    @property
    def in_channels(self) -> int:
        return 3

    @property
    def image_size(self) -> int:
        return self.size


def _is_image(name: str) -> bool:
    return name.lower().endswith(STREAM_SUFFIXES)


#: set inside :func:`tolerate_layout_problems`: the held-out class folders unknown to train, noted there
_TOLERATED: ContextVar[list[dict] | None] = ContextVar("gapkd_tolerated_layout_problems", default=None)


@contextmanager
def tolerate_layout_problems() -> Iterator[list[dict]]:
    """Inside, the readers list a tree past the class problems that stop a run at start-up (an empty
    class, held-out class folders train lacks: those are left out and noted in the list this yields
    as ``{"folder", "class", "images"}``) so that `gapkd data check` reports them all at once."""
    token = _TOLERATED.set([])
    try:
        yield _TOLERATED.get()
    finally:
        _TOLERATED.reset(token)


def _tolerated() -> bool:
    return _TOLERATED.get() is not None


def scan_class_folders(split_dir: Path, classes: list[str] | None = None) -> tuple[list[str], list[str], list[int]]:
    """(classes, files relative to split_dir's parent, labels) of ``split_dir/<class>/<image>``.
    ``classes`` (from train) fixes the label numbering; otherwise the sorted folder names do."""
    with os.scandir(split_dir) as entries:
        entries = sorted(entries, key=lambda e: e.name)
        folders = [e.name for e in entries if e.is_dir()]
        loose = [e.name for e in entries if e.is_file() and _is_image(e.name)]
    if loose and not folders:
        raise DataError(
            f"{split_dir} holds {len(loose)} images directly (e.g. {loose[0]}) but no class folders; sort them into "
            f"{split_dir.name}/<class>/ (for ImageNet's flat val/, see docs/large-datasets.md)."
        )
    if not folders:
        raise DataError(f"{split_dir} has no class folders; lay it out as {split_dir.name}/<class>/<image>.")
    if classes is None:
        classes = folders
    index = {name: label for label, name in enumerate(classes)}
    unknown = [name for name in folders if name not in index]
    if unknown and not _tolerated():
        raise DataError(f"{split_dir}: classes {unknown[:5]} are not among the training classes; both splits need the same class folders.")
    files, labels = [], []
    for name in folders:
        with os.scandir(split_dir / name) as entries:
            images = sorted(e.name for e in entries if e.is_file() and _is_image(e.name))
        if name not in index:  # tolerated: noted, left out
            _TOLERATED.get().append({"folder": str(split_dir), "class": name, "images": len(images)})
            continue
        if not images and not _tolerated():
            raise DataError(f"{split_dir / name} holds no images ({', '.join(STREAM_SUFFIXES)}); remove the empty class folder.")
        files += [f"{split_dir.name}/{name}/{image}" for image in images]
        labels += [index[name]] * len(images)
    return classes, files, labels


def read_split_tree(root: Path, name: str, size: int, test_names: tuple[str, ...] = ("val", "test")) -> FolderData:
    """``root/train/<class>/*`` plus one of ``root/val/<class>/*`` or ``root/test/<class>/*`` (the
    split reported as test; validation is carved from train)."""
    root = Path(root).expanduser()
    if not (root / "train").is_dir():
        found = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
        raise DataError(
            f"{name}: {root / 'train'} is not a folder (found {found[:8] or 'nothing'} in {root}); lay the data out as "
            f"train/<class>/<image> and {'|'.join(test_names)}/<class>/<image>, and pass that folder as data.path."
        )
    present = [t for t in test_names if (root / t).is_dir()]
    if not present:
        raise DataError(f"{name}: {root} has train/ but no {' or '.join(t + '/' for t in test_names)} split to evaluate on.")
    if len(present) > 1:
        raise DataError(
            f"{name}: {root} has both {present[0]}/ and {present[1]}/. gapkd carves validation from train and reports "
            f"on one held-out split: keep only the one to report on (move {present[0]}/ into train/ or aside)."
        )
    classes, train_files, train_labels = scan_class_folders(root / "train")
    _, test_files, test_labels = scan_class_folders(root / present[0], classes)
    return FolderData(name, classes, file_split(root, train_files, train_labels), file_split(root, test_files, test_labels),
                      IMAGENET_MEAN, IMAGENET_STD, size)


def read_cub200(path: Path, size: int) -> FolderData:
    """CUB-200-2011 with its official split (``images/`` + images.txt, image_class_labels.txt,
    train_test_split.txt, classes.txt), or a plain train/ and val|test/ tree."""
    path = Path(path).expanduser()
    for candidate in (path, path / "CUB_200_2011"):
        if (candidate / "images").is_dir():
            return _read_cub_official(candidate, size)
    if (path / "train").is_dir():
        return read_split_tree(path, "cub200", size)
    raise DataError(
        f"cub200: {path} holds neither the official CUB_200_2011 layout (images/ with images.txt, image_class_labels.txt, "
        "train_test_split.txt, classes.txt) nor train/ and val|test/ class folders. Pass data.path=/path/to/CUB_200_2011."
    )


def _read_table(path: Path) -> dict[int, str]:
    """``<id> <value>`` lines (value may contain spaces) -> {id: value}."""
    table = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        key, _, value = line.strip().partition(" ")
        if not key.isdigit() or not value:
            raise DataError(f"{path} line {number} is not '<id> <value>': {line!r}; use the official file.")
        table[int(key)] = value.strip()
    return table


def _read_cub_official(folder: Path, size: int) -> FolderData:
    missing = [name for name in CUB_FILES if not (folder / name).is_file()]
    if missing:
        raise DataError(
            f"cub200: {folder} has images/ but not {', '.join(missing)}; these come with the official CUB_200_2011.tgz "
            "(extract it whole), or lay the images out as train/<class>/ and test/<class>/ instead."
        )
    images, labels, is_train, classes = (_read_table(folder / name) for name in CUB_FILES)
    for name, table in (("image_class_labels.txt", labels), ("train_test_split.txt", is_train)):
        if set(table) != set(images):
            raise DataError(f"cub200: {folder / name} does not list the same image ids as images.txt; use the official files.")
    class_names = [classes[k] for k in sorted(classes)]
    splits: dict[bool, tuple[list[str], list[int]]] = {True: ([], []), False: ([], [])}
    for image_id in sorted(images):
        label = int(labels[image_id]) - 1  # the files count classes from 1
        if not 0 <= label < len(class_names):
            raise DataError(f"cub200: image {image_id} has class {label + 1}, but classes.txt lists {len(class_names)}.")
        if is_train[image_id] not in ("0", "1"):
            raise DataError(f"cub200: train_test_split.txt marks image {image_id} {is_train[image_id]!r}; expected 0 or 1.")
        relative = f"images/{images[image_id]}"
        if not (folder / relative).is_file():
            raise DataError(f"cub200: {folder / relative} (listed in images.txt) is missing; extract the official archive again.")
        splits[is_train[image_id] == "1"][0].append(relative)
        splits[is_train[image_id] == "1"][1].append(label)
    for train, split in ((True, "train"), (False, "test")):
        empty = sorted(set(range(len(class_names))) - set(splits[train][1]))
        if empty and not _tolerated():
            raise DataError(f"cub200: the {split} split has no images of class {class_names[empty[0]]!r} (and {len(empty) - 1} more); check the split files.")
    return FolderData("cub200", class_names, file_split(folder, *splits[True]), file_split(folder, *splits[False]),
                      IMAGENET_MEAN, IMAGENET_STD, size)


# ---------------------------------------------------------------------------------
# Per-sample transforms (Pillow + numpy; run in the worker processes)


def random_resized_box(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
                       rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(left, top, width, height) of a crop covering a random fraction ``scale`` of the area with a
    log-uniform aspect ratio in ``ratio`` (the ImageNet 'Inception' crop): ten tries, then the
    whole image clamped to the ratio range, centred."""
    area = width * height
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_low, log_high))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    if width / height < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif width / height > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def center_crop(image, size: int, crop_fraction: float):
    """Resize the shorter side to round(size / crop_fraction), then take the central size x size."""
    from PIL import Image

    width, height = image.size
    short = round(size / crop_fraction)
    if width <= height:
        new_w, new_h = short, int(short * height / width)
    else:
        new_w, new_h = int(short * width / height), short
    image = image.resize((new_w, new_h), Image.BILINEAR)
    left, top = int(round((new_w - size) / 2)), int(round((new_h - size) / 2))
    return image.crop((left, top, left + size, top + size))


DECODE_ERRORS = (OSError, ValueError, SyntaxError)  # Pillow's UnidentifiedImageError is an OSError


def decode_rgb(path: str):
    """(the whole image decoded as RGB, its mode in the file): what the loader feeds the model."""
    from PIL import Image

    try:
        with Image.open(path) as opened:
            return opened.convert("RGB"), opened.mode
    except DECODE_ERRORS as error:
        raise DataError(f"{path} is not a readable image ({error}); remove or replace it.") from None


class ImageFiles(torch.utils.data.Dataset):
    """Row -> (uint8 HWC array, label, sample id), decoded and transformed for one epoch."""

    def __init__(self, split: FileSplit, size: int, *, train: bool, seed: int, epoch: int, scale, ratio, flip: bool,
                 crop_fraction: float, views: np.ndarray | None = None, view_seed: int = 0):
        self.split, self.size, self.train, self.seed, self.epoch = split, size, train, seed, epoch
        self.views, self.view_seed = views, view_seed  # fixed views (data.views): the view of each row this epoch
        self.scale, self.ratio, self.flip, self.crop_fraction = tuple(scale), tuple(ratio), flip, crop_fraction
        self.labels, self.indices = split.labels.numpy(), split.indices.numpy()

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, row: int) -> tuple[np.ndarray, int, int]:
        from PIL import Image

        image, _ = decode_rgb(self.split.path(row))
        if self.train:
            rng = np.random.default_rng([self.seed % 2**32, self.epoch, row]) if self.views is None else \
                view_rng(self.view_seed, int(self.indices[row]), int(self.views[row]))
            left, top, w, h = random_resized_box(*image.size, self.scale, self.ratio, rng)
            image = image.resize((self.size, self.size), Image.BILINEAR, box=(left, top, left + w, top + h))
            if self.flip and rng.random() < 0.5:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            image = center_crop(image, self.size, self.crop_fraction)
        return np.asarray(image), int(self.labels[row]), int(self.indices[row])


def collate(samples: list[tuple[np.ndarray, int, int]]) -> tuple[Tensor, Tensor, Tensor]:
    images = torch.from_numpy(np.stack([s[0] for s in samples]))
    return images, torch.tensor([s[1] for s in samples]), torch.tensor([s[2] for s in samples])


# ---------------------------------------------------------------------------------
# The loader


class StreamingLoader:
    """Iterates a :class:`FileSplit` in batches, as :class:`gapkd.data.loader.DeviceLoader` does an
    in-memory split: ``epoch(e)`` yields :class:`Batch` es of normalised float images on the device.
    ``train=True`` shuffles (order from (seed, epoch)) and augments; evaluation keeps file order.

    Data parallel: the sharding interface of DeviceLoader (``rank``, ``world_size``, :meth:`shard`):
    every rank draws the same permutation and takes its contiguous part of each global batch of
    ``batch_size`` samples (:func:`gapkd.data.loader.shard_slice`), weighted as DeviceLoader does."""

    def __init__(self, split: FileSplit, batch_size: int, normalizer: Normalizer, device: torch.device, *, train: bool,
                 size: int, seed: int = 0, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip: bool = True,
                 crop_fraction: float = 0.875, drop_last: bool = False, workers: int = 0, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        if batch_size < world_size:
            raise DataError(f"data.batch_size={batch_size} is smaller than the {world_size} processes sharing each batch.")
        self.split, self.batch_size, self.normalize, self.device = split, int(batch_size), normalizer, device
        self.train, self.size, self.seed = train, size, seed
        self.scale, self.ratio, self.flip, self.crop_fraction = scale, ratio, flip, crop_fraction
        self.drop_last = drop_last and len(split) >= batch_size
        self.workers, self.rank, self.world_size = workers, rank, world_size

    @property
    def num_samples(self) -> int:
        return len(self.split)

    def __len__(self) -> int:
        full, rest = divmod(self.num_samples, self.batch_size)
        # as DeviceLoader: a sharded training loader drops a last batch too small to give every process a sample
        keep_rest = rest and not self.drop_last and (rest >= self.world_size or not self.train)
        return full + (1 if keep_rest else 0)

    def shard(self, rank: int, world_size: int) -> "StreamingLoader":
        """This loader as process ``rank`` of ``world_size`` sees it (see DeviceLoader.shard)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        view = copy.copy(self)
        view.rank, view.world_size = int(rank), int(world_size)
        return view

    def batches(self, epoch: int) -> list[Tensor]:
        """The rows of each of this rank's batches in ``epoch``."""
        order = torch.randperm(self.num_samples, generator=epoch_generator(self.seed, epoch, torch.device("cpu"))) \
            if self.train else torch.arange(self.num_samples)
        globals_ = [order[start:start + self.batch_size] for start in range(0, len(self) * self.batch_size, self.batch_size)]
        return [rows[shard_slice(len(rows), self.rank, self.world_size)] for rows in globals_]

    def weights(self) -> list[float]:
        """Batch.weight of each batch: slice size x world size / global batch size (1 unsharded)."""
        sizes = [min(self.batch_size, self.num_samples - start) for start in range(0, len(self) * self.batch_size, self.batch_size)]
        return [len(range(*shard_slice(n, self.rank, self.world_size).indices(n))) * self.world_size / n
                if self.world_size > 1 else 1.0 for n in sizes]

    #: fixed augmented views (data.views; set by gapkd.data.views.fixed_view_loader) and the cached teacher logits
    views: ViewSpec | None = None
    teacher_logits: Tensor | None = None

    def epoch(self, epoch: int = 0) -> Iterator[Batch]:
        chosen = epoch_views(self.views.count, self.seed, self.split.indices, epoch) if self.train and self.views else None
        dataset = ImageFiles(self.split, self.size, train=self.train, seed=self.seed, epoch=epoch, scale=self.scale,
                             ratio=self.ratio, flip=self.flip, crop_fraction=self.crop_fraction,
                             views=chosen.numpy() if chosen is not None else None, view_seed=self.views.seed if self.views else 0)
        pin = self.device.type == "cuda"
        mine = [(rows, weight) for rows, weight in zip(self.batches(epoch), self.weights()) if len(rows)]  # eval slices may be empty
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=[rows.tolist() for rows, _ in mine], num_workers=self.workers,
            collate_fn=collate, pin_memory=pin,
        )
        try:
            for (images, labels, indices), (rows, weight) in zip(loader, mine):
                images = images.to(self.device, non_blocking=pin).permute(0, 3, 1, 2)  # NHWC -> NCHW view (channels_last strides)
                batch = Batch(self.normalize(images), labels.to(self.device, non_blocking=pin), indices.to(self.device, non_blocking=pin),
                              weight)
                if chosen is not None:
                    batch.views = chosen[rows].to(self.device)
                    batch.teacher_logits = cached_logits(self.teacher_logits, rows, chosen[rows], self.device)
                yield batch
        except DataError as error:  # from a worker, it comes back wrapped around the worker's traceback: keep the message
            raise DataError(str(error).strip().splitlines()[-1].split("DataError: ", 1)[-1]) from None

    def __iter__(self) -> Iterator[Batch]:
        return self.epoch(0)
