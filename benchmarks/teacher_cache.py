"""What the teacher cache (data.views=K, gapkd.teacher_cache) saves, measured three ways:

  steps   the step time of KD with the teacher's logits cached vs the student's own CE step and vs KD
          recomputing the teacher (interleaved rounds on one pre-made batch, fastest kept; benchmarks/steps.py)
  e2e     the wall clock of whole runs, cache building included: one KD run without the cache (fresh
          augmentation, the teacher on every step) vs the same run with K fixed views and the cache; then
          a study-like grid of logit methods x seeds that share the teacher, without vs with the cache
  memory  the cache's size from its format (CIFAR-100-sized, ImageNet-sized with top-k) and as measured
          (the files the e2e runs wrote, and the peak RSS of runs with and without the cache)

Random-weight teachers calibrated like trained ones (benchmarks/throughput.py): speed does not depend on
the weights' values. Images: the CIFAR-10 JPEG copy when ../shared/data has it, else random ones.

    python benchmarks/teacher_cache.py steps --pairs resnet56:resnet8 resnet32x4:resnet8x4 --json out.json
    python benchmarks/teacher_cache.py e2e --images 2000 --epochs 30 --views 8 --json out.json
    python benchmarks/teacher_cache.py memory
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gapkd.api import run  # noqa: E402
from steps import time_steps  # noqa: E402  (benchmarks/steps.py)
from throughput import benchmark_data, make_config  # noqa: E402  (benchmarks/throughput.py)

LOGIT_METHODS = ["kd", "dkd", "dist", "ctkd", "logit-kd"]


def steps(args, workdir: Path) -> list[dict]:
    data = benchmark_data(args.images)
    rows = []
    for pair in args.pairs:
        teacher, student = pair.split(":")
        cache = ["data.views=8", f"data.teacher_cache_dir={workdir / 'cache'}"]
        configs = {
            "ce": make_config(workdir, teacher, student, "ce", args.batch, args.device, args.extra, data),
            "kd": make_config(workdir, teacher, student, "kd", args.batch, args.device, args.extra, data),
            "kd-cached": make_config(workdir, teacher, student, "kd", args.batch, args.device, [*args.extra, *cache], data),
        }
        seconds = time_steps(configs, data, args.steps, args.rounds)
        rows.append({"pair": pair, "batch": args.batch, **{f"{k}_ms": 1000 * v for k, v in seconds.items()},
                     "ce_over_cached_kd": seconds["ce"] / seconds["kd-cached"], "kd_over_cached_kd": seconds["kd"] / seconds["kd-cached"]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _timed_run(cfg, data) -> tuple[float, dict]:
    started = time.perf_counter()
    summary = run(cfg, echo=False, data=data)
    return time.perf_counter() - started, summary


def e2e(args, workdir: Path) -> dict:
    """Wall clock of whole runs (data already decoded in memory, shared by every run, as a study worker does)."""
    data = benchmark_data(args.images, real=args.data == "auto")
    teacher, student = args.pair.split(":")
    common = [f"train.epochs={args.epochs}", "data.val_fraction=0.1", "schedule.name=cosine", "optim.lr=0.05", *args.extra]

    def cfg(method, seed, cached, tag):
        cache = [f"data.views={args.views}", f"data.teacher_cache_dir={workdir / tag / 'cache'}"] if cached else []
        return make_config(workdir, teacher, student, method, args.batch, args.device,
                           [*common, f"seed={seed}", f"name={tag}{'-cached' if cached else ''}-{method}-s{seed}", *cache], data)

    out = {"pair": args.pair, "images": args.images, "epochs": args.epochs, "views": args.views, "batch": args.batch}
    if "single" in args.parts:
        for cached in (False, True):
            if args.only in ("cached", "no-cache") and cached != (args.only == "cached"):
                continue
            label = "single_cached" if cached else "single_no_cache"
            out[f"{label}_s"], summary = _timed_run(cfg("kd", 0, cached, "single"), data)  # the cached run builds its cache
            out[f"{label}_train_s"] = summary["train_seconds"]  # the epochs' training time (no evaluation, no set-up)
            if cached:
                assert summary["teacher_cache"] in ("built", "rebuilt"), summary.get("teacher_cache")
                out["cache_build_s"] = summary["teacher_cache_seconds"]
                out["cache_bytes"] = sum(f.stat().st_size for f in (workdir / "single" / "cache").rglob("*.npy"))
        if args.only == "both":
            out["single_speedup"] = out["single_no_cache_s"] / out["single_cached_s"]
        print(json.dumps(out), flush=True)
    if "study" not in args.parts:
        return out
    methods, seeds = args.study_methods, list(range(args.study_seeds))
    for cached in (False, True):
        total, statuses = 0.0, []
        for method in methods:
            for seed in seeds:
                # the study's own cache folder: its first run builds it, the others hit it
                seconds, summary = _timed_run(cfg(method, seed, cached, "study"), data)
                total += seconds
                statuses.append(summary.get("teacher_cache"))
        out["study_cached_s" if cached else "study_no_cache_s"] = total
        if cached:
            out["study_cache"] = {s: statuses.count(s) for s in set(statuses)}
    out["study_runs"] = len(methods) * len(seeds)
    out["study_speedup"] = out["study_no_cache_s"] / out["study_cached_s"]
    print(json.dumps(out), flush=True)
    return out


def peak_rss(args, workdir: Path) -> dict:
    """Peak RSS of one process running one run (run this mode once per setting: RSS only grows)."""
    data = benchmark_data(args.images)
    teacher, student = args.pair.split(":")
    extra = [f"train.epochs={args.epochs}", *args.extra]
    if args.views:
        extra += [f"data.views={args.views}", f"data.teacher_cache_dir={workdir / 'cache'}"]
    run(make_config(workdir, teacher, student, "kd", args.batch, args.device, extra, data), echo=False, data=data)
    return {"views": args.views, "images": args.images, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def memory_table() -> list[dict]:
    """Bytes of a cache from its format: train (N, K, C) float32, or top-k values float32 + ids int32 + one
    fill float32 per view; val/test (N, C) float32."""
    settings = [("CIFAR-100", 50_000, 10_000, 100, None), ("ImageNet-1k full", 1_281_167, 50_000, 1000, None),
                ("ImageNet-1k top-10", 1_281_167, 50_000, 1000, 10), ("ImageNet-1k top-50", 1_281_167, 50_000, 1000, 50)]
    rows = []
    for name, train, evaluated, classes, topk in settings:
        for views in (4, 8, 16):
            per_view = classes * 4 if topk is None else topk * 8 + 4
            total = train * views * per_view + evaluated * classes * 4
            rows.append({"setting": name, "views": views, "GiB": total / 2**30})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["steps", "e2e", "rss", "memory"])
    parser.add_argument("--pairs", nargs="+", default=["resnet56:resnet8", "resnet32x4:resnet8x4"])
    parser.add_argument("--pair", default="resnet56:resnet8")
    parser.add_argument("--images", type=int, default=1536)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--study-methods", nargs="+", default=LOGIT_METHODS)
    parser.add_argument("--study-seeds", type=int, default=5)
    parser.add_argument("--only", choices=["both", "cached", "no-cache"], default="both",
                        help="e2e single: time only one of the two runs (run the two at once, in two processes, to give both "
                        "the same load on a shared machine)")
    parser.add_argument("--parts", nargs="+", choices=["single", "study"], default=["single", "study"], help="e2e: what to time")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data", choices=["auto", "random"], default="auto",
                        help="auto: the CIFAR-10 JPEG copy when present, else random images; random: random images (tests)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("extra", nargs="*", help="config overrides for every run (train.amp=off, ...)")
    args = parser.parse_intermixed_args()
    if args.mode == "memory":
        result = memory_table()
        for row in result:
            print(f"{row['setting']:<20} K={row['views']:<3} {row['GiB']:8.3f} GiB")
    else:
        with tempfile.TemporaryDirectory() as workdir:
            result = {"steps": steps, "e2e": e2e, "rss": peak_rss}[args.mode](args, Path(workdir))
        if args.mode == "rss":
            print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
