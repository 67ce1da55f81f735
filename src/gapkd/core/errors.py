"""User-facing errors: one clear message that names the problem and the fix."""
from __future__ import annotations

import difflib
from typing import Iterable


class GapkdError(Exception):
    """An error the user can fix. The CLI prints its message alone, without a traceback."""


class ConfigError(GapkdError):
    """A bad config key, value or name."""


class DataError(GapkdError):
    """Missing, corrupt or malformed data."""


class CheckpointError(GapkdError):
    """A checkpoint that cannot be read or does not fit the model."""


class NonFiniteLossError(GapkdError):
    """A NaN or Inf loss or gradient during training."""


def suggest(name: str, choices: Iterable[str]) -> str:
    """' Did you mean ...?' for the closest choices, or an empty string."""
    close = difflib.get_close_matches(str(name).lower(), [str(c).lower() for c in choices], n=3, cutoff=0.5)
    lookup = {str(c).lower(): str(c) for c in choices}
    return f" Did you mean {', '.join(repr(lookup[c]) for c in close)}?" if close else ""
