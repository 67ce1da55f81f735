"""Moved to :mod:`gapkd.pipelines.aid`; this name stays an alias of that same module, so old imports (and patches) keep working."""
import importlib
import sys

_moved = importlib.import_module("gapkd.pipelines.aid")

sys.modules[__name__] = _moved
