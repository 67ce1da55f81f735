"""Training throughput (images/s) of KD methods, three ways in one process:

  (a) gapkd's real training loop (gapkd.api.run -> engine.fit; train time only, no eval) in the
      steady state: the fastest epoch after the first of a 3-epoch run (epoch 1, with its one-off
      costs, is reported too),
  (b) a conventional loop as the public KD codebases write it: a DataLoader over the dataset
      with per-sample PIL/numpy transforms (random crop with padding, flip, to-tensor,
      normalise), NCHW fp32, teacher under no_grad, `.item()` of the loss every step,
  (c) the compute bound: the same distiller computations on pre-made batches, nothing else.

Ratios within one run are what this reports (absolute times depend on the machine). The speed of
a shared machine drifts by tens of percent over minutes, so every number is the fastest of
several measurements spread over the run: (c) is timed in interleaved rounds before and after the
pair's (a) and (b) runs, (a) and (b) keep their fastest epoch (after (a)'s first).

    python benchmarks/throughput.py --methods kd --pairs resnet56:resnet20 --images 2048
"""
from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gapkd.api import run, run_dir_for
from gapkd.config import build_config
from gapkd.data import ImageData, Split
from gapkd.data.core import channel_stats, make_split
from gapkd.engine.checkpoint import atomic_save
from gapkd.engine.runlog import read_metrics
from gapkd.models import create_model
from steps import time_steps  # benchmarks/steps.py

EPOCHS = 3  # (a): epoch 1 with its one-off costs, then the steady state
CIFAR10_JPG = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpg" / "cifar10-jpg-q75.tar.gz"


def benchmark_data(images: int, seed: int = 0, real: bool = True) -> ImageData:
    """Real CIFAR-10 JPEG-copy images when present (and ``real``), else random 32x32 images (same shapes)."""
    if real and CIFAR10_JPG.is_file():
        from gapkd.config import DataConfig
        from gapkd.data import load_dataset
        from gapkd.data.core import subsample

        data = load_dataset(DataConfig(name="cifar10-jpg", path=str(CIFAR10_JPG)))
        train = subsample(data.train, images, seed)
        return ImageData("cifar10-jpg", data.classes, train, subsample(data.test, 64, seed), data.mean, data.std)
    rng = np.random.default_rng(seed)
    train = make_split(rng.integers(0, 255, (images, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, images))
    test = make_split(rng.integers(0, 255, (64, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, 64))
    mean, std = channel_stats(train.images)
    return ImageData("random", [str(i) for i in range(10)], train, test, mean, std)


def calibrated_teacher(name: str, data: ImageData) -> torch.nn.Module:
    """A random-weight teacher that behaves like a trained one numerically: BatchNorm statistics
    from the data and the classifier scaled so logits have a standard deviation of 3. (Raw random
    deep ResNets give logits of +-40, whose tau^2-scaled KD terms make DFPT's prompt path diverge
    in a few steps; speed does not depend on the weights' values.)"""
    from gapkd.data.loader import Normalizer

    torch.manual_seed(0)
    model = create_model(name, num_classes=data.num_classes, in_channels=data.in_channels).train()
    normalize = Normalizer(data.mean, data.std, torch.device("cpu"))
    with torch.no_grad():
        for start in range(0, min(len(data.train), 512), 128):
            model(normalize(data.train.images[start:start + 128]))
        model.eval()
        scale = 3.0 / model(normalize(data.train.images[:128])).std().item()
        model.classifier.weight.mul_(scale)
        model.classifier.bias.mul_(scale)
    return model


def make_config(workdir: Path, teacher: str, student: str, method: str, batch: int, device: str, extra: list[str], data: ImageData):
    teacher_path = workdir / f"{teacher}.pt"
    if not teacher_path.exists():
        model = calibrated_teacher(teacher, data)
        atomic_save({"format": "gapkd-model", "model": teacher, "num_classes": data.num_classes, "state_dict": model.state_dict()}, teacher_path)
    return build_config({
        "out_dir": str(workdir), "name": f"{method}-{teacher}-{student}",
        "data": {"name": "digits", "val_fraction": 0.0, "batch_size": batch, "drop_last": True},
        "student": {"name": student}, "teacher": {"name": teacher, "checkpoint": str(teacher_path)},
        "method": {"name": method}, "train": {"epochs": EPOCHS, "device": device}, "schedule": {"name": "constant"},
        # a small lr: the random-weight teachers here make DFPT's prompt path diverge at recipe rates, and
        # the learning rate does not change the work done per step
        "optim": {"lr": 0.001},
    }, overrides=extra)


def gapkd_loop(cfg, data: ImageData) -> tuple[float, float]:
    """Seconds of training in epoch 1 and in the fastest later epoch: epoch 1 pays the one-off
    costs (kernel selection, torch.compile); the later ones are the steady state of a long recipe."""
    run(cfg, echo=False, data=data)
    first, *later = read_metrics(run_dir_for(cfg) / "metrics.jsonl")
    return first["epoch_seconds"], min(r["epoch_seconds"] for r in later)


class _PerSampleDataset(torch.utils.data.Dataset):
    """What public KD codebases do: one PIL image at a time through a transform chain."""

    def __init__(self, split: Split, mean, std):
        self.images = split.images.permute(0, 2, 3, 1).numpy()  # HWC uint8, like CIFAR arrays
        self.labels = split.labels.numpy()
        self.mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        from PIL import Image

        image = np.asarray(Image.fromarray(self.images[index]))  # the PIL round trip of torchvision datasets
        padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
        y, x = np.random.randint(0, 9, size=2)
        image = padded[y:y + 32, x:x + 32]
        if np.random.rand() < 0.5:
            image = image[:, ::-1]
        tensor = torch.from_numpy(((image.transpose(2, 0, 1).astype(np.float32) / 255.0) - self.mean) / self.std)
        return tensor, int(self.labels[index])


def conventional_loop(cfg, data: ImageData, device: torch.device, workers: int) -> float:
    """Seconds per image of one epoch after its first step: the conventional loop's steady state.
    (Those codebases also restart their DataLoader workers every epoch; on a 782-step CIFAR epoch
    that costs little, on this benchmark's short epochs it would be a large share, so it is left out.)"""
    import torch.nn.functional as F

    from gapkd.methods.losses import kd_kl

    student = create_model(cfg.student.name, num_classes=data.num_classes).to(device).train()
    teacher = create_model(cfg.teacher.name, num_classes=data.num_classes).to(device).eval()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    loader = torch.utils.data.DataLoader(_PerSampleDataset(data.train, data.mean, data.std), batch_size=cfg.data.batch_size,
                                         shuffle=True, num_workers=workers, drop_last=True, persistent_workers=False,
                                         pin_memory=device.type == "cuda")
    seen, started = 0, None
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        with torch.no_grad():
            teacher_logits = teacher(images)
        logits = student(images)
        loss = 0.1 * F.cross_entropy(logits, labels) + 0.9 * kd_kl(logits, teacher_logits, 4.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss.item()
        if started is None:  # the clock starts after the first step: worker start-up and warm-up excluded
            started = time.perf_counter()
        else:
            seen += labels.numel()
    return (time.perf_counter() - started) / seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", nargs="+", default=["resnet56:resnet20", "resnet32x4:resnet8x4"], help="teacher:student")
    parser.add_argument("--methods", nargs="+", default=["kd", "dkd", "simkd", "dfpt-kd", "dfpt-kd+"])
    parser.add_argument("--images", type=int, default=2048, help="training images per measured epoch")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed round of the compute bound")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the compute bound (the fastest counts)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the conventional loop")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    parser.add_argument("overrides", nargs="*", help="extra gapkd config overrides for (a), e.g. train.channels_last=true")
    args = parser.parse_args()
    device = torch.device(args.device)
    data = benchmark_data(args.images)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for pair in args.pairs:
            teacher, student = pair.split(":")
            configs = {m: make_config(Path(tmp), teacher, student, m, args.batch, args.device, args.overrides, data) for m in args.methods}
            bound = time_steps(configs, data, args.steps, rounds=args.rounds)  # (c), interleaved across methods
            runs = {}
            for method, cfg in configs.items():
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                first, steady = gapkd_loop(cfg, data)
                peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
                b = min(conventional_loop(cfg, data, device, args.workers) for _ in range(2)) if method == "kd" else None
                runs[method] = first, steady, peak, b
            later = time_steps(configs, data, args.steps, rounds=args.rounds)  # (c) again, after (a) and (b)
            images = len(data.train) // args.batch * args.batch
            for method, (first, steady, peak, b) in runs.items():
                a = steady / images
                c = min(bound[method], later[method]) / args.batch
                rows.append({"pair": pair, "method": method, "gapkd_img_s": 1 / a, "gapkd_first_epoch_img_s": images / first,
                             "compute_bound_img_s": 1 / c,
                             "conventional_img_s": (1 / b) if b else None, "a_over_c": c / a, "a_over_b": (b / a) if b else None,
                             "gapkd_peak_cuda_mib": peak})
                print(json.dumps(rows[-1]), flush=True)
    for pair in args.pairs:
        kd = next((r for r in rows if r["pair"] == pair and r["method"] == "kd"), None)
        for r in rows:
            if r["pair"] == pair and kd:
                r["step_time_vs_kd"] = kd["gapkd_img_s"] / r["gapkd_img_s"]
    print(f"\ndata: {data.name}, {len(data.train)} images, batch {args.batch}, device {args.device}, threads {torch.get_num_threads()}")
    print("| pair | method | (a) gapkd img/s | (a) epoch 1 img/s | (b) conventional img/s | (c) compute bound img/s | (a)/(b) | (a)/(c) | step time vs KD |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        b = f"{r['conventional_img_s']:.0f}" if r["conventional_img_s"] else "–"
        ab = f"{r['a_over_b']:.2f}" if r["a_over_b"] else "–"
        print(f"| {r['pair']} | {r['method']} | {r['gapkd_img_s']:.0f} | {r['gapkd_first_epoch_img_s']:.0f} | {b} | {r['compute_bound_img_s']:.0f} | {ab} | {r['a_over_c']:.2f} | {r.get('step_time_vs_kd', float('nan')):.2f} |")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    if device.type == "cuda":
        print("peak CUDA memory of (a), MiB: " + ", ".join(f"{r['pair']} {r['method']} {r['gapkd_peak_cuda_mib']:.0f}" for r in rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
