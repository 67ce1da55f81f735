"""The resolved runtime of a run: device, precision (autocast), memory format and compilation,
decided once from ``train.*`` and passed down to whatever builds, trains or evaluates models."""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from ..core.errors import ConfigError


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX), where bf16 autocast is
    about twice as fast as fp32; elsewhere it is emulated and slower, so ``auto`` keeps fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_device(name: str) -> torch.device:
    """``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` as a torch device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but no CUDA device is available; use train.device=cpu (or auto).")
    return device


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


@dataclass(frozen=True)
class Runtime:
    """How a run computes, resolved once: ``amp`` is off, bf16 or fp16 (never auto); ``compile`` is
    False or a torch.compile backend; ``compile_mode`` None for the default mode."""

    device: torch.device
    amp: str = "off"
    channels_last: bool = False
    compile: Union[bool, str] = False
    compile_mode: Optional[str] = None
    cuda_graphs: bool = False

    @classmethod
    def resolve(cls, device: torch.device | str, amp: str = "auto", channels_last: bool | None = None) -> "Runtime":
        """Evaluation's runtime: a device and train.amp-style precision (with its default memory format)."""
        device = resolve_device(device) if isinstance(device, str) else device
        return cls(device, resolve_amp(device, amp), resolve_channels_last(device, amp, channels_last))

    @classmethod
    def from_train(cls, train_cfg, device: torch.device | None = None) -> "Runtime":
        """A run's runtime from its ``train`` section; ``device`` when already chosen (a DDP process's own)."""
        device = device if device is not None else resolve_device(train_cfg.device)
        backend = "inductor" if train_cfg.compile is True else train_cfg.compile
        return cls(device, resolve_amp(device, train_cfg.amp), resolve_channels_last(device, train_cfg.amp, train_cfg.channels_last),
                   backend or False, None if train_cfg.compile_mode == "default" else train_cfg.compile_mode,
                   uses_cuda_graphs(train_cfg))

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.amp]

    @property
    def autocast(self) -> Callable[[], contextlib.AbstractContextManager]:
        """A factory of the autocast context (a no-op context in fp32): ``with runtime.autocast(): ...``."""
        return autocast_context(self.device, self.amp)[0]

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.preserve_format

    def place(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` on this device, in this memory format."""
        module = module.to(self.device)
        return module.to(memory_format=torch.channels_last) if self.channels_last else module
