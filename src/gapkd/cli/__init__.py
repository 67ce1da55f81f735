"""The ``gapkd`` command (entry point ``gapkd.cli:main``): thin; parses arguments and calls the Python API.

``main`` builds the parser and dispatches, ``common`` holds what every command shares, ``study``
the ``gapkd study`` subcommands."""
from .common import plugin_option
from .main import COMMANDS, build_parser, main

__all__ = ["COMMANDS", "build_parser", "main", "plugin_option"]
