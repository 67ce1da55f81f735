"""Readers for the supported dataset formats, with checksums, a restricted unpickler and
(for users with a network) verified downloads. Nothing here executes code from a file."""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import tarfile
import tempfile
import urllib.request
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from ..core.errors import DataError
from .core import ImageData, cache_dir, channel_stats, make_split, stratified_holdout

# ---------------------------------------------------------------------------------
# Integrity helpers


def file_digest(path: Path, algorithm: str = "md5") -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_file(path: Path, expected: str, algorithm: str = "md5") -> None:
    """Fail with the expected and actual checksum when ``path`` is not the official file."""
    if not path.is_file():
        raise DataError(f"{path} is missing.")
    actual = file_digest(path, algorithm)
    if actual != expected:
        raise DataError(
            f"{path} is corrupt or not the official file: its {algorithm} is {actual}, expected {expected}. "
            "Delete it and download it again (or pass data.verify=false if you know it is right)."
        )


def download(url: str, destination: Path, md5: str) -> Path:
    """Download ``url`` to ``destination`` atomically, checking its md5 before keeping it."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=destination.parent, prefix=".download-")
    try:
        with os.fdopen(handle, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310
            for block in iter(lambda: response.read(1 << 20), b""):
                out.write(block)
        verify_file(Path(temporary), md5)
        os.replace(temporary, destination)
    except OSError as error:
        raise DataError(f"could not download {url} ({error}); download it by hand into {destination.parent}.") from None
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return destination


# ---------------------------------------------------------------------------------
# Restricted unpickling (CIFAR python pickles hold only dicts, lists, bytes and arrays)

_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")
        return super().find_class(module, name)


def safe_pickle_load(path: Path, encoding: str = "bytes"):
    """Unpickle a dataset file admitting only plain containers and numpy arrays."""
    try:
        with open(path, "rb") as handle:
            return _RestrictedUnpickler(handle, encoding=encoding).load()
    except pickle.UnpicklingError as error:
        raise DataError(
            f"{path} is not a plain dataset pickle ({error}); refusing to load it because unpickling "
            "arbitrary objects can run code. Use the official file."
        ) from None
    except (EOFError, ValueError, TypeError, IndexError) as error:
        raise DataError(f"{path} is truncated or corrupt ({error!r}); download it again.") from None


# ---------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100, official python format

CIFAR = {
    "cifar10": dict(
        folder="cifar-10-batches-py",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        archive="cifar-10-python.tar.gz",
        archive_md5="c58f30108f718f92721af3b95e74349a",
        train=[("data_batch_1", "c99cafc152244af753f735de768cd75f"),
               ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
               ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
               ("data_batch_4", "634d18415352ddfa80567beed471001a"),
               ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb")],
        test=[("test_batch", "40351d587109b95175f43aff81a1287e")],
        meta=("batches.meta", "5ff9c542aee3614f3951f8cda6e48888"),
        label_key=b"labels", names_key=b"label_names",
        mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
    ),
    "cifar100": dict(
        folder="cifar-100-python",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        archive="cifar-100-python.tar.gz",
        archive_md5="eb9058c3a382ffc7106e4002c42a8d85",
        train=[("train", "16019d7e3df5f24257cddd939b257f8d")],
        test=[("test", "f0ef6b0ae62326f3e7ffdfab6717acfc")],
        meta=("meta", "7973b15100ade9c7d40fb424638fde48"),
        label_key=b"fine_labels", names_key=b"fine_label_names",
        mean=(0.5071, 0.4867, 0.4408), std=(0.2675, 0.2565, 0.2761),
    ),
}


def _safe_extract(archive: Path, destination: Path) -> None:
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            target = (destination / member.name).resolve()
            if not str(target).startswith(str(destination.resolve())) or not (member.isfile() or member.isdir()):
                raise DataError(f"{archive} contains an unsafe entry {member.name!r}; refusing to extract it.")
        tar.extractall(destination)


def read_cifar(name: str, root: Path, *, verify: bool = True, allow_download: bool = False) -> ImageData:
    spec = CIFAR[name]
    folder = root / spec["folder"]
    if not folder.is_dir():
        if not allow_download:
            raise DataError(
                f"{name}: no folder {folder}. Put the official '{spec['folder']}' folder under the data root "
                f"({root}; set it with --data-root or GAPKD_DATA), or pass data.download=true to fetch {spec['url']}."
            )
        archive = download(spec["url"], root / spec["archive"], spec["archive_md5"])
        _safe_extract(archive, root)

    def load_part(entries: list[tuple[str, str]]):
        images, labels = [], []
        for file_name, md5 in entries:
            path = folder / file_name
            if not path.is_file():
                raise DataError(f"{name}: {path} is missing; the '{spec['folder']}' folder is incomplete. Download it again.")
            if verify:
                verify_file(path, md5)
            entry = safe_pickle_load(path)
            try:
                data = np.asarray(entry[b"data"], dtype=np.uint8)
                images.append(data.reshape(-1, 3, 32, 32))
                labels.append(np.asarray(entry[spec["label_key"]], dtype=np.int64))
            except (KeyError, TypeError, ValueError) as error:
                raise DataError(f"{path} does not hold CIFAR data ({error!r}); is it the official file?") from None
        return make_split(np.concatenate(images), np.concatenate(labels))

    meta_path = folder / spec["meta"][0]
    if verify:
        verify_file(meta_path, spec["meta"][1])
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in safe_pickle_load(meta_path)[spec["names_key"]]]
    return ImageData(name, classes, load_part(spec["train"]), load_part(spec["test"]), spec["mean"], spec["std"])


# ---------------------------------------------------------------------------------
# MNIST / Fashion-MNIST, IDX files (gz or not)

IDX_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
MNIST = {
    "mnist": dict(
        url="https://ossci-datasets.s3.amazonaws.com/mnist/",
        md5=["f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
             "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c"],
        classes=[str(i) for i in range(10)],
        system_dirs=[],
    ),
    "fashion-mnist": dict(
        url="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        md5=["8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
             "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310"],
        classes=["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
        # Debian's dataset-fashion-mnist package (recompressed .gz, so checked by structure and counts)
        system_dirs=["/usr/share/datasets/fashion-mnist"],
    ),
}
_IDX_COUNTS = [60000, 60000, 10000, 10000]


def read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file (unsigned-byte data, any rank), gzip-compressed or not."""
    opener: Callable = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as error:
        raise DataError(f"{path} is truncated or corrupt ({error}); download it again.") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file (bad magic number); is it the right file?")
    rank = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(rank)]
    expected = 4 + 4 * rank + int(np.prod(dims))
    if len(raw) != expected:
        raise DataError(f"{path} has {len(raw)} bytes but its header promises {expected}: the file is truncated or corrupt.")
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * rank).reshape(dims)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def read_mnist(name: str, root: Path, *, verify: bool = True, allow_download: bool = False) -> ImageData:
    spec = MNIST[name]
    candidates = [root / name, root / name.replace("-", "_"), root] + [Path(p) for p in spec["system_dirs"]]
    folder = next((f for f in candidates if all(_find_idx(f, s) for s in IDX_FILES)), None)
    if folder is None and allow_download:
        folder = root / name
        for stem, md5 in zip(IDX_FILES, spec["md5"]):
            download(spec["url"] + stem + ".gz", folder / f"{stem}.gz", md5)
    if folder is None:
        hint = " or `apt-get install dataset-fashion-mnist`" if spec["system_dirs"] else ""
        raise DataError(
            f"{name}: the four IDX files ({', '.join(IDX_FILES)}, .gz or not) are not in any of "
            f"{', '.join(str(c) for c in candidates)}. Put them in {root / name}{hint}, or pass data.download=true."
        )
    arrays = []
    for stem, md5, count in zip(IDX_FILES, spec["md5"], _IDX_COUNTS):
        path = _find_idx(folder, stem)
        official = path.suffix == ".gz" and str(folder) not in spec["system_dirs"]
        if verify and official:
            verify_file(path, md5)
        array = read_idx(path)
        if verify and array.shape[0] != count:
            raise DataError(f"{path} holds {array.shape[0]} items, the official file {count}; download it again.")
        arrays.append(array)
    train, test = make_split(arrays[0], arrays[1]), make_split(arrays[2], arrays[3])
    mean, std = channel_stats(train.images)
    return ImageData(name, list(spec["classes"]), train, test, mean, std)


# ---------------------------------------------------------------------------------
# Folders or tarballs of small images: split/class/file

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


def _iter_tree(path: Path) -> Iterable[tuple[str, bytes]]:
    """(relative name, bytes) of every image file below a folder or inside a tarball."""
    if path.is_dir():
        for file in sorted(path.rglob("*")):
            if file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES:
                yield file.relative_to(path).as_posix(), file.read_bytes()
        return
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if member.isfile() and member.name.lower().endswith(IMAGE_SUFFIXES):
                    yield member.name.lstrip("./"), tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as error:
        raise DataError(f"{path} is not a readable tarball ({error}); download or pack it again.") from None


def read_image_tree(path: Path, name: str, sha256: str | None = None, train_split: str = "train", test_split: str = "test") -> ImageData:
    """Decode a ``split/class/file`` tree once, caching the result as uint8 .npy arrays."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{name}: {path} does not exist. Pass the folder or tarball with data.path=... .")
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cache = cache_dir() / "decoded" / f"{name}-{key}"
    if (cache / "done").is_file():
        return _load_cached_tree(cache, name)
    if sha256 is not None and path.is_file():
        verify_file(path, sha256, "sha256")
    from PIL import Image, UnidentifiedImageError

    splits: dict[str, tuple[list, list]] = {}
    shape = None
    for relative, payload in _iter_tree(path):
        parts = relative.split("/")
        if len(parts) < 3:
            raise DataError(
                f"{path}: {relative!r} is not laid out as split/class/file; put images in "
                f"{train_split}/<class>/ and {test_split}/<class>/."
            )
        split, cls = parts[-3], parts[-2]
        try:
            with Image.open(io.BytesIO(payload)) as image:
                array = np.asarray(image.convert("RGB" if image.mode not in ("L", "1") else "L"))
        except (UnidentifiedImageError, OSError) as error:
            raise DataError(f"{path}: {relative!r} is not a readable image ({error}); remove or replace it.") from None
        if shape is None:
            shape = array.shape
        elif array.shape != shape:
            raise DataError(
                f"{path}: {relative!r} is {array.shape} but the first image was {shape}; all images must have one "
                "size and channel count (resize them first, or use a streaming image-folder dataset)."
            )
        splits.setdefault(split, ([], []))
        splits[split][0].append(array)
        splits[split][1].append(cls)
    for wanted in (train_split, test_split):
        if wanted not in splits:
            raise DataError(f"{path}: no '{wanted}/' split found (found {sorted(splits) or 'no images'}); lay it out as split/class/file.")
    classes = sorted(set(splits[train_split][1]))
    unknown = sorted(set(splits[test_split][1]) - set(classes))
    if unknown:
        raise DataError(f"{path}: test classes {unknown} do not appear in train; both splits need the same class folders.")
    index = {c: i for i, c in enumerate(classes)}
    arrays = {}
    for split in (train_split, test_split):
        images = np.stack(splits[split][0])
        labels = np.array([index[c] for c in splits[split][1]], dtype=np.int64)
        arrays[split] = (images, labels)
    _write_cached_tree(cache, classes, arrays[train_split], arrays[test_split])
    return _load_cached_tree(cache, name)


def _write_cached_tree(cache: Path, classes: list[str], train, test) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    for split, (images, labels) in (("train", train), ("test", test)):
        for kind, array in (("images", images), ("labels", labels)):
            temporary = cache / f".{split}_{kind}.npy.tmp"
            with open(temporary, "wb") as handle:
                np.save(handle, array)
            os.replace(temporary, cache / f"{split}_{kind}.npy")
    (cache / "classes.txt").write_text("\n".join(classes) + "\n")
    (cache / "done").write_text("ok\n")


def _load_cached_tree(cache: Path, name: str) -> ImageData:
    try:
        load = lambda f: np.load(cache / f, allow_pickle=False)  # noqa: E731
        train = make_split(load("train_images.npy"), load("train_labels.npy"))
        test = make_split(load("test_images.npy"), load("test_labels.npy"))
        classes = (cache / "classes.txt").read_text().split("\n")[:-1]
    except (OSError, ValueError) as error:
        raise DataError(f"the decoded cache {cache} is damaged ({error}); delete that folder and run again.") from None
    mean, std = channel_stats(train.images)
    return ImageData(name, classes, train, test, mean, std)


# ---------------------------------------------------------------------------------
# scikit-learn's digits (8x8 grey, 1,797 images): tiny real data for smoke tests


def read_digits(test_fraction: float = 0.2) -> ImageData:
    """Digits has no official test split: a fixed, stratified 20% (seed 0) is held out as test."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    keep, held = stratified_holdout(torch.from_numpy(labels), test_fraction, seed=0)
    train = make_split(images[keep.numpy()], labels[keep.numpy()])
    test = make_split(images[held.numpy()], labels[held.numpy()])
    mean, std = channel_stats(train.images)
    return ImageData("digits", [str(i) for i in range(10)], train, test, mean, std)
