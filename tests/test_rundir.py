"""The run directory and checkpoint format have one owner (gapkd.core.rundir.RunDir), and a run
directory written before the package was reorganised still loads, evaluates and counts as finished."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from gapkd import RunDir, model_from_checkpoint
from gapkd.api import evaluate_checkpoint, run, run_dir_for
from gapkd.config import build_config
from gapkd.core.errors import CheckpointError, ConfigError
from gapkd.core.rundir import is_model_payload, read_model_payload

#: config.yaml as commit d1f7ca4 (the layout before the reorganisation) wrote it: top-level name/out_dir, no run: section
OLD_CONFIG = Path(__file__).parent / "data" / "run-v0.1" / "config.yaml"


@pytest.fixture(scope="module")
def _old_run_template(tmp_path_factory) -> Path:
    """A run directory in the previous layout, made here (no binary in the repository): the run of the old
    config.yaml trained for its 2 epochs on digits, then that config.yaml put back in place of the new writer's.
    The model payload (format "gapkd-model", version 1, same keys) is the one both layouts write."""
    out = tmp_path_factory.mktemp("old")
    cfg = build_config(None, OLD_CONFIG, {"out_dir": str(out)})
    run(cfg, echo=False)
    shutil.copyfile(OLD_CONFIG, run_dir_for(cfg) / "config.yaml")
    return run_dir_for(cfg)


@pytest.fixture()
def old_run(tmp_path, _old_run_template) -> RunDir:
    shutil.copytree(_old_run_template, tmp_path / "run-v0.1", ignore=shutil.ignore_patterns(".lock"))
    return RunDir(tmp_path / "run-v0.1")


def test_rundir_names_every_path(tmp_path):
    run_dir = RunDir(tmp_path / "r")
    assert run_dir.best == tmp_path / "r" / "checkpoints" / "best.pt"
    assert run_dir.last == tmp_path / "r" / "checkpoints" / "last.pt"
    assert run_dir.state == tmp_path / "r" / "checkpoints" / "state.pt"
    assert run_dir.checkpoint("best_within_e3") == tmp_path / "r" / "checkpoints" / "best_within_e3.pt"
    assert (run_dir.config.name, run_dir.summary.name, run_dir.metrics.name, run_dir.log.name) == (
        "config.yaml", "summary.json", "metrics.jsonl", "train.log")
    assert Path(run_dir) == tmp_path / "r" and run_dir / "x" == tmp_path / "r" / "x"
    assert run_dir.read_summary() is None


def test_a_run_written_by_the_previous_layout_loads(old_run):
    summary = old_run.read_summary()
    cfg = build_config(None, old_run.config, {"out_dir": str(old_run.path.parent)})
    assert run_dir_for(cfg) == old_run.path
    # its config hashes as it did then, so the run counts as finished (and an interrupted one would resume)
    assert cfg.hparams_hash() == summary["config_hash"]
    assert run(cfg, echo=False) == summary
    payload = read_model_payload(old_run.best)
    assert is_model_payload(payload) and payload["model"] == "resnet8" and payload["epoch"] == summary["best_epoch"]
    model, name = model_from_checkpoint(old_run.best, num_classes=10, in_channels=1)
    assert name == "resnet8" and isinstance(model, torch.nn.Module)
    scores = evaluate_checkpoint(old_run.best, cfg.data, device="cpu", amp="off")
    assert scores["val_acc"] == pytest.approx(summary["best_val_acc"])
    assert scores["test_acc"] == pytest.approx(summary["test_acc_at_best_val"])


def test_a_changed_config_is_not_the_finished_run(old_run):
    cfg = build_config(None, old_run.config, {"out_dir": str(old_run.path.parent), "optim": {"lr": 0.1}})
    with pytest.raises(ConfigError, match="different config"):
        run(cfg, echo=False)


def test_model_from_checkpoint_refuses_what_does_not_fit(old_run, tmp_path):
    with pytest.raises(CheckpointError, match="trained for 10 classes"):
        model_from_checkpoint(old_run.best, num_classes=5, in_channels=1, dataset="a 5-class set")
    with pytest.raises(CheckpointError, match="set model.name=resnet8"):
        model_from_checkpoint(old_run.best, num_classes=10, in_channels=1, name="resnet14")
    bare = tmp_path / "bare.pt"
    torch.save(read_model_payload(old_run.best)["state_dict"], bare)
    with pytest.raises(ConfigError, match="does not record its architecture; pass --model NAME"):
        model_from_checkpoint(bare, num_classes=10, in_channels=1)
    with pytest.raises(CheckpointError, match="not a gapkd model checkpoint"):
        read_model_payload(bare)
    model, _ = model_from_checkpoint(bare, num_classes=10, in_channels=1, name="resnet8")  # a foreign state dict, named
    assert sum(p.numel() for p in model.parameters()) > 0
