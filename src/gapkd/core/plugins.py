"""Plugins: methods, models, datasets and pipelines that the user's own Python modules register.

Two ways in, both usable from the ``gapkd`` command and from YAML:

- a config's ``plugins:`` list (``gapkd --plugin MODULE`` adds to it): module names
  (``mypkg.kd``) or paths of ``.py`` files (``./my_method.py``, relative to the current
  directory), imported before the rest of the config is validated;
- an installed package's ``[project.entry-points."gapkd.plugins"]``: imported the first time a
  registry lookup misses or a registry is listed, never by ``import gapkd``. One that fails to
  import is skipped with a :class:`PluginWarning` naming it.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import sys
import warnings
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable, Iterator

from .errors import ConfigError

#: the entry-point group installed packages declare their plugin modules in
ENTRY_POINT_GROUP = "gapkd.plugins"

_entry_points_loaded = False
#: plugins given on the command line (``--plugin``): added to every config built while a command runs
_command_line: ContextVar[tuple[str, ...]] = ContextVar("gapkd_command_line_plugins", default=())


class PluginWarning(UserWarning):
    """An installed plugin entry point that failed to import (gapkd goes on without it)."""


def plugin_list(value: Any) -> list[str]:
    """A config's ``plugins`` value as a list of strings (one string counts as a list of one)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
        return list(value)
    raise ConfigError(f"plugins must be a list of module names or .py paths (plugins: [mypkg.kd, ./my_method.py]), got {value!r}.")


def import_plugins(specs: Iterable[str]) -> None:
    """Import every plugin module (a module name, or the path of a ``.py`` file); once each per process."""
    for spec in specs:
        import_plugin(spec)


def import_plugin(spec: str) -> ModuleType:
    """Import one plugin: ``mypkg.kd`` (importable module) or ``path/to/file.py`` (under :func:`module_name_for`)."""
    if _is_path(spec):
        return _import_file(spec)
    try:
        return importlib.import_module(spec)
    except ImportError as error:
        raise _import_error(spec, error) from None


def module_name_for(path: str | Path) -> str:
    """The stable module name a ``.py`` plugin is imported under: its stem and a hash of its absolute path."""
    resolved = Path(path).expanduser().resolve()
    stem = re.sub(r"\W", "_", resolved.stem)
    return f"gapkd_plugin_{stem}_{hashlib.sha256(str(resolved).encode()).hexdigest()[:8]}"


def load_entry_points() -> None:
    """Import the modules installed packages declare under ``gapkd.plugins``; the first call only."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True  # first: a plugin that looks a name up while loading must not recurse
    from importlib import metadata

    for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry_point.load()
        except Exception as error:  # a broken plugin must not break gapkd
            warnings.warn(f"gapkd: skipped the plugin entry point {entry_point.name!r} ({entry_point.value}, group "
                          f"{ENTRY_POINT_GROUP}): {type(error).__name__}: {error}", PluginWarning, stacklevel=2)


@contextmanager
def command_line_plugins(specs: Iterable[str]) -> Iterator[None]:
    """Import ``specs`` now and add them to every config :func:`gapkd.config.build_config` builds
    inside the block (the ``--plugin`` option: a run's saved config.yaml then lists them)."""
    specs = tuple(specs)
    import_plugins(specs)
    token = _command_line.set(specs)
    try:
        yield
    finally:
        _command_line.reset(token)


def with_command_line_plugins(specs: list[str]) -> list[str]:
    """``specs`` followed by the command line's plugins, each once."""
    return list(dict.fromkeys([*specs, *_command_line.get()]))


def _is_path(spec: str) -> bool:
    return spec.endswith(".py") or "/" in spec or "\\" in spec


def _import_file(spec: str) -> ModuleType:
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ConfigError(f"plugin file {spec} does not exist (a relative path is read from the current directory, "
                          f"{Path.cwd()}); fix the path, or name an importable module instead (plugins: [mypkg.kd]).")
    name = module_name_for(path)
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # before running it: dataclasses and pydantic look their module up by name
    try:
        module_spec.loader.exec_module(module)
    except ImportError as error:
        del sys.modules[name]
        raise _import_error(spec, error) from None
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _import_error(spec: str, error: ImportError) -> ConfigError:
    return ConfigError(
        f"cannot import the plugin {spec!r}: {error}. Install the package that provides it, put its folder on "
        "PYTHONPATH, or give the path of a .py file instead (plugins: [./my_method.py], or --plugin ./my_method.py)."
    )
