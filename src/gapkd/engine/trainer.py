"""The one training loop, for teachers and students alike. It knows nothing of any
particular method: it trains what ``Distiller.param_groups()`` returns, sums the named
losses, evaluates every head the distiller offers, and owns clipping, AMP, schedules,
checkpoints, exact resume and data-parallel training (DDP, see :mod:`gapkd.core.distributed`).

:func:`fit` is a sequence of named steps: :func:`_start` (loaders, optimiser, schedule, scaler),
:func:`_resume` (from ``checkpoints/state.pt``), then per epoch :func:`_train_epoch` (with
:func:`_train_step`), :func:`_evaluate_epoch` and :func:`_save_epoch`, and :func:`_finish`
(last.pt, summary.json)."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..core import distributed
from ..core.errors import GapkdError, NonFiniteLossError
from ..core.io import atomic_save, atomic_write_text, remove_stale_temporaries, safe_load
from ..core.rundir import RunDir
from ..core.rundir import model_payload as deployable_payload
from ..core.runguard import diverged_tensor
from ..methods.base import Distiller, StepInfo
from .clipping import clip_gradients
from .optim import build_optimizer, build_scheduler
from .runlog import MetricsLog, TextLog, progress_bar
from .runtime import Runtime, autocast_context, cpu_has_native_bf16, resolve_amp, resolve_channels_last, uses_cuda_graphs  # noqa: F401  (kept importable here)

STATE_FILE = RunDir.STATE

@dataclass
class FitResult:
    summary: dict
    history: list[dict] = field(default_factory=list)


@torch.inference_mode()
def evaluate(distiller: Distiller, loader, amp_ctx) -> dict[str, float]:
    """Top-1 accuracy (%) of every head of the distiller on one split (on a sharded loader: on the
    whole split, counted over all processes)."""
    was_training = distiller.training
    distiller.eval()
    correct: dict[str, torch.Tensor] = {}
    total = 0
    for batch in loader.epoch(0):
        with amp_ctx():
            heads = distiller.eval_heads(batch.images)
        for name, logits in heads.items():
            hit = (logits.argmax(1) == batch.labels).sum()
            correct[name] = correct[name] + hit if name in correct else hit
        total += batch.labels.numel()
    distiller.train(was_training)
    if getattr(loader, "world_size", 1) > 1:
        device = next(distiller.parameters()).device
        counts = distributed.all_reduce_sum(torch.stack([*correct.values(), torch.tensor(total, device=device)]), distributed.current())
        correct, total = dict(zip(correct, counts[:-1])), int(counts[-1])
    return {name: 100.0 * float(value) / max(total, 1) for name, value in correct.items()}


@dataclass
class _Loop:
    """Everything one :func:`fit` call works with, shared by its steps."""

    distiller: Distiller
    model: torch.nn.Module  # what the step calls (DDP's wrapper under DDP); checkpoints use distiller itself
    cfg: Any
    run: RunDir
    runtime: Runtime
    dist: distributed.Distributed
    log: Callable[[str], None]
    echo: bool
    loaders: tuple
    has_val: bool
    optimizer: Any = None
    scheduler: Any = None
    scaler: Any = None
    clip_groups: list = field(default_factory=list)  # what train.grad_clip bounds, and whose gradient norms are logged
    check_every_step: bool = True
    config_hash: str = ""
    start_epoch: int = 0
    best: dict = field(default_factory=lambda: {"val": -1.0, "epoch": 0, "test": None})
    history: list = field(default_factory=list)
    train_seconds: float = 0.0
    skipped: int = 0
    metrics: Optional[MetricsLog] = None

    @property
    def epochs(self) -> int:
        return self.cfg.train.epochs

    @property
    def steps_per_epoch(self) -> int:
        return len(self.loaders[0])


def fit(distiller: Distiller, data, cfg, run_dir: Path, device: torch.device, *, echo: bool = True, on_epoch=None,
        dist: distributed.Distributed | None = None, runtime: Runtime | None = None) -> FitResult:
    """Train ``distiller`` for cfg.train.epochs, resuming from run_dir/checkpoints/state.pt if present.
    ``on_epoch(distiller, epoch, record)`` runs after each epoch's evaluation; keys it returns join the record.
    Under DDP (``dist``, default: the job this process joined) every process trains its shard; only rank 0
    writes files and runs ``on_epoch``. ``runtime``: resolved from cfg.train on ``device`` when not given."""
    loop = _start(distiller, data, cfg, RunDir(run_dir), runtime or Runtime.from_train(cfg.train, device),
                  dist or distributed.current(), echo)
    _resume(loop)
    for epoch in range(loop.start_epoch, loop.epochs):
        stats = _train_epoch(loop, epoch)
        record, val, val_acc = _evaluate_epoch(loop, epoch, stats, on_epoch)
        _save_epoch(loop, epoch, record, val, val_acc)
    return _finish(loop)


def _start(distiller: Distiller, data, cfg, run: RunDir, runtime: Runtime, dist: distributed.Distributed, echo: bool) -> _Loop:
    """The loop's parts: the run folder cleaned, the log, the (sharded) loaders, optimiser, schedule and scaler."""
    main = dist.is_main
    echo = echo and main
    if main:
        run.checkpoints.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(run.checkpoints)  # left by a run killed while writing a checkpoint
    log = TextLog(run.log, echo=echo) if main else (lambda message: None)
    loaders = tuple(loader.shard(dist.rank, dist.world_size) if dist.enabled and loader is not None else loader
                    for loader in (data.train, data.val, data.test))
    if len(loaders[0]) == 0:
        raise GapkdError("the training loader has no batches; lower data.batch_size or keep more samples.")
    loop = _Loop(distiller, distributed.wrap(distiller, dist, runtime.device), cfg, run, runtime, dist, log, echo, loaders,
                 data.val is not None)
    groups = distiller.param_groups()
    loop.clip_groups = distiller.clip_groups()
    loop.optimizer = build_optimizer(groups, cfg.optim)
    loop.scheduler = build_scheduler(loop.optimizer, cfg.schedule, loop.epochs, loop.steps_per_epoch, cfg.optim.lr, groups)
    loop.scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.amp_dtype is torch.float16)
    loop.check_every_step = runtime.device.type == "cpu" or cfg.train.nonfinite == "skip"
    loop.config_hash = cfg.hparams_hash()
    return loop


def _resume(loop: _Loop) -> None:
    """Continue from state.pt when the run was interrupted (its config must be this one); open metrics.jsonl."""
    run, cfg = loop.run, loop.cfg
    if run.state.exists():
        state = safe_load(run.state)
        if state.get("config_hash") != loop.config_hash:
            raise GapkdError(
                f"{run} holds a run with a different config; choose another run.name or delete the folder to start over."
            )
        missing, unexpected = loop.distiller.load_state_dict(state["model"], strict=False)
        frozen = set(loop.distiller.state_dict()) - set(loop.distiller.trainable_state_dict())  # not saved, so not expected back
        missing = [k for k in missing if k not in frozen]
        if missing or unexpected:
            raise GapkdError(f"{run.state} does not fit this method: missing {missing[:5]}, unexpected {unexpected[:5]}.")
        loop.optimizer.load_state_dict(state["optimizer"])
        loop.scheduler.load_state_dict(state["scheduler"])
        loop.scaler.load_state_dict(state["scaler"])
        loop.start_epoch, loop.best, loop.history = state["epoch"], state["best"], state["history"]
        loop.train_seconds, loop.skipped = state["train_seconds"], state.get("skipped_steps", 0)
        loop.log(f"resuming {run.name} after epoch {loop.start_epoch}/{loop.epochs}")
    if loop.dist.is_main:
        loop.metrics = MetricsLog(run.metrics, keep_epochs=loop.start_epoch,
                                  tensorboard_dir=run.tensorboard if cfg.train.tensorboard else None)
    if loop.dist.enabled:
        loop.log(f"distributed: {loop.dist.world_size} processes ({loop.dist.backend}), global batch {cfg.data.batch_size}")
    loop.dist.barrier()  # rank 0 has cleaned the folder before any process goes on


@dataclass
class _EpochStats:
    losses: dict
    train_acc: float
    seconds: float
    grad_stats: dict  # per clip group: mean gradient norm and clip factor over the epoch's steps


def _train_epoch(loop: _Loop, epoch: int) -> _EpochStats:
    """One pass over the training split; the losses averaged over the epoch's steps (and processes)."""
    cfg, dist, device = loop.cfg, loop.dist, loop.runtime.device
    # randomness inside methods, reproducible per epoch (and independent across processes)
    torch.manual_seed(cfg.seed * 1_000_003 + epoch + (dist.rank << 40))
    loop.distiller.train()
    started = time.perf_counter()
    sums: dict[str, torch.Tensor] = {}
    grad_sums = torch.zeros(2, len(loop.clip_groups), device=device)  # per group: norm, clip factor
    correct = torch.zeros((), device=device)
    seen = done_steps = 0
    bar = progress_bar(loop.steps_per_epoch, f"epoch {epoch + 1}/{loop.epochs}", loop.echo)
    for index, batch in enumerate(loop.loaders[0].epoch(epoch)):
        out, loss, grad = _train_step(loop, epoch, epoch * loop.steps_per_epoch + index, batch)
        if out is not None:
            grad_sums += grad
            for name, value in out.losses.items():
                value = value.detach().float()
                if batch.weight != 1.0:  # a slice of an uneven last global batch (DDP)
                    value = value * batch.weight
                sums[name] = sums.get(name, 0.0) + value  # a new tensor: the step's own outputs may be reused (CUDA graphs)
            correct += (out.logits.detach().argmax(1) == batch.labels).sum()
            seen += batch.labels.numel()
            done_steps += 1
            if bar is not None and (index + 1) % cfg.train.log_every == 0:
                bar.set_postfix(loss=f"{float(loss):.3f}")  # the one sync, only on a terminal
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    if dist.enabled:  # logged over the global batch: losses averaged, accuracy counted over processes
        reduced = distributed.all_reduce_sum(torch.stack([*sums.values(), correct, torch.tensor(float(seen), device=device)]), dist)
        sums = {name: value / dist.world_size for name, value in zip(sums, reduced)}
        correct, seen = reduced[-2], int(reduced[-1])
        distributed.sync_buffers(loop.distiller, dist)
    if done_steps == 0:  # train.nonfinite=skip skipped them all: nothing was trained, which is no success
        raise NonFiniteLossError(
            f"every step of epoch {epoch + 1} ({loop.steps_per_epoch}) was NaN/Inf and skipped (train.nonfinite=skip): nothing "
            "trained. Check the teacher checkpoint and the data; lower optim.lr or set train.grad_clip."
        )
    diverged = diverged_tensor(loop.distiller.trainable_state_dict())  # finite losses do not prove finite weights
    if diverged is not None:
        kept = f"the last good checkpoint {loop.run.state} is kept" if loop.run.state.exists() else "no checkpoint had been written yet"
        raise NonFiniteLossError(
            f"the run diverged in epoch {epoch + 1}: {diverged} (weights and BatchNorm statistics are checked before "
            f"every checkpoint); nothing of this epoch was saved and {kept}. Lower optim.lr or set train.grad_clip."
        )
    losses = {name: float(value) / max(done_steps, 1) for name, value in sums.items()}
    grad_means = (grad_sums / max(done_steps, 1)).tolist()
    grad_stats = {
        **{f"grad_norm/{name}": value for (name, _), value in zip(loop.clip_groups, grad_means[0])},
        **{f"clip_factor/{name}": value for (name, _), value in zip(loop.clip_groups, grad_means[1])},
    }
    if not loop.check_every_step:
        bad = _nonfinite_term({k: torch.tensor(v) for k, v in losses.items()}, None)
        if bad is not None:
            raise NonFiniteLossError(_nonfinite_message(bad, epoch, None, loop.run.state, loop.runtime.amp_dtype, cfg.train.amp))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    loop.train_seconds += seconds
    return _EpochStats(losses, 100.0 * float(correct) / max(seen, 1), seconds, grad_stats)


def _train_step(loop: _Loop, epoch: int, step: int, batch):
    """One optimiser step: forward under autocast, backward, clipping, the non-finite check, the
    update. Returns the step's output, its loss and the stacked (gradient norms, clip factors) of the clip
    groups, or (None, None, None) for a skipped step (train.nonfinite=skip)."""
    cfg, optimizer, scaler = loop.cfg, loop.optimizer, loop.scaler
    info = StepInfo(epoch, step, loop.epochs, loop.steps_per_epoch, batch.indices, getattr(batch, "strong_images", None),
                    views=getattr(batch, "views", None), teacher_logits=getattr(batch, "teacher_logits", None))
    if loop.runtime.cuda_graphs:
        torch.compiler.cudagraph_mark_step_begin()
    with loop.runtime.autocast():
        out = loop.model(batch.images, batch.labels, info)
    loss = sum(out.losses.values())
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss * batch.weight if batch.weight != 1.0 else loss).backward()
    scaler.unscale_(optimizer)  # a no-op without fp16 loss scaling
    norms, factors = clip_gradients(loop.clip_groups, cfg.train.grad_clip, cfg.train.grad_clip_mode)
    grad_norm = norms.sum() if cfg.train.grad_clip is not None else None
    if loop.check_every_step:
        bad = _nonfinite_term(out.losses, grad_norm)
        if distributed.any_process(bad is not None, loop.dist, loop.runtime.device):  # every process takes the same branch
            bad = bad or "a loss term on another process"
            if cfg.train.nonfinite == "stop":
                raise NonFiniteLossError(_nonfinite_message(bad, epoch, step, loop.run.state, loop.runtime.amp_dtype, cfg.train.amp))
            loop.skipped += 1
            optimizer.zero_grad(set_to_none=True)
            scaler.update()
            loop.scheduler.step()
            return None, None, None
    scaler.step(optimizer)
    scaler.update()
    loop.scheduler.step()
    return out, loss, torch.stack([norms, factors])


def _evaluate_epoch(loop: _Loop, epoch: int, stats: _EpochStats, on_epoch) -> tuple[dict, dict, Optional[float]]:
    """Every head on the validation and test splits; the epoch's record (with what ``on_epoch`` adds),
    the validation accuracy of every head and the one selected on."""
    _, val_loader, test_loader = loop.loaders
    amp_ctx = loop.runtime.autocast
    val = evaluate(loop.distiller, val_loader, amp_ctx) if val_loader is not None else {}
    test = evaluate(loop.distiller, test_loader, amp_ctx)
    val_acc = val.get("student", test["student"] if not loop.has_val else None)
    record = {
        "epoch": epoch + 1,
        "lr": loop.optimizer.param_groups[0]["lr"],
        "train_loss": sum(stats.losses.values()),
        **{f"loss/{k}": v for k, v in stats.losses.items()},
        "train_acc": stats.train_acc,
        **stats.grad_stats,
        **{f"val_acc/{k}": v for k, v in val.items()},
        **{f"test_acc/{k}": v for k, v in test.items()},
        "val_acc": val.get("student"),
        "test_acc": test["student"],
        "epoch_seconds": stats.seconds,
        "skipped_steps": loop.skipped,
    }
    if on_epoch is not None and loop.dist.is_main:
        record.update(on_epoch(loop.distiller, epoch, record) or {})  # sees the epoch's accuracies; may add keys
    loop.history.append(record)
    if loop.metrics is not None:
        loop.metrics.write(record)
    return record, val, val_acc


def _save_epoch(loop: _Loop, epoch: int, record: dict, val: dict, val_acc: Optional[float]) -> None:
    """best.pt when validation improved, the epoch's log line, and state.pt every train.checkpoint_every
    epochs and at the end (files: rank 0)."""
    main, cfg = loop.dist.is_main, loop.cfg
    improved = loop.has_val and val_acc > loop.best["val"]
    if improved:
        loop.best = {"val": val_acc, "epoch": epoch + 1, "test": record["test_acc"]}
    if improved and main:
        atomic_save(deployable_payload(loop.distiller, cfg, epoch + 1, val_acc), loop.run.best)
    heads = "  ".join(f"{k} {v:.2f}" for k, v in val.items() if k != "student")
    loop.log(
        f"epoch {epoch + 1}/{loop.epochs}  loss {record['train_loss']:.4f}  train {record['train_acc']:.2f}  "
        + (f"val {val_acc:.2f}" if loop.has_val else "val -") + f"  test {record['test_acc']:.2f}"
        + (f"  [{heads}]" if heads else "") + f"  {record['epoch_seconds']:.1f}s"
    )
    if main and ((epoch + 1) % cfg.train.checkpoint_every == 0 or epoch + 1 == loop.epochs):
        atomic_save(
            {
                "epoch": epoch + 1, "model": loop.distiller.trainable_state_dict(), "optimizer": loop.optimizer.state_dict(),
                "scheduler": loop.scheduler.state_dict(), "scaler": loop.scaler.state_dict(), "best": loop.best,
                "history": loop.history, "train_seconds": loop.train_seconds, "config_hash": loop.config_hash,
                "skipped_steps": loop.skipped,
            },
            loop.run.state,
        )


def _finish(loop: _Loop) -> FitResult:
    """last.pt (and best.pt without a validation split) and summary.json; every process waits for them."""
    main, cfg, epochs = loop.dist.is_main, loop.cfg, loop.epochs
    if loop.metrics is not None:
        loop.metrics.close()
    last = loop.history[-1] if loop.history else {}
    best = loop.best
    if not loop.has_val:  # nothing to select on: report the last epoch and say so
        best = {"val": None, "epoch": epochs, "test": last.get("test_acc")}
    if main:
        atomic_save(deployable_payload(loop.distiller, cfg, epochs, last.get("val_acc")), loop.run.last)
    if main and not loop.has_val:
        atomic_save(deployable_payload(loop.distiller, cfg, epochs, None), loop.run.best)
    summary = {
        "run": loop.run.name,
        "method": cfg.method.name,
        "student": cfg.student.name,
        "teacher": cfg.teacher.name if cfg.teacher else None,
        "dataset": cfg.data.name,
        "seed": cfg.seed,
        "best_val_acc": best["val"],
        "best_epoch": best["epoch"],
        "test_acc_at_best_val": best["test"],
        "last_val_acc": last.get("val_acc"),
        "last_test_acc": last.get("test_acc"),
        "epochs": epochs,
        "train_seconds": loop.train_seconds,
        "skipped_steps": loop.skipped,
        "selection": "best validation epoch" if loop.has_val else "last epoch (no validation split)",
        "config_hash": loop.config_hash,
    }
    if main:
        atomic_write_text(loop.run.summary, json.dumps(summary, indent=2) + "\n")
    loop.dist.barrier()  # the run's files are complete before any process returns
    return FitResult(summary, loop.history)


def _nonfinite_term(losses: dict[str, torch.Tensor], grad_norm) -> str | None:
    for name, value in losses.items():
        if not bool(torch.isfinite(value.detach()).all()):
            return f"loss term '{name}'"
    if grad_norm is not None and not bool(torch.isfinite(grad_norm)):
        return "gradient norm"
    return None


def _nonfinite_message(term: str, epoch: int, step: int | None, state_path: Path, amp_dtype=None, amp: str = "off") -> str:
    where = f"step {step} (epoch {epoch + 1})" if step is not None else f"epoch {epoch + 1}"
    kept = f"the last good checkpoint {state_path} is kept" if state_path.exists() else "no checkpoint had been written yet"
    precision = ""
    if amp_dtype is not None:  # reduced precision is a suspect as much as the learning rate
        name = "bf16" if amp_dtype is torch.bfloat16 else "fp16"
        precision = (f" The step ran under {name} autocast (train.amp={amp}): if the same command with train.amp=off "
                     "trains, the cause is the reduced precision, not the learning rate.")
    return (
        f"{term} became NaN/Inf at {where}; {kept}. Lower optim.lr, set train.grad_clip, check the data, "
        f"or set train.nonfinite=skip to skip such steps.{precision}"
    )
