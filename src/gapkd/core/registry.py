"""One small generic registry: name -> factory, with case-insensitive aliases and
"did you mean" errors. Models, methods, datasets and pipelines each own one instance. A name
that is not there, and listing a registry, first import installed plugins
(:func:`gapkd.core.plugins.load_entry_points`), once per process."""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from .errors import ConfigError, suggest
from .plugins import load_entry_points

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, *aliases: str) -> Callable[[T], T]:
        """Decorator: ``@MODELS.register("resnet20")``."""

        def add(obj: T) -> T:
            self.add(name, obj, *aliases)
            return obj

        return add

    def add(self, name: str, obj: T, *aliases: str) -> None:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = obj
        for alias in (name, *aliases):
            key = alias.lower()
            if key in self._aliases and self._aliases[key] != name:
                raise ValueError(f"{self.kind} alias {alias!r} already points to {self._aliases[key]!r}")
            self._aliases[key] = name

    def canonical(self, name: str) -> str:
        """The registered name for ``name`` (case-insensitive, aliases allowed)."""
        key = str(name).lower()
        if key not in self._aliases:
            load_entry_points()
        if key not in self._aliases:
            raise ConfigError(
                f"Unknown {self.kind} {name!r}.{suggest(name, self._entries)} "
                f"Run `gapkd list {self.kind}s` to see all {len(self._entries)} of them."
            )
        return self._aliases[key]

    def get(self, name: str) -> T:
        return self._entries[self.canonical(name)]

    def __contains__(self, name: object) -> bool:
        if str(name).lower() not in self._aliases:
            load_entry_points()
        return str(name).lower() in self._aliases

    def names(self) -> list[str]:
        """Every registered name, installed plugins' included."""
        load_entry_points()
        return list(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())
