"""Ops that must not run in reduced precision under CPU autocast.

oneDNN's bf16 convolution on CPU leaves part of the *weight gradient* uninitialised when the
stride is larger than the input's height or width (a 3x3 stride-2 conv on a 1x1 map, as in a
ResNet with the ImageNet stem on 8x8 or 32x32 images): the taps that never meet the input get
whatever the allocator last held, e.g. 1e26, and the gradient norm overflows at once. Which
steps fail depends on the memory left behind by earlier ops, so the same seed passes or fails
from one process to the next. fp32 convolutions of the same shapes are exact (measured by
``tests/test_reliability21.py::test_cpu_bf16_conv_weight_grad_guard``).

:class:`CpuConvGuard` runs just those convolutions in fp32 (and hands back autocast's dtype);
every other op keeps running under autocast. The maps involved are tiny, so the cost is nil.
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

_CONVS = {torch.conv2d, torch.nn.functional.conv2d}


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def stride_exceeds_input(input: torch.Tensor, weight: torch.Tensor, stride) -> bool:
    """Whether a conv2d has a kernel larger than 1x1 and a stride larger than its input's height or width."""
    if input.dim() < 3 or weight.shape[-1] * weight.shape[-2] == 1 or isinstance(stride, str):
        return False
    sh, sw = _pair(stride)
    return sh > input.shape[-2] or sw > input.shape[-1]


class CpuConvGuard(TorchFunctionMode):
    """Inside a CPU autocast block: conv2d whose stride exceeds its input runs in fp32 (see the module doc)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _CONVS and torch.is_autocast_enabled("cpu"):
            input, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            stride = args[3] if len(args) > 3 else kwargs.get("stride", 1)
            if input.device.type == "cpu" and stride_exceeds_input(input, weight, stride):
                dtype = torch.get_autocast_dtype("cpu")
                with torch.autocast("cpu", enabled=False):
                    args = tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
                    kwargs = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kwargs.items()}
                    return func(*args, **kwargs).to(dtype)
        return func(*args, **kwargs)
