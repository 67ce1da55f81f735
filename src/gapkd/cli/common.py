"""What every `gapkd` command shares: --plugin and the recipe/overrides arguments."""
from __future__ import annotations

import argparse


def plugin_option(dest: str = "plugins") -> argparse.ArgumentParser:
    """A parent parser with ``--plugin MODULE`` (repeatable): every command takes it, before or after its name."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--plugin", action="append", default=[], dest=dest, metavar="MODULE",
                        help="import a module (mypkg.kd) or .py file (./my_method.py) that registers methods, models or "
                             "datasets; repeatable; added to the config's `plugins` (docs/add-a-method.md)")
    return parent


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", help="YAML recipe (keys: data, student, teacher, method, optim, schedule, train, seed, ...)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=0.1 train.epochs=10")
    parser.add_argument("--data-root", help="data root (default: $GAPKD_DATA, then ~/.cache/gapkd/data)")
    parser.add_argument("--overwrite", action="store_true", help="delete an existing run directory of the same name first")
    parser.add_argument("--quiet", action="store_true", help="no per-epoch lines on stdout (train.log still has them)")


def command_overrides(args) -> list[str]:
    """The command's key=value overrides, with ``--data-root`` as ``data.root`` (``run.name=x`` is the config's own run section)."""
    overrides = list(args.overrides)
    if getattr(args, "data_root", None):
        overrides.append(f"data.root={args.data_root}")
    return overrides
