"""One training step of a configured run on one pre-made batch, as the training loop would build
it (gapkd.api.prepare_distiller: teacher BatchNorm folded, channels_last, compile), and interleaved
timing of several such steps: the compute bound the loop is measured against."""
from __future__ import annotations

import time

import torch

from gapkd import teacher_cache
from gapkd.api import prepare_distiller, resolve_device
from gapkd.data import build_data
from gapkd.engine.optim import build_optimizer
from gapkd.engine.trainer import autocast_context, resolve_channels_last, uses_cuda_graphs
from gapkd.methods import StepInfo


def make_step(cfg, data):
    """One training step (forward, backward, optimiser step) of the run ``cfg`` on one fixed batch,
    and a function that waits for the device."""
    device = resolve_device(cfg.train.device)
    bundle = build_data(cfg.data, device, cfg.seed, resolve_channels_last(device, cfg.train.amp, cfg.train.channels_last), data=data)
    distiller = prepare_distiller(cfg, bundle, device).train()
    optimizer = build_optimizer(distiller.param_groups(), cfg.optim)
    amp_ctx, _ = autocast_context(device, cfg.train.amp)
    teacher_cache.attach(cfg, bundle, distiller, device, amp_ctx, log=lambda message: None)  # data.views > 0: cached logits
    batch = next(iter(bundle.train.epoch(0)))
    info = StepInfo(0, 0, 1, 1, batch.indices, getattr(batch, "strong_images", None), views=batch.views,
                    teacher_logits=batch.teacher_logits)

    cuda_graphs = uses_cuda_graphs(cfg.train)

    def step():
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with amp_ctx():
            loss = sum(distiller(batch.images, batch.labels, info).losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step, (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def time_steps(configs: dict, data, steps: int, rounds: int = 5) -> dict[str, float]:
    """Seconds per step of each run, timed in interleaved rounds after a warm-up; the fastest
    round counts, so other work on a shared machine inflates the ratio as little as possible."""
    steppers = {label: make_step(cfg, data) for label, cfg in configs.items()}
    best = {}
    for _ in range(rounds):
        for label, (step, sync) in steppers.items():
            for _ in range(2):  # warm-up (and after the other methods ran)
                step()
            sync()
            started = time.perf_counter()
            for _ in range(steps):
                step()
            sync()
            best[label] = min(best.get(label, float("inf")), (time.perf_counter() - started) / steps)
    return best
