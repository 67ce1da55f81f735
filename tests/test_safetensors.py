"""safetensors: `gapkd export --format safetensors`, and .safetensors weights accepted wherever a
checkpoint is (eval, teacher/student checkpoints, load_checkpoint), with no pickle involved."""
from __future__ import annotations

import json
import pickle

import pytest
import torch

import gapkd
from gapkd.api import build_model, load_model, run, run_dir_for
from gapkd.cli import main
from gapkd.config import ModelConfig, build_config
from gapkd.data import build_data
from gapkd.errors import CheckpointError
from gapkd.models import create_model, load_checkpoint

safetensors = pytest.importorskip("safetensors.torch")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    cfg = build_config({"out_dir": str(out), "name": "ce", "student": {"name": "resnet8"},
                        "data": {"name": "digits", "batch_size": 64, "augment": {"crop_padding": 1, "flip": False}},
                        "train": {"epochs": 1, "device": "cpu", "log_every": 1000, "amp": "off"}})
    run(cfg, echo=False)
    return run_dir_for(cfg), build_data(cfg.data, torch.device("cpu"), 0).data


def _no_pickle(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("pickle was used")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(pickle, "load", refuse)


def test_export_writes_a_file_that_rebuilds_the_model_without_pickle(trained, monkeypatch, capsys):
    run_dir, data = trained
    result = gapkd.export(run_dir, format="safetensors")
    path = run_dir / "export" / "best.safetensors"
    assert result["path"] == str(path) and result["max_abs_diff"] == 0.0
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        header = json.loads(handle.metadata()["gapkd"])
    assert header["format"] == "gapkd-model" and header["model"] == "resnet8" and header["num_classes"] == 10
    reference, _ = load_model(run_dir / "checkpoints" / "best.pt", data)
    images = torch.randn(4, 1, 8, 8)
    _no_pickle(monkeypatch)
    rebuilt, name = load_model(path, data)  # the architecture comes from the file's header
    assert name == "resnet8"
    for a, b in zip(reference.state_dict().values(), rebuilt.state_dict().values()):
        assert torch.equal(a, b)
    with torch.no_grad():
        assert torch.equal(reference.eval()(images), rebuilt.eval()(images))
    monkeypatch.undo()
    assert main(["eval", str(path), "--json"]) == 0
    from_file = json.loads(capsys.readouterr().out)
    assert main(["eval", str(run_dir / "checkpoints" / "best.pt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["test_acc"] == from_file["test_acc"]


def test_a_foreign_safetensors_state_dict_is_a_teacher_checkpoint(trained, tmp_path, monkeypatch):
    _, data = trained
    torch.manual_seed(0)
    teacher = create_model("resnet14", num_classes=10, in_channels=1)
    path = tmp_path / "resnet14.safetensors"
    safetensors.save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(path))
    _no_pickle(monkeypatch)
    loaded = build_model(ModelConfig(name="resnet14", checkpoint=str(path)), data, "teacher")
    for key, value in teacher.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    other = load_checkpoint(create_model("resnet14", num_classes=10, in_channels=1), path)
    assert torch.equal(other.classifier.weight, teacher.classifier.weight)
    with pytest.raises(CheckpointError, match="does not fit CifarResNet: unexpected keys"):  # still exactly or not at all
        load_checkpoint(create_model("resnet8", num_classes=10, in_channels=1), path)


def test_a_damaged_safetensors_file_gets_one_clear_error(tmp_path):
    path = tmp_path / "broken.safetensors"
    safetensors.save_file({"w": torch.ones(100)}, str(path))
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(CheckpointError, match="truncated or not a safetensors file"):
        load_checkpoint(create_model("resnet8", num_classes=10, in_channels=1), path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(create_model("resnet8", num_classes=10, in_channels=1), tmp_path / "missing.safetensors")
