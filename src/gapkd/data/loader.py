"""Whole-split loaders that keep uint8 images on the training device and augment in
batch there (random crop with padding, horizontal flip, normalisation): no per-sample
Python and no worker processes in the hot loop. Every random draw comes from a generator
seeded by (seed, epoch), so an epoch's batches are reproducible — which makes resume exact."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor

from .core import Split


@dataclass
class Batch:
    images: Tensor  # float, normalised, on the device
    labels: Tensor  # int64
    indices: Tensor  # stable sample ids (rows of the source split)


def epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed) * 1_000_003 + int(epoch))
    return generator


def random_crop(images: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """Zero-pad by ``padding`` and take one random crop of the original size per image."""
    if padding <= 0:
        return images
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n,), device=images.device, generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), device=images.device, generator=generator)
    rows = (dy[:, None] + torch.arange(h, device=images.device))[:, :, None]  # (n, h, 1)
    cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, :]  # (n, 1, w)
    batch = torch.arange(n, device=images.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


def random_flip(images: Tensor, generator: torch.Generator) -> Tensor:
    flip = torch.rand(images.shape[0], device=images.device, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(3), images)


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
    """Iterates one split in batches. ``train=True`` shuffles and augments; evaluation keeps order."""

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

    @property
    def num_samples(self) -> int:
        return int(self.labels.shape[0])

    def __len__(self) -> int:
        full, rest = divmod(self.num_samples, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def epoch(self, epoch: int = 0) -> Iterator[Batch]:
        generator = epoch_generator(self.seed, epoch, self.device)
        order = torch.randperm(self.num_samples, device=self.device, generator=generator) if self.train else None
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            rows = order[start:start + self.batch_size] if order is not None else slice(start, start + self.batch_size)
            images = self.images[rows]
            if self.train:
                images = random_crop(images, self.crop_padding, generator)
                if self.flip:
                    images = random_flip(images, generator)
            yield Batch(self.normalize(images), self.labels[rows], self.indices[rows])

    def __iter__(self) -> Iterator[Batch]:
        return self.epoch(0)
