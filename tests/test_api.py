"""The top-level Python API mirrors the command line: gapkd.train, distill, evaluate, export, Study."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import gapkd
from gapkd.cli import main
from gapkd.errors import ConfigError

SRC = Path(__file__).resolve().parents[1] / "src"
DATA = {"name": "digits", "batch_size": 64, "augment": {"crop_padding": 1, "flip": False}}
TRAIN = {"epochs": 1, "device": "cpu", "log_every": 1000}

#: a teacher, a scratch student and a kd student on a slice of digits: about a second each
STUDY = {
    "name": "api-tiny",
    "base": {"data": {**DATA, "train_subset": 120, "test_subset": 60, "batch_size": 32}, "train": TRAIN},
    "pairs": [{"teacher": "resnet14", "student": "resnet8"}],
    "methods": {"scratch": {"name": "ce"}, "kd": {"grid": {"temperature": [2.0, 4.0]}}},
    "seeds": [0],
    "budgets": {"smoke": {"note": "digits, 1 epoch"}, "one-kd": {"methods": {"kd": {"grid": {"temperature": [4.0]}}}}},
}


def test_the_top_level_names_exist_and_are_documented():
    for name in ("train", "distill", "evaluate", "export", "Study", "run", "create_model", "wrap_model", "load_checkpoint"):
        assert name in gapkd.__all__ and (getattr(gapkd, name).__doc__ or "").strip(), name
    for name in ("load", "from_file", "builtin", "names", "plan", "run", "status", "report"):
        assert (getattr(gapkd.Study, name).__doc__ or "").strip(), name


def test_import_stays_light():
    """`import gapkd` must not pull in the optional exporters, plotting or the docs toolchain."""
    code = ("import sys, gapkd; heavy = [m for m in ('onnx', 'onnxruntime', 'onnxscript', 'matplotlib', 'scipy', 'mkdocs') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": str(SRC)}, check=True)
    assert out.stdout.strip() == "[]"


def test_train_distill_evaluate_from_python(tmp_path):
    teacher = gapkd.train(overrides={"out_dir": str(tmp_path), "name": "teacher", "data": DATA, "train": TRAIN,
                                     "student": {"name": "resnet14"}}, echo=False)
    assert teacher["method"] == "ce" and teacher["epochs"] == 1 and teacher["run"] == "teacher"
    checkpoint = tmp_path / "teacher" / "checkpoints" / "best.pt"
    # the same dotted key=value strings as on the command line
    student = gapkd.distill(overrides=[f"out_dir={tmp_path}", "name=student", "data.name=digits", "data.augment.flip=false",
                                       "train.epochs=1", "train.device=cpu", "student.name=resnet8", "teacher.name=resnet14",
                                       f"teacher.checkpoint={checkpoint}", "method.name=dkd"], echo=False)
    assert student["method"] == "dkd" and student["teacher"] == "resnet14"
    assert student["teacher_test_acc"] == teacher["test_acc_at_best_val"]  # the teacher measured again, on the same split

    evaluated = gapkd.evaluate(checkpoint, {"name": "digits"}, device="cpu")
    assert evaluated["model"] == "resnet14"
    assert (evaluated["val_acc"], evaluated["test_acc"]) == (teacher["best_val_acc"], teacher["test_acc_at_best_val"])
    assert gapkd.evaluate(checkpoint, ["data.name=digits"], device="cpu") == evaluated
    with pytest.raises(ConfigError, match=r"evaluate takes only data\.\* overrides, got \['train'\]"):
        gapkd.evaluate(checkpoint, ["train.epochs=3"])


def test_study_from_python_runs_reports_and_resumes(tmp_path):
    lines: list[str] = []
    study = gapkd.Study.load(copy.deepcopy(STUDY), "smoke", directory=tmp_path / "s", overrides=["train.log_every=7"])
    assert (study.name, study.budget, study.dir) == ("api-tiny", "smoke", (tmp_path / "s").resolve())
    plan = study.plan()
    assert [(r.role, r.method) for r in plan] == [("teacher", "teacher"), ("student", "scratch"), ("student", "kd"), ("student", "kd")]
    assert [r.name for r in study.plan("2/2", "students")] == [plan[2].name]  # students at positions 1, 3, ... of 3
    assert [r.name for r in study.plan((1, 2), "teachers")] == [plan[0].name]

    result = study.run(echo=False, log=lines.append)
    assert len(result.trained) == 4 and not result.failed and lines  # progress lines go to `log`
    assert all(study.finished(r) for r in plan)
    assert "log_every: 7" in (study.run_dir(plan[0]) / "config.yaml").read_text()  # overrides reach every run
    status = study.status()
    assert (status["done"], status["total"], status["unfinished"]) == (4, 4, [])
    paths = study.report(tmp_path / "report")
    assert paths["md"].is_file() and "kd" in paths["md"].read_text()
    again = study.run(echo=False, log=lines.append)
    assert (again.trained, len(again.skipped)) == ([], 4)  # finished runs are skipped

    path = tmp_path / "api-tiny.yaml"
    path.write_text(yaml.safe_dump(STUDY, sort_keys=False))
    same = gapkd.Study.from_file(path, "one-kd", directory=tmp_path / "s", overrides={"train": {"log_every": 7}})
    assert [r.key for r in same.plan()] == [plan[0].key, plan[1].key, plan[3].key]  # kd at temperature 4 only: same runs
    assert same.status()["done"] == 3


def test_study_errors_and_builtins():
    assert {"capacity-cifar10", "gap-ladder"} <= set(gapkd.Study.names())
    assert len(gapkd.Study.builtin("capacity-cifar10", "smoke").plan()) == 25
    with pytest.raises(ConfigError, match="Did you mean 'gap-ladder'"):
        gapkd.Study.builtin("gap-laddr", "smoke")
    with pytest.raises(ConfigError, match="choose one with --budget"):
        gapkd.Study.builtin("gap-ladder")
    with pytest.raises(ConfigError, match="out of range"):
        gapkd.Study.load(copy.deepcopy(STUDY), "smoke").plan((3, 2))


def test_the_study_command_line_goes_through_study(tmp_path, capsys, monkeypatch):
    """`gapkd study status` prints what Study.status() returns (the command line is a thin wrapper)."""
    path = tmp_path / "api-tiny.yaml"
    path.write_text(yaml.safe_dump(STUDY, sort_keys=False))
    seen = []
    real = gapkd.Study.status
    monkeypatch.setattr(gapkd.Study, "status", lambda self: seen.append(self) or real(self))
    assert main(["study", "status", str(path), "--budget", "smoke", "--dir", str(tmp_path / "s"), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert len(seen) == 1 and status == seen[0].status() and (status["done"], status["total"]) == (0, 4)
