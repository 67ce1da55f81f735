import gzip
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from gapkd.config import DataConfig
from gapkd.data import build_data, load_dataset, resolve_data_root, split_data, stratified_holdout
from gapkd.data.core import make_split
from gapkd.data.loader import DeviceLoader, Normalizer, epoch_generator, random_crop
from gapkd.data.sources import read_cifar, read_idx, read_image_tree, read_mnist, safe_pickle_load
from gapkd.errors import ConfigError, DataError


def test_validation_split_is_disjoint_stratified_and_deterministic():
    labels = torch.arange(1000) % 10
    keep, held = stratified_holdout(labels, 0.1, seed=3)
    assert set(keep.tolist()).isdisjoint(held.tolist())
    assert len(keep) + len(held) == 1000
    assert torch.bincount(labels[held]).tolist() == [10] * 10
    keep2, held2 = stratified_holdout(labels, 0.1, seed=3)
    assert torch.equal(held, held2) and torch.equal(keep, keep2)
    assert not torch.equal(held, stratified_holdout(labels, 0.1, seed=4)[1])


def test_split_data_keeps_test_apart_and_train_val_disjoint():
    data = load_dataset(DataConfig(name="digits"))
    train, val, test = split_data(data, DataConfig(name="digits", val_fraction=0.2), seed=0)
    assert set(train.indices.tolist()).isdisjoint(val.indices.tolist())
    assert len(train) + len(val) == len(data.train)
    assert len(test) == len(data.test)


def test_augmentation_is_deterministic_per_seed_and_epoch():
    split = make_split(np.random.default_rng(0).integers(0, 255, (50, 3, 8, 8), dtype=np.uint8), np.arange(50) % 5)
    make = lambda seed: DeviceLoader(split, 16, Normalizer((0.5,) * 3, (0.5,) * 3, torch.device("cpu")), torch.device("cpu"),  # noqa: E731
                                     train=True, seed=seed, crop_padding=2, flip=True)
    a = [b.images for b in make(1).epoch(3)]
    b = [b.images for b in make(1).epoch(3)]
    c = [b.images for b in make(1).epoch(4)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_random_crop_is_a_shifted_window_of_the_zero_padded_image():
    image = torch.arange(1, 17, dtype=torch.float32).view(1, 1, 4, 4)
    generator = epoch_generator(0, 0, torch.device("cpu"))
    crops = random_crop(image.repeat(64, 1, 1, 1), 1, generator)
    padded = torch.nn.functional.pad(image, (1, 1, 1, 1))[0, 0]
    windows = {tuple(padded[dy:dy + 4, dx:dx + 4].flatten().tolist()) for dy in range(3) for dx in range(3)}
    seen = {tuple(c[0].flatten().tolist()) for c in crops}
    assert seen <= windows and len(seen) > 3


def test_data_root_resolution_order(monkeypatch, tmp_path):
    monkeypatch.setenv("GAPKD_DATA", str(tmp_path / "env"))
    assert resolve_data_root(str(tmp_path / "flag")) == tmp_path / "flag"
    assert resolve_data_root(None) == tmp_path / "env"
    monkeypatch.delenv("GAPKD_DATA")
    monkeypatch.setenv("GAPKD_CACHE", str(tmp_path / "cache"))
    assert resolve_data_root(None) == tmp_path / "cache" / "data"


def _write_fake_cifar10(root, n=20):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]:
        entry = {b"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, n))}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}, protocol=2))
    return folder


def test_cifar_reader_checks_official_md5_and_reads_the_format(tmp_path):
    _write_fake_cifar10(tmp_path)
    with pytest.raises(DataError, match="expected 5ff9c542aee3614f3951f8cda6e48888"):
        read_cifar("cifar10", tmp_path)
    data = read_cifar("cifar10", tmp_path, verify=False)
    assert data.train.images.shape == (100, 3, 32, 32) and data.test.images.shape == (20, 3, 32, 32)
    assert data.classes[0] == "airplane" and data.num_classes == 10


def test_cifar_reader_without_files_says_where_to_put_them(tmp_path):
    with pytest.raises(DataError, match="cifar-100-python"):
        read_cifar("cifar100", tmp_path)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_restricted_unpickler_refuses_code(tmp_path, capsys):
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": _Evil()}))
    with pytest.raises(DataError, match="builtins.print"):
        safe_pickle_load(path)
    assert "pwned" not in capsys.readouterr().out


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def test_idx_reader_plain_gz_and_truncated(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a").write_bytes(_idx_bytes(array))
    (tmp_path / "a.gz").write_bytes(gzip.compress(_idx_bytes(array)))
    assert np.array_equal(read_idx(tmp_path / "a"), array)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), array)
    (tmp_path / "b").write_bytes(_idx_bytes(array)[:-3])
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "b")


def test_mnist_reader_on_small_idx_files(tmp_path):
    folder = tmp_path / "mnist"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for stem, shape in [("train-images-idx3-ubyte", (30, 28, 28)), ("train-labels-idx1-ubyte", (30,)),
                        ("t10k-images-idx3-ubyte", (10, 28, 28)), ("t10k-labels-idx1-ubyte", (10,))]:
        high = 10 if "labels" in stem else 255
        (folder / stem).write_bytes(_idx_bytes(rng.integers(0, high, shape)))
    data = read_mnist("mnist", tmp_path, verify=False)
    assert data.train.images.shape == (30, 1, 28, 28) and data.test.labels.shape == (10,)
    with pytest.raises(DataError, match="60000"):
        read_mnist("mnist", tmp_path, verify=True)


def test_fashion_mnist_from_the_debian_package_when_installed():
    import os

    if not os.path.isdir("/usr/share/datasets/fashion-mnist"):
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    data = load_dataset(DataConfig(name="fashion-mnist", root="/nonexistent"))
    assert data.train.images.shape == (60000, 1, 28, 28) and len(data.test) == 10000
    assert torch.bincount(data.train.labels).tolist() == [6000] * 10


def _write_tree(root, sizes=None):
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("test", 2)):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(count):
                size = (sizes or {}).get((split, cls, i), 12)
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")


def test_image_folder_decodes_once_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("GAPKD_CACHE", str(tmp_path / "cache"))
    _write_tree(tmp_path / "imgs")
    data = read_image_tree(tmp_path / "imgs", "imgs")
    assert data.classes == ["cat", "dog"] and data.train.images.shape == (12, 3, 12, 12)
    assert list((tmp_path / "cache" / "decoded").iterdir())
    again = read_image_tree(tmp_path / "imgs", "imgs")
    assert torch.equal(again.train.images, data.train.images)


def test_image_folder_wrong_size_and_layout_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv("GAPKD_CACHE", str(tmp_path / "cache"))
    _write_tree(tmp_path / "bad", sizes={("train", "dog", 3): 16})
    with pytest.raises(DataError, match="train/dog/3.png"):
        read_image_tree(tmp_path / "bad", "bad")
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "x.png")
    with pytest.raises(DataError, match="split/class/file"):
        read_image_tree(tmp_path / "flat", "flat")


def test_unknown_dataset_suggests_a_name():
    with pytest.raises(ConfigError, match="fashion-mnist"):
        load_dataset(DataConfig(name="fashion-mnst"))


def test_build_data_loaders_cover_the_splits():
    bundle = build_data(DataConfig(name="digits", batch_size=100), torch.device("cpu"), seed=0)
    seen = torch.cat([b.indices for b in bundle.train.epoch(0)])
    assert sorted(seen.tolist()) == sorted(bundle.data.train.indices.tolist())
    batch = next(iter(bundle.test.epoch(0)))
    assert batch.images.dtype == torch.float32 and abs(float(batch.images.mean())) < 1.0
