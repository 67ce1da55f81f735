"""Fixed augmented views (``data.views=K``): each training image has K augmentations whose
parameters — crop offsets and flip flag (random-resized crop box and flip when streaming) — are a
pure function of (``data.view_seed``, sample id, view index), not fresh draws. Each epoch shows
every image one of its K views; the run's seed orders them (every view once per K epochs, in a
seed-dependent order per image), so runs of different seeds still see different streams while a
frozen teacher's output on every (image, view) can be computed once (:mod:`gapkd.teacher_cache`).

The parameters come from a counter-based hash (splitmix64) of integer keys, so the in-memory loader
(whole tables at once) and the streaming workers (one sample at a time) compute the same views, and
they depend neither on the batch nor on which other samples are in the split."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .loader import Batch, DeviceLoader, crop, flip_where

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix(x: np.ndarray) -> np.ndarray:
    x = (x + _GOLDEN).astype(np.uint64)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def mix(*keys) -> np.ndarray:
    """A 64-bit hash of integer keys (scalars or broadcastable arrays), uniform and reproducible."""
    with np.errstate(over="ignore"):
        state = np.zeros((), dtype=np.uint64)
        for key in keys:
            state = _splitmix(state ^ (np.asarray(key).astype(np.int64).astype(np.uint64)))
        return state


def unit_interval(hashed: np.ndarray) -> np.ndarray:
    """A hash as a float in [0, 1) (its top 53 bits)."""
    return (hashed >> np.uint64(11)).astype(np.float64) / float(1 << 53)


#: salts that keep the draws of one (seed, id, view) apart
_DY, _DX, _FLIP, _ORDER, _BOX = 1, 2, 3, 4, 5


@dataclass(frozen=True)
class ViewSpec:
    """K fixed views drawn from ``seed``: what a teacher cache is keyed by (with the augmentation)."""

    count: int
    seed: int = 0

    def __post_init__(self):
        if self.count < 1:
            raise ValueError(f"a view spec needs at least one view, got {self.count}")


def crop_flip_table(spec: ViewSpec, ids: Tensor, padding: int, flip: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dy, dx, flip), each (N, K): the crop offsets in [0, 2 * padding] and flip flags of every view
    of the samples with stable ids ``ids`` (in-memory datasets: random crop with zero padding + flip)."""
    ids = ids.cpu().numpy().astype(np.int64)[:, None]
    views = np.arange(spec.count, dtype=np.int64)[None, :]
    side = 2 * padding + 1
    dy = mix(spec.seed, _DY, ids, views) % np.uint64(side) if padding > 0 else np.zeros((len(ids), spec.count), np.uint64)
    dx = mix(spec.seed, _DX, ids, views) % np.uint64(side) if padding > 0 else np.zeros((len(ids), spec.count), np.uint64)
    flips = unit_interval(mix(spec.seed, _FLIP, ids, views)) < 0.5 if flip else np.zeros((len(ids), spec.count), bool)
    return torch.from_numpy(dy.astype(np.int64)), torch.from_numpy(dx.astype(np.int64)), torch.from_numpy(flips)


def epoch_views(count: int, run_seed: int, ids: Tensor, epoch: int) -> Tensor:
    """The view (0..K-1) each sample shows in ``epoch``: within each block of K epochs every view once,
    in an order drawn from (run seed, sample id, block)."""
    ids = ids.cpu().numpy().astype(np.int64)[:, None]
    block, position = divmod(int(epoch), count)
    keys = mix(run_seed, _ORDER, ids, block, np.arange(count, dtype=np.int64)[None, :])
    order = np.argsort(keys, axis=1, kind="stable")
    return torch.from_numpy(np.ascontiguousarray(order[:, position]).astype(np.int64))


def view_rng(seed: int, sample_id: int, view: int) -> np.random.Generator:
    """The generator of one view of one streamed sample (its random-resized crop box and flip)."""
    return np.random.default_rng([int(seed) % 2**32, _BOX, int(sample_id), int(view)])


class ViewLoader(DeviceLoader):
    """A training :class:`DeviceLoader` that shows each image one of its K fixed views per epoch.

    The batches, their order and the shuffling are those of DeviceLoader (from the run's seed and the
    epoch); only the augmentation parameters come from the view table instead of fresh draws. Batches
    carry ``views`` (the view index of each sample) and, once a teacher cache is attached
    (:func:`gapkd.teacher_cache.attach`), ``teacher_logits``: the frozen teacher's logits on exactly those
    views, so logit methods skip the teacher's forward."""

    def __init__(self, split, batch_size, normalizer, device, *, views: ViewSpec, seed: int = 0, crop_padding: int = 0,
                 flip: bool = False, drop_last: bool = False, strong: bool = False):
        super().__init__(split, batch_size, normalizer, device, train=True, seed=seed, crop_padding=crop_padding, flip=flip,
                         drop_last=drop_last, strong=strong)
        self.views = views
        dy, dx, flips = crop_flip_table(views, split.indices, crop_padding, flip)
        self.dy, self.dx, self.flips = dy.to(device), dx.to(device), flips.to(device)
        self.teacher_logits = None  # a gapkd.teacher_cache.LogitTable (N, K, C), rows in this split's order, once attached
        self._epoch_views: tuple[int, Tensor] | None = None

    def views_of_epoch(self, epoch: int) -> Tensor:
        if self._epoch_views is None or self._epoch_views[0] != epoch:
            self._epoch_views = (epoch, epoch_views(self.views.count, self.seed, self.indices, epoch).to(self.device))
        return self._epoch_views[1]

    def view_images(self, rows, view: Tensor) -> Tensor:
        """uint8 images of ``rows`` as their views ``view`` show them (before normalisation)."""
        images = self.images[rows]
        if self.crop_padding > 0:
            images = crop(images, self.crop_padding, self.dy[rows, view], self.dx[rows, view])
        if self.flip:
            images = flip_where(images, self.flips[rows, view])
        return images

    def augment(self, images, rows, size, mine, generator, epoch):
        return self.view_images(rows, self.views_of_epoch(epoch)[rows])

    def annotate(self, batch: Batch, rows, epoch: int) -> Batch:
        batch.views = self.views_of_epoch(epoch)[rows]
        batch.teacher_logits = cached_logits(self.teacher_logits, rows, batch.views, self.device)
        return batch


def cached_logits(table, rows: Tensor, views: Tensor, device: torch.device) -> Tensor | None:
    """The rows' logits on their views from a teacher cache's LogitTable (None without one), on ``device``."""
    return None if table is None else table.lookup(rows, views, device)


def fixed_view_loader(cfg, train, normalizer, device: torch.device, seed: int, make, streamed: bool):
    """The training loader of ``data.views=K``: a :class:`ViewLoader` for in-memory data, the streaming
    loader ``make`` builds with its views set for streamed data (``streamed``)."""
    spec = ViewSpec(cfg.views, cfg.view_seed)
    if streamed:
        loader = make(train, True, cfg.batch_size)
        loader.views = spec
        return loader
    return ViewLoader(train, cfg.batch_size, normalizer, device, views=spec, seed=seed, crop_padding=cfg.augment.crop_padding,
                      flip=cfg.augment.flip, drop_last=cfg.drop_last, strong=cfg.augment.strong)
