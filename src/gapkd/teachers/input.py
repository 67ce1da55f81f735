"""``teacher.input``: a teacher trained at another resolution, normalisation or channel order.

The batch arrives normalised for the student (the dataset's mean and std, RGB, the dataset's image
size). :class:`InputAdapter` turns it into what the teacher was trained on, on the device and for the
whole batch at once, inside the teacher's own forward: undo the dataset's normalisation and apply the
teacher's as one per-channel affine map (``x * scale + shift``), reorder the channels (BGR), and
resize bilinearly to the teacher's side (antialiased when shrinking). It runs once per teacher
forward, so once per training step and view; the student never sees it.

The adapter is a :class:`~gapkd.models.StagedNet` that delegates to the teacher: stage-by-stage
running (DFPT-KD), ``forward_features`` and the classifier are the teacher's, after the input is
adapted. Its state dict is the teacher's own (no prefix), and its constants are not saved."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.errors import ConfigError
from ..models.adapter import _add_prefix, _strip_prefix
from ..models.base import Features, StagedNet


class InputAdapter(StagedNet):
    def __init__(self, model: nn.Module, data_mean: Sequence[float], data_std: Sequence[float], *, size: Optional[int] = None,
                 mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None, channels: str = "rgb"):
        channels_in = len(data_mean)
        super().__init__(getattr(model, "num_classes", 0), channels_in, list(getattr(model, "stage_channels", [])))
        mean = list(data_mean) if mean is None else list(mean)
        std = list(data_std) if std is None else list(std)
        if not len(mean) == len(std) == len(data_std) == channels_in:
            raise ConfigError(f"teacher.input.mean and teacher.input.std need one value per channel of the data ({channels_in}); "
                              f"got {len(mean)} and {len(std)}.")
        if channels == "bgr" and channels_in != 3:
            raise ConfigError(f"teacher.input.channels=bgr reorders three channels, but the data has {channels_in}.")
        order = [2, 1, 0] if channels == "bgr" else list(range(channels_in))
        d_mean, d_std = torch.tensor(data_mean, dtype=torch.float32)[order], torch.tensor(data_std, dtype=torch.float32)[order]
        t_mean, t_std = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
        if bool((t_std <= 0).any()):
            raise ConfigError(f"teacher.input.std must be positive, got {std}.")
        # x_teacher = (x * d_std + d_mean - t_mean) / t_std, per channel, in the teacher's channel order
        self.register_buffer("scale", (d_std / t_std).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("shift", ((d_mean - t_mean) / t_std).view(1, -1, 1, 1), persistent=False)
        self.order = order if channels == "bgr" else None
        self.size = size
        self.identity_affine = bool(torch.equal(self.scale, torch.ones_like(self.scale)) and not self.shift.any())
        self.model = model
        self.register_state_dict_post_hook(_strip_prefix)
        self.register_load_state_dict_pre_hook(_add_prefix)

    def adapt(self, x: Tensor) -> Tensor:
        """The student's batch as the teacher was trained to see it."""
        if self.order is not None:
            x = x[:, self.order]
        if not self.identity_affine:
            x = x * self.scale.to(x.dtype) + self.shift.to(x.dtype)
        if self.size is not None and (x.shape[-2], x.shape[-1]) != (self.size, self.size):
            shrink = x.shape[-1] > self.size or x.shape[-2] > self.size
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=shrink)
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self.model(self.adapt(x))

    def forward_features(self, x: Tensor) -> Features:
        return self.model.forward_features(self.adapt(x))

    def forward_stem(self, x: Tensor) -> Tensor:
        return self.model.forward_stem(self.adapt(x))

    @property
    def stages(self) -> list[nn.Module]:
        return self.model.stages

    def forward_head(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.model.forward_head(x)

    def forward_pool(self, x: Tensor) -> Tensor:
        return self.model.forward_pool(x)

    @property
    def classifier(self) -> nn.Module:
        return self.model.classifier

    def extra_repr(self) -> str:
        return f"size={self.size}, channels={'bgr' if self.order else 'as the data'}"


def adapt_input(model: nn.Module, spec, data) -> nn.Module:
    """``model`` seeing ``data``'s batches as ``spec`` (a ``teacher.input`` config) says it was trained."""
    return InputAdapter(model, data.mean, data.std, size=spec.size, mean=spec.mean, std=spec.std, channels=spec.channels)
