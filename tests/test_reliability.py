"""Crash safety and bad input: every failure ends in one clear message and loses nothing."""
import errno
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from gapkd.api import run, run_dir_for
from gapkd.config import DataConfig, build_config
from gapkd.data import load_dataset
from gapkd.data.core import ImageData, check_labels, make_split
from gapkd.engine.checkpoint import atomic_save, safe_load
from gapkd.errors import CheckpointError, ConfigError, DataError


def _load_benchmark(name):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("target, kills", [("train", 3), ("takd", 1), ("study", 2)])
def test_sigkill_at_random_moments_then_resume_is_bit_identical(target, kills, tmp_path):
    """train: one run; takd: a pipeline; study: two concurrent workers on one database, both killed."""
    stats = _load_benchmark("crash_resume").crash_resume(target, kills=kills, seed=1, workdir=tmp_path)
    assert stats["bit_identical"] and stats["epochs_logged_identically"], stats
    assert stats["kills"] >= 1 and stats["runs_compared"] >= 1, stats
    if target == "study":
        assert stats["study_rows"] == 7 and stats["study_rows_unique"] and stats["study_rows_match_uninterrupted"], stats


def test_disk_full_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    atomic_save({"epoch": 1, "w": torch.ones(3)}, path)

    def full_disk(obj, handle):
        handle.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match="no space left.*previous checkpoint is intact"):
        atomic_save({"epoch": 2}, path)
    monkeypatch.undo()
    assert safe_load(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]  # no temporary left behind


def test_truncated_checkpoint_is_named(tmp_path):
    path = tmp_path / "t.pt"
    atomic_save({"w": torch.ones(1000)}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="truncated"):
        safe_load(path)


def test_labels_out_of_range_are_refused():
    images = np.zeros((4, 8, 8), dtype=np.uint8)
    data = ImageData("toy", ["a", "b"], make_split(images, np.array([0, 1, 2, 1])), make_split(images, np.array([0, 1, 0, 1])),
                     (0.5,), (0.5,))
    with pytest.raises(DataError, match="labels must be 0..num_classes-1"):
        check_labels(data)


def test_teacher_of_another_architecture_is_refused(tiny_overrides, tmp_path):
    teacher = build_config(tiny_overrides, overrides=["name=t", "student.name=resnet14", "train.epochs=1"])
    run(teacher, echo=False)
    ckpt = run_dir_for(teacher) / "checkpoints" / "best.pt"
    bad = build_config(tiny_overrides, overrides=["method.name=kd", "teacher.name=resnet20", f"teacher.checkpoint={ckpt}"])
    with pytest.raises(CheckpointError, match="holds a 'resnet14'.*teacher.name=resnet14"):
        run(bad, echo=False)


def test_corrupt_official_file_reports_expected_checksum(tmp_path):
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    for stem in ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]:
        (folder / f"{stem}.gz").write_bytes(b"not a gzip file")
    with pytest.raises(DataError, match="expected 8d4fb7e6c68d591d4c3dfef9ec88bf0d"):
        load_dataset(DataConfig(name="fashion-mnist", root=str(tmp_path)))


def test_missing_dataset_says_where_and_how():
    with pytest.raises(DataError, match="data.path="):
        load_dataset(DataConfig(name="cifar10-jpg", root="/nonexistent"))


@pytest.mark.parametrize("override, fragment", [
    ("optim.lr=-0.1", "optim.lr"),
    ("data.val_fraction=1.0", "data.val_fraction"),
    ("data.train_subset=0", "data.train_subset"),
    ("train.epochs=0", "train.epochs"),
    ("data.batch_size=0", "data.batch_size"),
])
def test_impossible_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        build_config({"student": {"name": "resnet8"}}, overrides=[override])


def test_stale_temporaries_of_a_killed_writer_are_removed(tiny_overrides):
    cfg = build_config(tiny_overrides, overrides=["train.epochs=1"])
    ckpt_dir = run_dir_for(cfg) / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    (ckpt_dir / ".state.pt.abc.tmp").write_bytes(b"torn")
    run(cfg, echo=False)
    assert not list(ckpt_dir.glob(".*.tmp"))
