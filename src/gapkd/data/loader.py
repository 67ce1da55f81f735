"""Whole-split loaders that keep uint8 images on the training device and augment in
batch there (random crop with padding, horizontal flip, normalisation): no per-sample
Python and no worker processes in the hot loop. Every random draw comes from a generator
seeded by (seed, epoch), so an epoch's batches are reproducible — which makes resume exact.

Distributed training (DDP) uses :meth:`DeviceLoader.shard`: every process draws the same global
batches and augmentation and keeps only its slice, so the processes together see exactly the
batches a single process would."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor

from .core import Split
from .strong_augment import apply_strong, slice_draws, strong_draws, strong_generator


@dataclass
class Batch:
    images: Tensor  # float, normalised, on the device
    labels: Tensor  # int64
    indices: Tensor  # stable sample ids (rows of the source split)
    # weight of this process's loss so that averaging gradients over processes gives the gradient of
    # the global batch's mean loss: (samples in this slice) * world_size / (samples in the global batch)
    weight: float = 1.0
    # a second, strongly augmented view of the same samples (data.augment.strong), else None
    strong_images: Tensor | None = None
    views: Tensor | None = None  # with data.views=K: the fixed view (0..K-1) each sample shows (gapkd.data.views)
    teacher_logits: Tensor | None = None  # the frozen teacher's cached logits on exactly these views (gapkd.teacher_cache)


def epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed) * 1_000_003 + int(epoch))
    return generator


def random_crop(images: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """Zero-pad by ``padding`` and take one random crop of the original size per image."""
    if padding <= 0:
        return images
    return crop(images, padding, *crop_offsets(images.shape[0], padding, generator))


def crop_offsets(n: int, padding: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """The random (dy, dx) window offsets of :func:`random_crop` for ``n`` images."""
    dy = torch.randint(0, 2 * padding + 1, (n,), device=generator.device, generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), device=generator.device, generator=generator)
    return dy, dx


def crop(images: Tensor, padding: int, dy: Tensor, dx: Tensor) -> Tensor:
    """The window at offsets (dy, dx) of each zero-padded image."""
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    rows = (dy[:, None] + torch.arange(h, device=images.device))[:, :, None]  # (n, h, 1)
    cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, :]  # (n, 1, w)
    batch = torch.arange(n, device=images.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


def random_flip(images: Tensor, generator: torch.Generator) -> Tensor:
    return flip_where(images, flip_draws(images.shape[0], generator))


def flip_draws(n: int, generator: torch.Generator) -> Tensor:
    """Which of ``n`` images :func:`random_flip` mirrors."""
    return torch.rand(n, device=generator.device, generator=generator) < 0.5


def flip_where(images: Tensor, flip: Tensor) -> Tensor:
    return torch.where(flip[:, None, None, None], images.flip(3), images)


def shard_slice(n: int, rank: int, world_size: int) -> slice:
    """Rank ``rank``'s part of ``n`` rows split into ``world_size`` contiguous parts whose sizes
    differ by at most one (as ``torch.tensor_split``)."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


class Normalizer:
    """uint8 (N, C, H, W) -> float normalised, in the requested memory format."""

    def __init__(self, mean, std, device: torch.device, channels_last: bool = False):
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1) * 255
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, images: Tensor) -> Tensor:
        out = (images.float() - self.mean) / self.std
        return out.contiguous(memory_format=self.memory_format)


class DeviceLoader:
    """Iterates one split in batches. ``train=True`` shuffles and augments; evaluation keeps order.

    Sharding interface (what the engine's DDP needs from any loader): attributes ``rank`` and
    ``world_size`` and ``shard(rank, world_size)``, which returns a copy yielding only that
    process's slice of every global batch (see :meth:`shard`)."""

    rank: int = 0
    world_size: int = 1

    def __init__(
        self,
        split: Split,
        batch_size: int,
        normalizer: Normalizer,
        device: torch.device,
        *,
        train: bool,
        seed: int = 0,
        crop_padding: int = 0,
        flip: bool = False,
        drop_last: bool = False,
        strong: bool = False,
    ):
        self.images = split.images.to(device)
        self.labels = split.labels.to(device)
        self.indices = split.indices.to(device)
        self.batch_size = int(batch_size)
        self.normalize = normalizer
        self.device = device
        self.train = train
        self.seed = seed
        self.crop_padding = crop_padding
        self.flip = flip
        self.drop_last = drop_last and len(split) >= batch_size
        self.strong = strong and train  # also yield Batch.strong_images (see strong_view)

    @property
    def num_samples(self) -> int:
        return int(self.labels.shape[0])

    def __len__(self) -> int:
        full, rest = divmod(self.num_samples, self.batch_size)
        # a sharded training loader drops a last batch too small to give every process a sample
        keep_rest = rest and not self.drop_last and (rest >= self.world_size or not self.train)
        return full + (1 if keep_rest else 0)

    def shard(self, rank: int, world_size: int) -> "DeviceLoader":
        """This loader as process ``rank`` of ``world_size`` sees it (the data stays shared).

        Every process forms the same global batches of ``batch_size`` samples with the same
        shuffling and augmentation draws, then keeps its contiguous slice (sizes differ by at most
        one; :func:`shard_slice`). Every process therefore makes the same number of steps, the
        slices of a step are disjoint and together are exactly the unsharded batch, and
        ``Batch.weight`` makes the averaged gradient that of the global batch's mean loss.
        Training loaders drop a last batch with fewer samples than processes; evaluation loaders
        keep it, so a slice may then be empty."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        view = copy.copy(self)
        view.rank, view.world_size = int(rank), int(world_size)
        return view

    def epoch(self, epoch: int = 0) -> Iterator[Batch]:
        generator = epoch_generator(self.seed, epoch, self.device)
        order = torch.randperm(self.num_samples, device=self.device, generator=generator) if self.train else None
        strong_draw = strong_generator(self.seed, epoch, self.device) if self.strong else None
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            size = min(self.batch_size, self.num_samples - start)
            mine = shard_slice(size, self.rank, self.world_size)
            rows = order[start:start + size][mine] if order is not None else slice(start + mine.start, start + mine.stop)
            images = source = self.images[rows]
            if self.train:
                images = self.augment(images, rows, size, mine, generator, epoch)
            weight = (mine.stop - mine.start) * self.world_size / size if self.world_size > 1 else 1.0
            strong = self.normalize(self.strong_view(source, size, mine, strong_draw)) if self.strong else None
            yield self.annotate(Batch(self.normalize(images), self.labels[rows], self.indices[rows], weight, strong), rows, epoch)

    def augment(self, images: Tensor, rows, size: int, mine: slice, generator: torch.Generator, epoch: int) -> Tensor:
        """Random crop and flip, drawn for the whole global batch of ``size`` so that each slice gets its own part of them."""
        if self.crop_padding > 0:
            dy, dx = crop_offsets(size, self.crop_padding, generator)
            images = crop(images, self.crop_padding, dy[mine], dx[mine])
        if self.flip:
            images = flip_where(images, flip_draws(size, generator)[mine])
        return images

    def annotate(self, batch: Batch, rows, epoch: int) -> Batch:
        """What a subclass adds to a batch (the fixed views' ids and cached teacher logits: gapkd.data.views)."""
        return batch

    def strong_view(self, images: Tensor, size: int, mine: slice, generator: torch.Generator) -> Tensor:
        """The strong view of a (slice of a) global batch of ``size``: its own crop and flip, then RandAugment
        and Cutout (:mod:`.strong_augment`), drawn from ``generator`` (the strong view's own) for the whole global batch."""
        if self.crop_padding > 0:
            dy, dx = crop_offsets(size, self.crop_padding, generator)
            images = crop(images, self.crop_padding, dy[mine], dx[mine])
        if self.flip:
            images = flip_where(images, flip_draws(size, generator)[mine])
        return apply_strong(images, slice_draws(strong_draws(size, generator), mine))

    def __iter__(self) -> Iterator[Batch]:
        return self.epoch(0)
