"""The one training loop, for teachers and students alike. It knows nothing of any
particular method: it trains what ``Distiller.param_groups()`` returns, sums the named
losses, evaluates every head the distiller offers, and owns clipping, AMP, schedules,
checkpoints, exact resume and data-parallel training (DDP, see :mod:`.distributed`)."""
from __future__ import annotations

import contextlib
import functools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import GapkdError, NonFiniteLossError
from ..methods.base import Distiller, StepInfo
from . import distributed
from .clipping import clip_gradients
from .checkpoint import atomic_save, atomic_write_text, remove_stale_temporaries, safe_load
from .optim import build_optimizer, build_scheduler
from .runlog import MetricsLog, TextLog, progress_bar

STATE_FILE = "state.pt"


@dataclass
class FitResult:
    summary: dict
    history: list[dict] = field(default_factory=list)


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX), where bf16 autocast is
    about twice as fast as fp32; elsewhere it is emulated and slower, so ``auto`` keeps fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_amp(device: torch.device, amp: str) -> str:
    """``train.amp`` as it will run: auto = bf16 on CUDA and on CPUs with native bf16, off elsewhere."""
    if amp != "auto":
        return amp
    return "bf16" if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()) else "off"


def resolve_channels_last(device: torch.device, amp: str, channels_last: bool | None = None) -> bool:
    """``train.channels_last`` as it will run: by default on wherever autocast runs (CUDA, native-bf16 CPUs)."""
    if channels_last is not None:
        return channels_last
    return resolve_amp(device, amp) != "off"


def uses_cuda_graphs(train_cfg) -> bool:
    """Whether the compiled step replays as CUDA graphs (compile modes reduce-overhead and max-autotune,
    on CUDA), which reuse their output memory at every replay: each step must be marked as a new one."""
    return bool(train_cfg.compile) and train_cfg.compile_mode in ("reduce-overhead", "max-autotune")


def autocast_context(device: torch.device, amp: str):
    """The autocast context of ``train.amp`` (see :func:`resolve_amp`) and its dtype (None: fp32)."""
    amp = resolve_amp(device, amp)
    if amp == "off":
        return contextlib.nullcontext, None
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    return (lambda: torch.autocast(device.type, dtype=dtype)), dtype


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


def fit(distiller: Distiller, data, cfg, run_dir: Path, device: torch.device, *, echo: bool = True, on_epoch=None,
        dist: distributed.Distributed | None = None) -> FitResult:
    """Train ``distiller`` for cfg.train.epochs, resuming from run_dir/checkpoints/state.pt if present.
    ``on_epoch(distiller, epoch, record)`` runs after each epoch's evaluation; keys it returns join the record.
    Under DDP (``dist``, default: the job this process joined) every process trains its shard; only rank 0
    writes files and runs ``on_epoch``."""
    run_dir = Path(run_dir)
    dist = dist or distributed.current()
    main = dist.is_main
    echo = echo and main
    ckpt_dir = run_dir / "checkpoints"
    if main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(ckpt_dir)  # left by a run killed while writing a checkpoint
    log = TextLog(run_dir / "train.log", echo=echo) if main else (lambda message: None)
    model = distributed.wrap(distiller, dist, device)  # what the step calls; checkpoints use distiller itself
    train_loader, val_loader, test_loader = (
        loader.shard(dist.rank, dist.world_size) if dist.enabled and loader is not None else loader
        for loader in (data.train, data.val, data.test)
    )
    epochs, steps_per_epoch = cfg.train.epochs, len(train_loader)
    if steps_per_epoch == 0:
        raise GapkdError("the training loader has no batches; lower data.batch_size or keep more samples.")

    groups = distiller.param_groups()
    clip_groups = distiller.clip_groups()  # what train.grad_clip bounds, and whose gradient norms are logged
    optimizer = build_optimizer(groups, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.schedule, epochs, steps_per_epoch, cfg.optim.lr, groups)
    amp_ctx, amp_dtype = autocast_context(device, cfg.train.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
    check_every_step = device.type == "cpu" or cfg.train.nonfinite == "skip"
    cuda_graphs = uses_cuda_graphs(cfg.train)
    config_hash = cfg.hparams_hash()

    start_epoch, best, history, train_seconds, skipped = 0, {"val": -1.0, "epoch": 0, "test": None}, [], 0.0, 0
    state_path = ckpt_dir / STATE_FILE
    if state_path.exists():
        state = safe_load(state_path)
        if state.get("config_hash") != config_hash:
            raise GapkdError(
                f"{run_dir} holds a run with a different config; choose another run.name or delete the folder to start over."
            )
        missing, unexpected = distiller.load_state_dict(state["model"], strict=False)
        frozen = set(distiller.state_dict()) - set(distiller.trainable_state_dict())  # not saved, so not expected back
        missing = [k for k in missing if k not in frozen]
        if missing or unexpected:
            raise GapkdError(f"{state_path} does not fit this method: missing {missing[:5]}, unexpected {unexpected[:5]}.")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, best, history = state["epoch"], state["best"], state["history"]
        train_seconds, skipped = state["train_seconds"], state.get("skipped_steps", 0)
        log(f"resuming {run_dir.name} after epoch {start_epoch}/{epochs}")
    metrics = MetricsLog(run_dir / "metrics.jsonl", keep_epochs=start_epoch,
                         tensorboard_dir=run_dir / "tensorboard" if cfg.train.tensorboard else None) if main else None
    if dist.enabled:
        log(f"distributed: {dist.world_size} processes ({dist.backend}), global batch {cfg.data.batch_size}")
    dist.barrier()  # rank 0 has cleaned the folder before any process goes on

    for epoch in range(start_epoch, epochs):
        # randomness inside methods, reproducible per epoch (and independent across processes)
        torch.manual_seed(cfg.seed * 1_000_003 + epoch + (dist.rank << 40))
        distiller.train()
        started = time.perf_counter()
        sums: dict[str, torch.Tensor] = {}
        grad_sums = torch.zeros(2, len(clip_groups), device=device)  # per group: norm, clip factor
        correct = torch.zeros((), device=device)
        seen = done_steps = 0
        bar = progress_bar(steps_per_epoch, f"epoch {epoch + 1}/{epochs}", echo)
        for index, batch in enumerate(train_loader.epoch(epoch)):
            step = epoch * steps_per_epoch + index
            info = StepInfo(epoch, step, epochs, steps_per_epoch, batch.indices, batch.views, batch.teacher_logits)
            if cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            with amp_ctx():
                out = model(batch.images, batch.labels, info)
            loss = sum(out.losses.values())
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss * batch.weight if batch.weight != 1.0 else loss).backward()
            scaler.unscale_(optimizer)  # a no-op without fp16 loss scaling
            norms, factors = clip_gradients(clip_groups, cfg.train.grad_clip, cfg.train.grad_clip_mode)
            grad_norm = norms.sum() if cfg.train.grad_clip is not None else None
            if check_every_step:
                bad = _nonfinite_term(out.losses, grad_norm)
                if distributed.any_process(bad is not None, dist, device):  # every process takes the same branch
                    bad = bad or "a loss term on another process"
                    if cfg.train.nonfinite == "stop":
                        raise NonFiniteLossError(_nonfinite_message(bad, epoch, step, state_path))
                    skipped += 1
                    optimizer.zero_grad(set_to_none=True)
                    scaler.update()
                    scheduler.step()
                    continue
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            for name, value in out.losses.items():
                value = value.detach().float()
                if batch.weight != 1.0:  # a slice of an uneven last global batch (DDP)
                    value = value * batch.weight
                sums[name] = sums.get(name, 0.0) + value  # a new tensor: the step's own outputs may be reused (CUDA graphs)
            grad_sums += torch.stack([norms, factors])
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
            distributed.sync_buffers(distiller, dist)
        epoch_losses = {name: float(value) / max(done_steps, 1) for name, value in sums.items()}
        grad_means = (grad_sums / max(done_steps, 1)).tolist()
        grad_stats = {
            **{f"grad_norm/{name}": value for (name, _), value in zip(clip_groups, grad_means[0])},
            **{f"clip_factor/{name}": value for (name, _), value in zip(clip_groups, grad_means[1])},
        }
        if not check_every_step:
            bad = _nonfinite_term({k: torch.tensor(v) for k, v in epoch_losses.items()}, None)
            if bad is not None:
                raise NonFiniteLossError(_nonfinite_message(bad, epoch, None, state_path))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        epoch_seconds = time.perf_counter() - started
        train_seconds += epoch_seconds

        val = evaluate(distiller, val_loader, amp_ctx) if val_loader is not None else {}
        test = evaluate(distiller, test_loader, amp_ctx)
        val_acc = val.get("student", test["student"] if data.val is None else None)
        record = {
            "epoch": epoch + 1,
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": sum(epoch_losses.values()),
            **{f"loss/{k}": v for k, v in epoch_losses.items()},
            "train_acc": 100.0 * float(correct) / max(seen, 1),
            **grad_stats,
            **{f"val_acc/{k}": v for k, v in val.items()},
            **{f"test_acc/{k}": v for k, v in test.items()},
            "val_acc": val.get("student"),
            "test_acc": test["student"],
            "epoch_seconds": epoch_seconds,
            "skipped_steps": skipped,
        }
        if on_epoch is not None and main:
            record.update(on_epoch(distiller, epoch, record) or {})  # sees the epoch's accuracies; may add keys
        history.append(record)
        if main:
            metrics.write(record)
        improved = data.val is not None and val_acc > best["val"]
        if improved:
            best = {"val": val_acc, "epoch": epoch + 1, "test": test["student"]}
        if improved and main:
            atomic_save(deployable_payload(distiller, cfg, epoch + 1, val_acc), ckpt_dir / "best.pt")
        heads = "  ".join(f"{k} {v:.2f}" for k, v in val.items() if k != "student")
        log(
            f"epoch {epoch + 1}/{epochs}  loss {record['train_loss']:.4f}  train {record['train_acc']:.2f}  "
            f"val {val_acc if val_acc is not None else float('nan'):.2f}  test {test['student']:.2f}"
            + (f"  [{heads}]" if heads else "") + f"  {epoch_seconds:.1f}s"
        )
        if main and ((epoch + 1) % cfg.train.checkpoint_every == 0 or epoch + 1 == epochs):
            atomic_save(
                {
                    "epoch": epoch + 1, "model": distiller.trainable_state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "best": best,
                    "history": history, "train_seconds": train_seconds, "config_hash": config_hash, "skipped_steps": skipped,
                },
                state_path,
            )

    if metrics is not None:
        metrics.close()
    last = history[-1] if history else {}
    if data.val is None:  # nothing to select on: report the last epoch and say so
        best = {"val": None, "epoch": epochs, "test": last.get("test_acc")}
    if main:
        atomic_save(deployable_payload(distiller, cfg, epochs, last.get("val_acc")), ckpt_dir / "last.pt")
    if main and data.val is None:
        atomic_save(deployable_payload(distiller, cfg, epochs, None), ckpt_dir / "best.pt")
    summary = {
        "run": run_dir.name,
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
        "train_seconds": train_seconds,
        "skipped_steps": skipped,
        "selection": "best validation epoch" if data.val is not None else "last epoch (no validation split)",
        "config_hash": config_hash,
    }
    if main:
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    dist.barrier()  # the run's files are complete before any process returns
    return FitResult(summary, history)


def deployable_payload(distiller: Distiller, cfg, epoch: int, val_acc) -> dict:
    """A self-describing model checkpoint: the deployable weights plus how to rebuild them."""
    student = cfg.student
    spec = distiller.deployable_spec()
    return {
        "format": "gapkd-model",
        "version": 1,
        "model": student.name,
        "options": dict(student.options),
        "num_classes": getattr(distiller.student, "num_classes", None),
        "in_channels": getattr(distiller.student, "in_channels", None),
        "method": cfg.method.name,
        "epoch": epoch,
        "val_acc": val_acc,
        "state_dict": {k: v.detach().cpu() for k, v in distiller.deployable().state_dict().items()},
        # a deployable other than the plain student (e.g. SimKD's): which method rebuilds it, and how
        **({"deployable": {"method": cfg.method.name, "options": spec}} if spec is not None else {}),
    }


def _nonfinite_term(losses: dict[str, torch.Tensor], grad_norm) -> str | None:
    for name, value in losses.items():
        if not bool(torch.isfinite(value.detach()).all()):
            return f"loss term '{name}'"
    if grad_norm is not None and not bool(torch.isfinite(grad_norm)):
        return "gradient norm"
    return None


def _nonfinite_message(term: str, epoch: int, step: int | None, state_path: Path) -> str:
    where = f"step {step} (epoch {epoch + 1})" if step is not None else f"epoch {epoch + 1}"
    kept = f"the last good checkpoint {state_path} is kept" if state_path.exists() else "no checkpoint had been written yet"
    return (
        f"{term} became NaN/Inf at {where}; {kept}. Lower optim.lr, set train.grad_clip, check the data, "
        "or set train.nonfinite=skip to skip such steps."
    )
