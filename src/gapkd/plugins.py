"""Moved to :mod:`gapkd.core.plugins`; this name stays an alias of that same module, so old imports (and patches) keep working."""
import importlib
import sys

_moved = importlib.import_module("gapkd.core.plugins")

sys.modules[__name__] = _moved
