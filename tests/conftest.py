"""Shared fixtures: tiny real data (digits) and the CIFAR-10 JPEG copy when ../shared is present."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # tests run in parallel workers on 2 cores

REPO = Path(__file__).resolve().parents[1]
CIFAR10_JPG = REPO.parent / "shared" / "data" / "cifar10-jpg" / "cifar10-jpg-q75.tar.gz"


@pytest.fixture
def tiny_overrides(tmp_path):
    """A config that trains in about a second on digits."""
    return {
        "out_dir": str(tmp_path / "runs"),
        "data": {"name": "digits", "batch_size": 64, "augment": {"crop_padding": 1, "flip": False}},
        "optim": {"lr": 0.05},
        "schedule": {"name": "cosine"},
        # fp32: tests compare numbers at fp32 rounding (auto would pick bf16 on CPUs with native bf16);
        # the bf16 path has its own tests (test_engine's resume test, test_fold)
        "train": {"epochs": 2, "device": "cpu", "log_every": 1000, "amp": "off"},
        "student": {"name": "resnet8"},
    }


@pytest.fixture
def interrupt_after_first_state(monkeypatch):
    """A function that arms the next training run to raise KeyboardInterrupt right after it writes its
    first ``state.pt``, as if killed there; the run that resumes it saves normally."""
    import gapkd.engine.trainer as trainer

    def arm() -> None:
        real_save = trainer.atomic_save

        def save_then_stop(obj, path):
            real_save(obj, path)
            if str(path).endswith("state.pt"):
                monkeypatch.setattr(trainer, "atomic_save", real_save)
                raise KeyboardInterrupt

        monkeypatch.setattr(trainer, "atomic_save", save_then_stop)

    return arm


@pytest.fixture
def cifar10_jpg_path():
    if not CIFAR10_JPG.is_file():
        pytest.skip(f"the CIFAR-10 JPEG copy is not at {CIFAR10_JPG} (../shared/data is absent on this machine)")
    return CIFAR10_JPG


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path_factory):
    monkeypatch.delenv("GAPKD_DATA", raising=False)
    # decoded-data cache shared by the whole session (decoding the JPEG tarball takes ~20 s)
    monkeypatch.setenv("GAPKD_CACHE", os.environ.get("GAPKD_TEST_CACHE", str(Path.home() / ".cache" / "gapkd")))


@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory):
    """resnet14 trained for one epoch on digits (a second or two on CPU); its best.pt."""
    from gapkd.api import run, run_dir_for
    from gapkd.config import build_config

    out = tmp_path_factory.mktemp("teacher")
    cfg = build_config({
        "out_dir": str(out), "name": "teacher", "student": {"name": "resnet14"},
        "data": {"name": "digits", "batch_size": 64, "augment": {"crop_padding": 1, "flip": False}},
        "optim": {"lr": 0.05}, "schedule": {"name": "cosine"}, "train": {"epochs": 1, "device": "cpu", "log_every": 1000},
    })
    run(cfg, echo=False)
    return run_dir_for(cfg) / "checkpoints" / "best.pt"


@pytest.fixture
def killed_then_resumed(monkeypatch):
    """``go(cfg)``: gapkd.api.run as if the run were killed right after its first epoch's checkpoint,
    then started again (it resumes); returns the second call's summary."""
    from gapkd.api import run
    from gapkd.engine import trainer

    def go(cfg):
        real_save = trainer.atomic_save

        def crash_after_first_state(obj, path):
            real_save(obj, path)
            if str(path).endswith("state.pt"):
                raise KeyboardInterrupt

        monkeypatch.setattr(trainer, "atomic_save", crash_after_first_state)
        with pytest.raises(KeyboardInterrupt):
            run(cfg, echo=False)
        monkeypatch.setattr(trainer, "atomic_save", real_save)
        return run(cfg, echo=False)

    return go
