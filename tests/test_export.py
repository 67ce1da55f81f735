"""`gapkd export`: ONNX and TorchScript files of a run's deployable model, checked on real digits,
for a plain student (kd) and SimKD's student + projector + teacher classifier; and its errors."""
from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

import gapkd
from gapkd import deploy
from gapkd.api import load_model, run, run_dir_for
from gapkd.cli import main
from gapkd.config import build_config
from gapkd.data import build_data
from gapkd.errors import CheckpointError, ConfigError, GapkdError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.load, used to check TorchScript files

BASE = {"data": {"name": "digits", "batch_size": 64, "augment": {"crop_padding": 1, "flip": False}},
        "optim": {"lr": 0.05}, "schedule": {"name": "cosine"}, "train": {"epochs": 1, "device": "cpu", "log_every": 1000,
                  "amp": "off"}}  # exported models compute in fp32: compared with the run's own fp32 accuracy


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A resnet14 teacher and two resnet8 students distilled from it (kd, simkd), one epoch each on digits."""
    out = tmp_path_factory.mktemp("runs")
    teacher = build_config({**BASE, "out_dir": str(out), "name": "teacher", "student": {"name": "resnet14"}})
    run(teacher, echo=False)
    checkpoint = run_dir_for(teacher) / "checkpoints" / "best.pt"
    dirs = {"teacher": run_dir_for(teacher)}
    for method in ("kd", "simkd"):
        cfg = build_config({**BASE, "out_dir": str(out), "name": method, "student": {"name": "resnet8"},
                            "teacher": {"name": "resnet14", "checkpoint": str(checkpoint)}, "method": {"name": method}})
        run(cfg, echo=False)
        dirs[method] = run_dir_for(cfg)
    return dirs


def exported_logits(fmt: str, path, images: torch.Tensor) -> torch.Tensor:
    """Load the exported file the way a deployment would, independently of gapkd.deploy."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: images.numpy()})[0])
    with torch.no_grad():
        return torch.jit.load(str(path))(images)


@pytest.mark.parametrize("method", ["kd", "simkd"])
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_exported_model_matches_pytorch_and_keeps_the_runs_test_accuracy(runs, method, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
    run_dir = runs[method]
    result = gapkd.export(run_dir, format=fmt)
    path = run_dir / "export" / ("best.onnx" if fmt == "onnx" else "best.torchscript.pt")
    assert result["path"] == str(path) and path.is_file()
    assert result["max_abs_diff"] <= 1e-4 and result["samples"] == 8
    sidecar = json.loads(path.with_name(path.name + ".json").read_text())
    assert sidecar["input"]["shape"] == ["batch", 1, 8, 8] and len(sidecar["classes"]) == 10
    assert sidecar["deployable"] == ("simkd" if method == "simkd" else "student")

    # the whole test split through the exported file gives the accuracy the run recorded for this checkpoint
    cfg = build_config(None, run_dir / "config.yaml")
    bundle = build_data(cfg.data, torch.device("cpu"), cfg.seed)
    batches = list(bundle.test)
    images, labels = torch.cat([b.images for b in batches]), torch.cat([b.labels for b in batches])
    logits = exported_logits(fmt, path, images)
    assert logits.shape == (len(images), 10)  # a batch size other than the one it was traced with
    summary = json.loads((run_dir / "summary.json").read_text())
    accuracy = 100.0 * (logits.argmax(1) == labels).float().mean().item()
    assert accuracy == pytest.approx(summary["test_acc_at_best_val"], abs=1e-6)

    model, _ = load_model(run_dir / "checkpoints" / "best.pt", bundle.data)
    with torch.no_grad():
        assert torch.allclose(logits, model.eval()(images), atol=1e-4)
    if method == "simkd":  # SimKD predicts through the projector and the teacher's (frozen) classifier
        teacher, _ = load_model(runs["teacher"] / "checkpoints" / "best.pt", bundle.data)
        assert torch.equal(model.classifier.weight, teacher.classifier.weight)
        assert not torch.allclose(logits, model.backbone.eval()(images), atol=1e-2)  # not the bare student


def test_export_command_line_and_last_checkpoint(runs, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    assert "examples:" in capsys.readouterr().out
    out = tmp_path / "deploy" / "student.pt"
    assert main(["export", str(runs["kd"]), "--format", "torchscript", "--checkpoint", "last", "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["path"] == str(out) and out.is_file() and result["checkpoint"].endswith("last.pt")
    assert sorted(p.name for p in out.parent.iterdir()) == ["student.pt", "student.pt.json"]  # no scratch left behind


def test_bad_requests_fail_with_one_clear_message(runs, tmp_path, capsys):
    with pytest.raises(ConfigError, match="does not exist, so it is not a gapkd run directory"):
        gapkd.export(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="holds no config.yaml"):
        gapkd.export(tmp_path)
    with pytest.raises(ConfigError, match="unknown export format 'onxx'. Did you mean 'onnx'"):
        gapkd.export(runs["kd"], format="onxx")
    with pytest.raises(ConfigError, match="'best' or 'last'"):
        gapkd.export(runs["kd"], checkpoint="middle")
    unfinished = tmp_path / "unfinished"
    shutil.copytree(runs["kd"], unfinished)
    (unfinished / "checkpoints" / "last.pt").unlink()
    with pytest.raises(CheckpointError, match="last.pt does not exist"):
        gapkd.export(unfinished, "torchscript", checkpoint="last")
    assert main(["export", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gapkd export: error:") and "Traceback" not in err


def test_missing_onnx_packages_name_the_extra(runs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what `import onnxruntime` sees when it is not installed
    with pytest.raises(GapkdError, match=r'missing: onnxruntime\. Install them with: pip install "gapkd\[export\]"'):
        gapkd.export(runs["kd"], "onnx", tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_an_export_that_disagrees_with_pytorch_is_refused_and_not_written(runs, tmp_path, monkeypatch):
    real = deploy._run_exported
    monkeypatch.setattr(deploy, "_run_exported", lambda fmt, path, images: real(fmt, path, images) + 0.5)
    out = tmp_path / "bad.pt"
    with pytest.raises(deploy.ExportError, match=r"differs from PyTorch by up to 0\.5 on 8 test images \(tolerance 0\.001\); "
                                                 r"nothing was written"):
        gapkd.export(runs["kd"], "torchscript", out)
    assert list(tmp_path.iterdir()) == []
