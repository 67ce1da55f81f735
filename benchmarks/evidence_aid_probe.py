"""Look inside AID's adaptation stage (our reading of the published abstract of Qian, Le & Harandi,
ICCV 2025): at the start of adaptation (T = T0), the magnitude of each loss term and the norm of
its own gradient over the teacher's parameters, for each variant of the loss — τ² scaling off / on,
class means of L_inner over the batch or running over batches — on the first training batches.
Also: how many samples are alone of their class in a batch (their L_inner with batch means is 0).

    python benchmarks/evidence_aid_probe.py --teacher resnet20 --teacher-checkpoint T0.pt \\
        --reference resnet8 --reference-checkpoint S_ref.pt --batches 20 data.name=cifar10-jpg ...

Prints a Markdown table. Training batches are drawn as a run draws them (seed 0, epoch 0).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

from gapkd.api import build_distiller
from gapkd.config import build_config, parse_overrides
from gapkd.data import build_data
from gapkd.methods import StepInfo

VARIANTS = {  # name -> aid-adapt hyper-parameters that differ between variants
    "as written (no τ², batch means)": {"temperature_scaling": False, "class_means": "batch"},
    "τ², batch means": {"temperature_scaling": True, "class_means": "batch"},
    "τ², running means": {"temperature_scaling": True, "class_means": "running"},
}


def singleton_fraction(classes: int, batch: int) -> float:
    """Expected fraction of a uniformly drawn batch whose sample is the only one of its class: (1 - 1/C)^(B-1)."""
    return (1 - 1 / classes) ** (batch - 1)


def probe(cfg, bundle, batches: int) -> dict[str, dict[str, float]]:
    distiller = build_distiller(cfg, bundle.data, bundle.train.num_samples).train()
    params = [p for p in distiller.student.parameters() if p.requires_grad]
    rows: dict[str, list[float]] = {}
    alone: list[float] = []
    for index, batch in enumerate(bundle.train.epoch(0)):
        if index == batches:
            break
        out = distiller(batch.images, batch.labels, StepInfo(0, index, 1, len(bundle.train)))
        total = sum(out.losses.values())
        for name, term in [*out.losses.items(), ("total", total)]:
            grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
            norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads if g is not None)).item()
            rows.setdefault(f"{name}", []).append(term.item())
            rows.setdefault(f"{name} grad", []).append(norm)
        counts = torch.bincount(batch.labels)
        alone.append(float((counts[batch.labels] == 1).float().mean()))
    summary = {key: {"mean": statistics.mean(v), "max": max(v)} for key, v in rows.items()}
    summary["alone"] = {"mean": statistics.mean(alone), "max": max(alone)}
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--teacher-checkpoint", required=True)
    parser.add_argument("--reference", required=True, help="S_ref's architecture (the student's)")
    parser.add_argument("--reference-checkpoint", required=True)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--json", help="also write the numbers here")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="data.* and aid-adapt method.* keys")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    tree = {"student": {"name": args.teacher, "checkpoint": args.teacher_checkpoint},
            "teacher": {"name": args.teacher, "checkpoint": args.teacher_checkpoint},
            "method": {"name": "aid-adapt", "reference_checkpoint": args.reference_checkpoint, "reference_model": args.reference}}
    base = build_config(tree, overrides=parse_overrides(args.overrides))
    bundle = build_data(base.data, torch.device("cpu"), base.seed)
    results = {}
    for name, variant in VARIANTS.items():
        cfg = build_config(tree, overrides={**parse_overrides(args.overrides), "method": {**tree["method"], **variant}})
        results[name] = probe(cfg, bundle, args.batches)
        print(f"{name} done", file=sys.stderr)
    h = base.method.hparams
    lines = [f"# AID adaptation at T = T0: {args.teacher} vs S_ref {args.reference}, first {args.batches} training batches "
             f"of {base.data.batch_size} (tau={h.get('temperature', 4)}, beta={h.get('beta', 1)}, gamma={h.get('gamma', 1)})", "",
             "| variant | CE | β·L_inner | γ·L_class | inner share of loss | ‖∇CE‖ | ‖∇β·L_inner‖ | ‖∇γ·L_class‖ | ‖∇ total‖ |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        total = r["total"]["mean"]
        lines.append(f"| {name} | {r['ce']['mean']:.4f} | {r['inner']['mean']:.4f} | {r['class']['mean']:.5f} | "
                     f"{100 * r['inner']['mean'] / total:.1f}% | {r['ce grad']['mean']:.3f} | {r['inner grad']['mean']:.3f} | "
                     f"{r['class grad']['mean']:.4f} | {r['total grad']['mean']:.3f} |")
    alone = results[next(iter(results))]["alone"]["mean"]
    classes, batch = bundle.num_classes, base.data.batch_size
    lines += ["", f"Samples alone of their class in a batch (L_inner with batch means = 0 for them): measured {100 * alone:.1f}% "
              f"here ({classes} classes, batch {batch}); expected (1 - 1/C)^(B-1): {100 * singleton_fraction(classes, batch):.1f}% "
              f"at C={classes}, B={batch}; {100 * singleton_fraction(100, 64):.1f}% at C=100, B=64."]
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
