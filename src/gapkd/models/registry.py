"""The model registry: name -> factory(num_classes=..., in_channels=..., **kwargs)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from ..core.errors import ConfigError
from ..core.registry import Registry


@dataclass(frozen=True)
class ModelEntry:
    factory: Callable[..., nn.Module]
    input_size: int  # the image side the architecture is designed for (FLOPs are counted there)
    family: str


MODELS: Registry[ModelEntry] = Registry("model")


def register_model(name: str, factory: Callable[..., nn.Module], *aliases: str, input_size: int = 32, family: str = "") -> None:
    MODELS.add(name, ModelEntry(factory, input_size, family), *aliases)


def create_model(name: str, num_classes: int = 100, in_channels: int = 3, **kwargs) -> nn.Module:
    """Build a zoo model by name (case-insensitive). Every model is a StagedNet."""
    entry = MODELS.get(name)
    if num_classes < 1 or in_channels < 1:
        raise ConfigError(f"num_classes and in_channels must be positive, got {num_classes} and {in_channels}.")
    try:
        return entry.factory(num_classes=num_classes, in_channels=in_channels, **kwargs)
    except TypeError as error:
        raise ConfigError(f"Model {name!r} does not take the options {sorted(kwargs)}: {error}") from None


def list_models() -> list[str]:
    return MODELS.names()
