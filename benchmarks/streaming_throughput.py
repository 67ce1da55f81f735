"""Images/s of the streaming loader (decode + transform in workers + transfer + normalise), with
no model: the ceiling the data path puts on training for a dataset too big for memory.

By default it writes a synthetic ImageNet-like folder (500x375 JPEGs of smooth random shapes with
noise, about the average ImageNet file size) to a temporary folder; --path measures a real
train/ + val/ tree (ImageNet, CUB plain tree, ...).

    python benchmarks/streaming_throughput.py --images 512 --workers 0 1 2
    python benchmarks/streaming_throughput.py --path /data/imagenet --images 20000 --workers 8 16 --device cuda
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gapkd.config import DataConfig
from gapkd.data import StreamingLoader, load_dataset
from gapkd.data.loader import Normalizer


def synthetic_tree(root: Path, images: int, classes: int = 8, seed: int = 0) -> Path:
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(seed)
    for i in range(images):
        for split in ("train", "val") if i < classes else ("train",):
            low = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
            image = Image.fromarray(low).resize((500, 375), Image.BICUBIC).filter(ImageFilter.GaussianBlur(2))
            pixels = np.asarray(image).astype(np.int16) + rng.integers(-24, 25, (375, 500, 3))
            path = root / split / f"c{i % classes}" / f"{i}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)
    return root


def measure(path: Path, workers: int, device: torch.device, size: int, batch: int, train: bool) -> float:
    data = load_dataset(DataConfig(name="image-folder-stream", path=str(path), image_size=size))
    normalizer = Normalizer(data.mean, data.std, device, channels_last=device.type == "cuda")
    loader = StreamingLoader(data.train, batch, normalizer, device, train=train, size=size, workers=workers)
    started, seen = time.perf_counter(), 0
    for batch_ in loader.epoch(0):
        seen += batch_.labels.numel()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return seen / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", type=Path, help="a train/ + val/ tree (default: a synthetic one)")
    parser.add_argument("--images", type=int, default=512, help="synthetic training images")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.path or synthetic_tree(Path(tmp), args.images)
        sizes = [f.stat().st_size for f in (path / "train").rglob("*") if f.is_file()][:2000]
        print(f"{path}: mean file {np.mean(sizes) / 1024:.0f} KiB; {os.cpu_count()} CPU cores; device {device}")
        print("| workers | train img/s (random-resized crop + flip) | eval img/s (resize + center crop), same images |")
        print("|---|---|---|")
        for workers in args.workers:
            train = measure(path, workers, device, args.size, args.batch, True)
            evaluation = measure(path, workers, device, args.size, args.batch, False)
            print(f"| {workers} | {train:.0f} | {evaluation:.0f} |", flush=True)


if __name__ == "__main__":
    main()
