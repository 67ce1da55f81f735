"""Installed teachers: download (resumable), safe extraction, a check that every checkpoint loads
into its architecture, and a sha256 manifest that later loads are checked against.

Layout of the store (``$GAPKD_TEACHERS``, else ``$GAPKD_CACHE/teachers``, else ``~/.cache/gapkd/teachers``)::

    <store>/<set>/<name>.pth          one checkpoint per teacher, as published (never rewritten)
    <store>/<set>/manifest.json       {name: {file, arch, sha256, bytes, num_classes, member, source}}
    <store>/.downloads/<set>/         archives and .part files of downloads (resumed from there)

Nothing is written outside the store: archive members are read, never extracted by their own
names, and an archive with absolute paths, ``..`` components or links leading out of it is
refused whole before anything is read from it."""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable, Iterator, Optional

from ..core.errors import GapkdError
from .catalogue import CATALOGUE, TeacherFile, TeacherSet, teacher_set
from .manifest import CHUNK, MANIFEST, TeacherError, read_manifest, reference_of, resolve, sha256_of, store_root

__all__ = ["CHUNK", "MANIFEST", "TeacherError", "download", "fetch", "install", "installed", "read_manifest", "reference_of",
           "resolve", "sha256_of", "store_root"]


# --- downloading -------------------------------------------------------------------------
def download(url: str, target: Path, *, progress: bool = True, opener: Callable = urllib.request.urlopen) -> Path:
    """Download ``url`` to ``target``, resuming ``target.part`` when a previous attempt stopped."""
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = opener(request, timeout=60)
    except urllib.error.HTTPError as error:
        if error.code == 416 and have:  # the .part already holds everything
            os.replace(part, target)
            return target
        raise TeacherError(f"downloading {url} failed: HTTP {error.code} {error.reason}. Check the address (or pass --url "
                           "with a mirror), or download it yourself and run gapkd teachers import FILE.") from None
    except (urllib.error.URLError, OSError) as error:
        raise TeacherError(f"cannot reach {url} ({getattr(error, 'reason', error)}). Check the network, or download the file "
                           "yourself and run gapkd teachers import FILE.") from None
    with response:
        resumed = have and getattr(response, "status", 200) == 206
        if not resumed:
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        from tqdm import tqdm

        bar = tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=target.name, disable=not progress or None, leave=False)
        try:
            with open(part, "ab" if resumed else "wb") as out:
                while True:
                    try:
                        block = response.read(CHUNK)
                    except (OSError, ValueError, http.client.HTTPException) as error:  # a connection closed mid-body
                        raise _interrupted(url, part, total, error) from None
                    if not block:
                        break
                    out.write(block)
                    bar.update(len(block))
        finally:
            bar.close()
    got = part.stat().st_size
    if total is not None and got != total:
        raise _interrupted(url, part, total, f"{got} of {total} bytes arrived")
    os.replace(part, target)
    return target


def _interrupted(url: str, part: Path, total, why) -> TeacherError:
    size = part.stat().st_size if part.is_file() else 0
    return TeacherError(f"the download of {url} stopped after {size} of {total if total is not None else '?'} bytes ({why}); "
                        f"the part is kept in {part}: run the same command again to resume it.")


# --- reading archives and folders safely -------------------------------------------------
@dataclass
class _Source:
    """The regular files of an archive, a folder or a single file: relative path -> opener."""

    label: str
    files: dict[str, Callable[[], BinaryIO]]
    close: Callable[[], None] = lambda: None


def _safe_member_name(name: str) -> bool:
    """Relative, no '..' component, no Windows drive or backslash tricks."""
    path = PurePosixPath(name)
    return bool(path.parts) and not path.is_absolute() and ".." not in path.parts and "\\" not in name and ":" not in path.parts[0]


def _open_tar(path: Path) -> _Source:
    try:
        archive = tarfile.open(path)
    except (tarfile.TarError, OSError) as error:
        raise TeacherError(f"{path} is not a readable tar archive ({error}); download it again (delete it first) or check the file.") from None
    try:
        members = archive.getmembers()
    except (tarfile.TarError, EOFError, OSError) as error:
        archive.close()
        raise TeacherError(f"{path} is truncated or damaged ({error}); delete it and download it again.") from None
    unsafe = []
    for member in members:
        if not _safe_member_name(member.name):
            unsafe.append(f"{member.name!r} (an absolute path or '..')")
        elif member.issym() or member.islnk():
            target = PurePosixPath(member.name).parent / member.linkname if member.issym() else PurePosixPath(member.linkname)
            if PurePosixPath(member.linkname).is_absolute() or ".." in _normalised(target):
                unsafe.append(f"{member.name!r} (a link to {member.linkname!r}, outside the archive)")
        elif not (member.isfile() or member.isdir()):
            unsafe.append(f"{member.name!r} (a device or pipe)")
    if unsafe:
        archive.close()
        raise TeacherError(f"{path} was refused and nothing was extracted: members that would land outside the destination: "
                           f"{'; '.join(unsafe[:5])}. Use the archive from the publisher's page.")
    files = {str(PurePosixPath(m.name)): (lambda m=m: archive.extractfile(m)) for m in members if m.isfile()}
    return _Source(str(path), files, archive.close)


def _normalised(path: PurePosixPath) -> tuple[str, ...]:
    """The parts of ``path`` with inner '..' resolved; a leading '..' stays (it leaves the root)."""
    parts: list[str] = []
    for part in path.parts:
        if part == "..":
            if parts and parts[-1] != "..":
                parts.pop()
            else:
                parts.append("..")
        elif part != ".":
            parts.append(part)
    return tuple(parts)


def _open_folder(path: Path) -> _Source:
    files = {}
    root = path.resolve()
    for file in sorted(path.rglob("*")):
        if file.is_symlink() and not file.resolve().is_relative_to(root):
            continue  # a link out of the folder is not read
        if file.is_file():
            files[file.relative_to(path).as_posix()] = lambda file=file: open(file, "rb")
    return _Source(str(path), files)


def open_source(path: str | os.PathLike) -> _Source:
    path = Path(path)
    if path.is_dir():
        return _open_folder(path)
    if not path.is_file():
        raise TeacherError(f"{path} does not exist; pass the archive (.tar, .tar.gz), folder or checkpoint file you downloaded.")
    if tarfile.is_tarfile(path):
        return _open_tar(path)
    return _Source(str(path), {path.name: lambda: open(path, "rb")})


def _match(source: _Source, chosen: TeacherSet) -> dict[str, tuple[TeacherFile, str]]:
    """{teacher name: (its entry, the source path that holds it)}; a member matches on its path suffix."""
    found = {}
    for entry in chosen.files:
        hits = [name for name in source.files if name == entry.member or name.endswith("/" + entry.member)]
        if len(hits) > 1:
            raise TeacherError(f"{source.label} holds {len(hits)} files that could be {chosen.name}/{entry.name} ({', '.join(hits[:3])}); "
                               "import the folder that holds just one of them.")
        if hits:
            found[entry.name] = (entry, hits[0])
    return found


# --- installing --------------------------------------------------------------------------
def install(path: str | os.PathLike, set_name: str | None = None, *, origin: str | None = None, root: Path | None = None,
            echo: Callable[[str], None] = lambda line: None) -> dict:
    """Install the teachers a tarball, folder or file holds into the store (``gapkd teachers import``).

    Every matched checkpoint is loaded weights-only into its architecture first; if any does not
    fit, nothing is installed. Returns {``zoo:SET/NAME``: its manifest record} for what was installed."""
    root = root or store_root()
    source = open_source(path)
    try:
        sets = [teacher_set(set_name)] if set_name else list(CATALOGUE.values())
        matches = {s.name: m for s in sets if (m := _match(source, s))}
        if not matches:
            expected = "; ".join(f"{s.name}: {', '.join(f.member for f in s.files[:2])}, ..." for s in sets)
            raise TeacherError(f"{source.label} holds no file of a known teacher set (expected names like {expected}). "
                               "gapkd teachers list shows every set and its layout.")
        if len(matches) > 1:
            raise TeacherError(f"{source.label} matches the sets {', '.join(matches)}; pass --set NAME.")
        (chosen_name, found), = matches.items()
        chosen = teacher_set(chosen_name)
        folder = root / chosen.name
        folder.mkdir(parents=True, exist_ok=True)
        written = {}
        with tempfile.TemporaryDirectory(dir=folder, prefix=".incoming-") as staging:
            for name, (entry, member) in found.items():
                staged = Path(staging) / f"{entry.name}.pth"
                digest = _copy_hashed(source.files[member], staged)
                _check_published_hash(entry, digest, member)
                _check_loads(staged, entry, f"{source.label}: {member}")
                written[entry.name] = {"file": staged.name, "arch": entry.arch, "num_classes": entry.num_classes,
                                       "sha256": digest, "bytes": staged.stat().st_size, "member": member,
                                       "source": origin or str(Path(source.label).resolve())}
                echo(f"  {chosen.name}/{entry.name}: {member} loads into {entry.arch}; sha256 {digest[:16]}...")
            for name, record in written.items():  # all checked: move them in, then record them
                os.replace(Path(staging) / record["file"], folder / record["file"])
        _write_manifest(folder, chosen.name, {**read_manifest(chosen.name, root), **written})
        return {reference_of(chosen, chosen.file(name)): record for name, record in written.items()}
    finally:
        source.close()


def _copy_hashed(opener: Callable[[], BinaryIO], target: Path) -> str:
    digest = hashlib.sha256()
    with opener() as handle, open(target, "wb") as out:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
            out.write(block)
    return digest.hexdigest()


def _check_published_hash(entry: TeacherFile, digest: str, member: str) -> None:
    if entry.sha256_prefix and not digest.startswith(entry.sha256_prefix):
        raise TeacherError(f"{member}: its sha256 starts {digest[:8]}, but the publisher's name promises {entry.sha256_prefix} "
                           "(a damaged or different file); nothing was installed. Download it again.")


def _check_loads(path: Path, entry: TeacherFile, label: str) -> None:
    from ..core.io import safe_load
    from ..models import create_model, extract_state_dict, load_state_dict_strict

    try:
        model = create_model(entry.arch, num_classes=entry.num_classes, in_channels=entry.in_channels)
        load_state_dict_strict(model, extract_state_dict(safe_load(path)), source=label)
    except GapkdError as error:
        raise TeacherError(f"{label} is not a {entry.arch} checkpoint, so nothing was installed: {error}") from None


def _write_manifest(folder: Path, set_name: str, files: dict) -> None:
    from ..core.io import atomic_write_text

    atomic_write_text(folder / MANIFEST, json.dumps({"set": set_name, "files": files}, indent=1, sort_keys=True) + "\n")


def fetch(reference: str, *, url: str | None = None, progress: bool = True, root: Path | None = None,
          echo: Callable[[str], None] = lambda line: None) -> dict:
    """Download and install a set (``mdistiller``) or one teacher of a set published file by file
    (``torchvision/resnet34``): ``gapkd teachers fetch``. ``url`` replaces the catalogue's address
    (a mirror, or a local copy served over HTTP)."""
    root = root or store_root()
    set_name, _, file_name = reference.partition("/")
    chosen = teacher_set(set_name)
    if file_name:
        chosen.file(file_name)  # an unknown name fails before anything is downloaded
    downloads = root / ".downloads" / chosen.name
    if chosen.url or (url and not file_name):
        address = url or chosen.url
        return _install_download(download(address, downloads / _basename(address), progress=progress), chosen, address, root, echo)
    entries = [chosen.file(file_name)] if file_name else list(chosen.files)
    if url and len(entries) != 1:
        raise TeacherError(f"--url names one file; fetch one teacher of {chosen.name} with it (e.g. {chosen.name}/{entries[0].name}).")
    written = {}
    for entry in entries:
        address = url or entry.url
        if not address:
            raise TeacherError(f"{chosen.name}/{entry.name} has no download address; import the file you have with "
                               f"gapkd teachers import PATH --set {chosen.name}.")
        written.update(_install_download(download(address, downloads / entry.member, progress=progress), chosen, address, root, echo))
    return written


def _install_download(local: Path, chosen: TeacherSet, address: str, root: Path, echo) -> dict:
    """Install a finished download, then delete it (its checkpoints are in the store; a refused one
    is downloaded afresh next time)."""
    try:
        return install(local, chosen.name, origin=address, root=root, echo=echo)
    finally:
        local.unlink(missing_ok=True)


def _basename(url: str) -> str:
    name = url.rstrip("/").rsplit("/", 1)[-1].split("?")[0]
    return name or "download"


def installed(root: Path | None = None) -> Iterator[tuple[TeacherSet, TeacherFile, Optional[dict]]]:
    """Every catalogue entry with its manifest record (None when not installed)."""
    root = root or store_root()
    for chosen in CATALOGUE.values():
        records = read_manifest(chosen.name, root)
        for entry in chosen.files:
            yield chosen, entry, records.get(entry.name)

