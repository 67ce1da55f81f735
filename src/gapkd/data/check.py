"""`gapkd data check`: a dataset checked up front, before a long run, instead of the run stopping
when a batch first reaches a bad file.

Streamed datasets are listed by the loader's own readers (so the check sees exactly the files
training sees) and every image (or a random sample) is decoded whole by the loader's own
:func:`~gapkd.data.streaming.decode_rgb`, in worker processes. Decoded datasets are loaded as a
run loads them. The report counts images per split and class and names every problem with its fix."""
from __future__ import annotations

import multiprocessing
import os
import sys
import time
from collections import Counter

import numpy as np
import torch

from ..core.errors import ConfigError, DataError
from .streaming import FolderData, decode_rgb, tolerate_layout_problems

#: unreadable files named one by one in a report (all are counted)
UNREADABLE_CAP = 20
#: class names listed in one problem line
NAMES_CAP = 5
PROGRESS_SECONDS = 30.0


def check_dataset(cfg, *, workers: int | None = None, limit: int | None = None, seed: int = 0, echo: bool = False) -> dict:
    """The report of :func:`gapkd.api.check_data` for a validated DataConfig ``cfg``."""
    from . import load_dataset, split_data

    if limit is not None and limit < 1:
        raise ConfigError(f"limit={limit}: check at least 1 image (or leave the limit out to check all).")
    start = time.perf_counter()
    with tolerate_layout_problems() as unknown:
        data = load_dataset(cfg)
    streamed = isinstance(data, FolderData)
    report: dict = {"dataset": data.name, "name": cfg.name, "path": cfg.path, "streamed": streamed, "classes": data.num_classes,
                    "splits": {name: class_counts(split.labels, data.classes) for name, split in (("train", data.train), ("test", data.test))}}
    train, val, test = split_data(data, cfg, seed=0)
    report["carved"] = {"train": len(train), "val": len(val), "test": len(test), "val_fraction": cfg.val_fraction,
                        "split_seed": cfg.split_seed}
    if streamed:
        report["image_size"] = data.image_size
        report["decode"] = decode_files(data, workers=cfg.workers if workers is None else workers, limit=limit, seed=seed, echo=echo)
    else:
        images = data.train.images
        report["image_shape"] = list(images.shape[1:])
        report["label_range"] = [int(min(data.train.labels.min(), data.test.labels.min())),
                                 int(max(data.train.labels.max(), data.test.labels.max()))]
    train_classes = {c for c, n in zip(data.classes, report["splits"]["train"]["per_class"]) if n}
    test_classes = {c for c, n in zip(data.classes, report["splits"]["test"]["per_class"]) if n}
    report["missing_in_test"] = sorted(train_classes - test_classes)
    report["unknown_in_test"] = unknown
    report["class_lists_agree"] = not report["missing_in_test"] and not unknown
    report["problems"] = problems(report)
    report["ok"] = not report["problems"]
    report["seconds"] = round(time.perf_counter() - start, 2)
    return report


def class_counts(labels: torch.Tensor, classes: list[str]) -> dict:
    counts = torch.bincount(labels, minlength=len(classes)).tolist()
    empty = [c for c, n in zip(classes, counts) if n == 0]
    return {"images": int(labels.numel()), "classes": len(classes) - len(empty), "min_per_class": min(counts),
            "max_per_class": max(counts), "empty_classes": empty, "per_class": counts}


def _inspect(path: str) -> tuple[str, str | None, int, int, str | None]:
    """(path, mode in the file, width, height, error): one image decoded whole, as the loader does."""
    try:
        image, mode = decode_rgb(path)
    except DataError as error:
        cause = error.__context__  # Pillow's own error, behind the message that names the file
        return path, None, 0, 0, f"{type(cause).__name__}: {cause}" if cause is not None else str(error)
    return path, mode, image.width, image.height, None


def decode_files(data: FolderData, *, workers: int | None, limit: int | None, seed: int, echo: bool) -> dict:
    """Decode every file of both splits (or ``limit`` of them drawn at random with ``seed``)."""
    paths = [split.path(row) for split in (data.train, data.test) for row in range(len(split))]
    total = len(paths)
    if limit is not None and limit < total:
        chosen = np.sort(np.random.default_rng(seed).choice(total, size=limit, replace=False))
        paths = [paths[i] for i in chosen]
    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    workers = max(0, min(workers, len(paths) // 64 + 1))  # no more processes than chunks of work
    root = data.train.root.rstrip(os.sep) + os.sep
    modes: Counter = Counter()
    unreadable: list[dict] = []
    unreadable_count, smallest = 0, None
    start = last = time.perf_counter()
    pool = multiprocessing.get_context().Pool(workers) if workers else None
    try:
        results = pool.imap(_inspect, paths, chunksize=64) if pool else map(_inspect, paths)
        for done, (path, mode, width, height, error) in enumerate(results, 1):
            relative = path[len(root):] if path.startswith(root) else path
            if error is not None:
                unreadable_count += 1
                if len(unreadable) < UNREADABLE_CAP:
                    unreadable.append({"path": relative, "error": error})
            else:
                if mode != "RGB":
                    modes[mode] += 1
                if smallest is None or min(width, height) < min(smallest["width"], smallest["height"]):
                    smallest = {"path": relative, "width": width, "height": height}
            if echo and time.perf_counter() - last > PROGRESS_SECONDS:
                last = time.perf_counter()
                print(f"checked {done}/{len(paths)} images ({done / (last - start):.0f}/s), {unreadable_count} unreadable",
                      file=sys.stderr, flush=True)
    finally:
        if pool:
            pool.terminate()
    seconds = time.perf_counter() - start
    return {"checked": len(paths), "of": total, "sample_seed": seed if len(paths) < total else None, "workers": workers,
            "seconds": round(seconds, 2), "images_per_second": round(len(paths) / seconds, 1) if seconds else None,
            "unreadable_count": unreadable_count, "unreadable": unreadable, "converted_to_rgb": dict(sorted(modes.items())),
            "smallest": smallest}


def _names(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:NAMES_CAP])
    return shown + (f" and {len(names) - NAMES_CAP} more" if len(names) > NAMES_CAP else "")


def problems(report: dict) -> list[str]:
    """One line per problem, each naming what is wrong and the fix."""
    found = []
    empty = report["splits"]["train"]["empty_classes"]
    if empty:
        found.append(f"{len(empty)} class(es) without training images ({_names(empty)}): add images or remove the empty class folders")
    unknown = report["unknown_in_test"]
    if unknown:
        folders = sorted({u["folder"] for u in unknown})
        found.append(f"{len(unknown)} held-out class folder(s) that train/ lacks ({_names([u['class'] for u in unknown])} in "
                     f"{', '.join(folders)}): give train/ the same class folders or move them out")
    missing = [c for c in report["missing_in_test"] if c not in empty]
    if missing:
        found.append(f"{len(missing)} class(es) without held-out test images ({_names(missing)}): add held-out images of them "
                     "or remove the classes from training")
    decode = report.get("decode")
    if decode and decode["unreadable_count"]:
        first = decode["unreadable"][0]
        found.append(f"{decode['unreadable_count']} unreadable image(s) (first: {first['path']}: {first['error']}): "
                     "remove or replace them")
    return found


def format_report(report: dict) -> str:
    """The report as the command prints it."""
    where = f" at {report['path']}" if report["path"] else ""
    kind = f"streamed from files at {report['image_size']} px" if report["streamed"] else "decoded into memory"
    lines = [f"{report['dataset']}{where} ({kind}), {report['classes']} classes"]
    for name, split in report["splits"].items():
        empty = f", empty: {len(split['empty_classes'])} ({_names(split['empty_classes'])})" if split["empty_classes"] else ""
        lines.append(f"  {name:<5} {split['images']:>9,} images  {split['classes']:>5} classes with images  per class "
                     f"{split['min_per_class']}..{split['max_per_class']}{empty}")
    carved = report["carved"]
    lines.append(f"  run splits (data.val_fraction={carved['val_fraction']:g}, data.split_seed={carved['split_seed']}): "
                 f"train {carved['train']:,} / val {carved['val']:,} / test {carved['test']:,}")
    if report["class_lists_agree"]:
        lines.append("  class lists of train and test agree")
    else:
        if report["missing_in_test"]:
            lines.append(f"  classes missing in test: {_names(report['missing_in_test'])}")
        if report["unknown_in_test"]:
            lines.append(f"  held-out classes train lacks: {_names([u['class'] for u in report['unknown_in_test']])}")
    if "image_shape" in report:
        lines.append(f"  image shape (C, H, W): {tuple(report['image_shape'])}, labels {report['label_range'][0]}..{report['label_range'][1]}")
    decode = report.get("decode")
    if decode:
        sample = f" (a random sample, seed {decode['sample_seed']})" if decode["sample_seed"] is not None else ""
        lines.append(f"  decoded {decode['checked']:,} of {decode['of']:,} images{sample} in {decode['seconds']:.1f} s "
                     f"({decode['images_per_second'] or 0:,.0f} images/s, {decode['workers']} worker process(es))")
        lines.append(f"  unreadable: {decode['unreadable_count']}")
        lines += [f"    {u['path']}: {u['error']}" for u in decode["unreadable"]]
        if decode["unreadable_count"] > len(decode["unreadable"]):
            lines.append(f"    ... and {decode['unreadable_count'] - len(decode['unreadable'])} more")
        converted = ", ".join(f"{mode} {n:,}" for mode, n in decode["converted_to_rgb"].items()) or "none"
        lines.append(f"  converted to RGB when loaded (not errors): {converted}")
        small = decode["smallest"]
        if small:
            lines.append(f"  smallest image: {small['width']}x{small['height']} ({small['path']})")
    lines.append(f"  {len(report['problems'])} problem(s)" if report["problems"] else "  no problems")
    lines += [f"    - {p}" for p in report["problems"]]
    return "\n".join(lines)
