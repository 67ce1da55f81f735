"""Data-parallel training (DDP) across processes launched by torchrun.

A run joins the job torchrun describes in its environment (WORLD_SIZE, RANK, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT): NCCL and device cuda:LOCAL_RANK on GPUs, gloo on CPUs.
``data.batch_size`` stays the global batch; each process trains on its slice of every global
batch (:meth:`gapkd.data.DeviceLoader.shard`) and DDP averages the gradients, so an update
equals the single-process update on the same global batch. Only rank 0 writes to the run
directory. See docs/distributed.md for what matches what, and the limits.
"""
from __future__ import annotations

import atexit
import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch import nn

from .errors import ConfigError


@dataclass(frozen=True)
class Distributed:
    """Where this process stands in the job; the default is a plain single-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and logs."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch_dist.barrier()


SINGLE = Distributed()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def current() -> Distributed:
    """The job this process has already joined (SINGLE when none)."""
    if not (torch_dist.is_available() and torch_dist.is_initialized()) or torch_dist.get_world_size() == 1:
        return SINGLE
    return Distributed(torch_dist.get_rank(), torch_dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                       torch_dist.get_backend())


def setup(device: torch.device) -> tuple[Distributed, torch.device]:
    """Join torchrun's job (once per process; later runs in the same process reuse it) and return
    it with this process's device: ``device`` on CPU, ``cuda:LOCAL_RANK`` on GPUs."""
    if not launched_by_torchrun():
        return SINGLE, device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if device.index not in (None, local_rank):
            raise ConfigError(f"train.device={device}, but under torchrun each process uses cuda:LOCAL_RANK (this one "
                              f"cuda:{local_rank}); set train.device=auto or cuda.")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not torch_dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch_dist.init_process_group(backend=backend, init_method="env://")
        atexit.register(_leave)
    return current(), device


def _leave() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def check_batch_size(batch_size: int, dist: Distributed) -> None:
    if batch_size % dist.world_size:
        raise ConfigError(
            f"data.batch_size={batch_size} is the global batch and must split evenly over the {dist.world_size} "
            f"processes; use a multiple of {dist.world_size} (each process then trains on batch_size/{dist.world_size})."
        )


def check_supported(distiller: nn.Module) -> None:
    """Refuse methods whose per-sample state (memory banks) DDP would not keep in step across processes."""
    if not getattr(distiller, "supports_ddp", True):
        why = getattr(distiller, "ddp_unsupported_reason", None) or (
            "keeps per-sample state (a memory bank) that each process would update for its own samples only")
        raise ConfigError(
            f"method {type(distiller).__name__} {why}; it cannot train under torchrun with more than one process yet. "
            "Run it in a single process (`gapkd distill ...` without torchrun, or torchrun --nproc_per_node 1)."
        )


def frozen_names(distiller: nn.Module) -> set[str]:
    """Parameters and buffers that never change (teacher, reference models): not in trainable_state_dict."""
    return set(distiller.state_dict()) - set(distiller.trainable_state_dict())


def wrap(distiller: nn.Module, dist: Distributed, device: torch.device) -> nn.Module:
    """The module the training step calls: ``distiller`` itself in a single process, else DDP around it.

    The frozen teacher is left out of DDP (its weights are neither broadcast nor reduced); on CUDA
    the trainable BatchNorm layers become SyncBatchNorm (statistics over the global batch, as in a
    single process). Buffers are not broadcast on every step: :func:`sync_buffers` makes them agree
    before each evaluation. Checkpoints keep using ``distiller``, so their keys have no ``module.``."""
    if not dist.enabled:
        return distiller
    check_supported(distiller)
    frozen = frozen_names(distiller)
    if device.type == "cuda":
        convert_batchnorm(distiller, frozen)
    ddp = nn.parallel.DistributedDataParallel
    ddp._set_params_and_buffers_to_ignore_for_model(distiller, sorted(frozen))
    # no buffer broadcast before every forward (torch >= 2.13 names that option forward_sync_buffers)
    no_buffer_sync = {"forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters
                      else "broadcast_buffers": False}
    return ddp(distiller, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True,
               **no_buffer_sync)


def convert_batchnorm(distiller: nn.Module, frozen: set[str]) -> None:
    """Turn the trainable BatchNorm layers into SyncBatchNorm. In place, object by object (same
    parameters, buffers and state-dict keys): a layer may also be referenced outside the module
    tree (StagedNet's stage chains are), so replacing it by a new module would leave stale copies."""
    for name, module in distiller.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, nn.SyncBatchNorm):
            if f"{name}.running_mean" in frozen or f"{name}.weight" in frozen:
                continue
            module.__class__ = nn.SyncBatchNorm
            module.process_group = None  # the default group: every process of the job


@torch.no_grad()
def sync_buffers(distiller: nn.Module, dist: Distributed) -> None:
    """Make every process's trainable buffers agree: the running statistics of unsynchronised
    normalisation layers (each process saw only its slices) are averaged; all else is taken from rank 0."""
    if not dist.enabled:
        return
    trainable = set(distiller.trainable_state_dict())
    for module_name, module in distiller.named_modules():
        local_statistics = isinstance(module, nn.modules.batchnorm._NormBase) and not isinstance(module, nn.SyncBatchNorm)
        for buffer_name, buffer in module.named_buffers(recurse=False):
            if f"{module_name}.{buffer_name}".lstrip(".") not in trainable:
                continue
            if local_statistics and buffer.is_floating_point():
                torch_dist.all_reduce(buffer)
                buffer.div_(dist.world_size)
            else:
                torch_dist.broadcast(buffer, 0)


def all_reduce_sum(tensor: torch.Tensor, dist: Distributed) -> torch.Tensor:
    """Sum of ``tensor`` over processes (a new tensor; the input is unchanged)."""
    if not dist.enabled:
        return tensor
    total = tensor.clone()
    torch_dist.all_reduce(total)
    return total


def all_gather(tensor: torch.Tensor, dist: Distributed) -> list[torch.Tensor]:
    """Every process's ``tensor``, in rank order (``[tensor]`` in a single process). Their first
    dimensions may differ (the slices of an uneven last batch); the other dimensions must agree."""
    if not dist.enabled:
        return [tensor]
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.empty_like(size) for _ in range(dist.world_size)]
    torch_dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))  # gloo gathers equal shapes only
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(dist.world_size)]
    torch_dist.all_gather(parts, padded)
    return [part[:n] for part, n in zip(parts, sizes)]


def any_process(flag: bool, dist: Distributed, device: torch.device) -> bool:
    """True on every process when ``flag`` is True on any of them (so all take the same branch)."""
    if not dist.enabled:
        return flag
    return bool(all_reduce_sum(torch.tensor(float(flag), device=device), dist) > 0)
