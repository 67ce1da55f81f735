"""What is installed in the teacher store, and ``zoo:SET/NAME`` resolved against it: the store's
root, each set's ``manifest.json`` and the sha256 check every load of an installed teacher passes.

This is the part the checkpoint loaders (:func:`gapkd.methods.checkpoint.model_from_checkpoint`,
:func:`gapkd.models.load_checkpoint`) need to read ``zoo:`` references, through :func:`checkpoint_path`;
installing (download, safe extraction, the load check) is :mod:`gapkd.teachers.store`."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..core.errors import GapkdError
from .catalogue import PREFIX, TeacherFile, TeacherSet, parse_reference

CHUNK = 1 << 20
MANIFEST = "manifest.json"


class TeacherError(GapkdError):
    """A teacher file or archive that cannot be fetched, imported or trusted."""


def store_root() -> Path:
    explicit = os.environ.get("GAPKD_TEACHERS")
    if explicit:
        return Path(explicit).expanduser()
    from ..data.core import cache_dir

    return cache_dir() / "teachers"


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(set_name: str, root: Path | None = None) -> dict:
    path = (root or store_root()) / set_name / MANIFEST
    if not path.is_file():
        return {}
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise TeacherError(f"{path} is damaged (not JSON); delete the folder {path.parent} and run gapkd teachers fetch "
                           f"{set_name} (or import) again.") from None
    return manifest.get("files", {})


def resolve(reference: str) -> Path:
    """The installed file of ``zoo:SET/NAME``, after checking its sha256 against the manifest."""
    chosen, entry = parse_reference(reference)
    root = store_root()
    record = read_manifest(chosen.name, root).get(entry.name)
    how = f"gapkd teachers fetch {chosen.name}" if (chosen.url or entry.url) else f"gapkd teachers import PATH --set {chosen.name}"
    if record is None:
        raise TeacherError(f"{reference} is not installed (store: {root}); install it with {how}, or with gapkd teachers "
                           "import PATH if you already have the files.")
    path = root / chosen.name / record["file"]
    if not path.is_file():
        raise TeacherError(f"{reference}: its file {path} is gone; install it again with {how}.")
    if sha256_of(path) != record["sha256"]:
        raise TeacherError(f"{reference}: {path} changed after it was installed (its sha256 is no longer the recorded "
                           f"{record['sha256'][:16]}...), so it is not used. Install it again with {how}.")
    return path


def checkpoint_path(checkpoint: str | os.PathLike) -> str | os.PathLike:
    """``zoo:SET/NAME`` as its installed, sha256-checked file; any other checkpoint path as it is."""
    return resolve(str(checkpoint)) if str(checkpoint).startswith(PREFIX) else checkpoint


def reference_of(chosen: TeacherSet, entry: TeacherFile) -> str:
    return f"{PREFIX}{chosen.name}/{entry.name}"
