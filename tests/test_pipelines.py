"""TAKD and ESKD pipelines: stage derivation, skipping and resuming stages, the early-stopped
teacher chosen on validation, and the `gapkd pipeline` command."""
import json
from pathlib import Path

import pytest
import yaml

from gapkd import pipelines
from gapkd.api import evaluate_checkpoint, run, run_dir_for
from gapkd.cli import main
from gapkd.config import build_config
from gapkd.engine.checkpoint import safe_load
from gapkd.errors import ConfigError
from gapkd.methods.ce import CrossEntropy
from gapkd.models import create_model


def _epochs(overrides, n):
    overrides["train"]["epochs"] = n
    return overrides


@pytest.fixture
def trained_teacher(tiny_overrides):
    """resnet20 trained for one epoch on digits; returns (name, checkpoint path)."""
    cfg = build_config(_epochs(dict(tiny_overrides), 1), overrides=["name=teacher", "student.name=resnet20"])
    run(cfg, echo=False)
    return "resnet20", run_dir_for(cfg) / "checkpoints" / "best.pt"


def _recipe(tiny_overrides, teacher, method="kd", epochs=1):
    tree = dict(_epochs(tiny_overrides, epochs))
    tree["teacher"] = {"name": teacher[0], "checkpoint": str(teacher[1])}
    tree["method"] = {"name": method}
    return tree


def _mtime(path: Path) -> int:
    return path.stat().st_mtime_ns


def test_takd_trains_assistant_then_student_and_skips_finished_stages(tiny_overrides, trained_teacher):
    summary = pipelines.takd(overrides=_recipe(tiny_overrides, trained_teacher), assistant="resnet14", echo=False)
    root = Path(summary["dir"])
    assert list(summary["stages"]) == ["assistant-resnet14", "student"]
    assistant_cfg = yaml.safe_load((root / "assistant-resnet14" / "config.yaml").read_text())
    student_cfg = yaml.safe_load((root / "student" / "config.yaml").read_text())
    assert assistant_cfg["teacher"] == {"name": "resnet20", "checkpoint": str(trained_teacher[1]), "options": {}, "init_head": "load"}
    assert assistant_cfg["student"]["name"] == "resnet14" and assistant_cfg["method"]["name"] == "kd"
    assert student_cfg["teacher"]["name"] == "resnet14"
    assert student_cfg["teacher"]["checkpoint"] == str(root / "assistant-resnet14" / "checkpoints" / "best.pt")
    assert student_cfg["student"]["name"] == "resnet8"
    assert summary["student"]["teacher"] == "resnet14" and summary["student"]["student"] == "resnet8"
    assert json.loads((root / "pipeline.json").read_text()) == summary

    stamps = {stage: _mtime(root / stage / "metrics.jsonl") for stage in summary["stages"]}
    again = pipelines.takd(overrides=_recipe(tiny_overrides, trained_teacher), assistant="resnet14", echo=False)
    assert again == summary and all(_mtime(root / s / "metrics.jsonl") == t for s, t in stamps.items())


def test_takd_resumes_an_interrupted_stage_without_redoing_finished_ones(tiny_overrides, trained_teacher, monkeypatch):
    import gapkd.engine.trainer as trainer

    recipe = _recipe(tiny_overrides, trained_teacher, epochs=2)
    real_save = trainer.atomic_save

    def crash_in_student_stage(obj, path):
        real_save(obj, path)
        if str(path).endswith("student/checkpoints/state.pt"):
            raise KeyboardInterrupt  # killed after the student's first epoch

    monkeypatch.setattr(trainer, "atomic_save", crash_in_student_stage)
    with pytest.raises(KeyboardInterrupt):
        pipelines.takd(overrides=recipe, assistant="resnet14", echo=False)
    monkeypatch.setattr(trainer, "atomic_save", real_save)
    root = next((Path(recipe["out_dir"])).glob("takd_*"))
    assistant_stamp = _mtime(root / "assistant-resnet14" / "summary.json")
    summary = pipelines.takd(overrides=recipe, assistant="resnet14", echo=False)
    assert _mtime(root / "assistant-resnet14" / "summary.json") == assistant_stamp
    assert "resuming" in (root / "student" / "train.log").read_text()
    assert summary["student"]["epochs"] == 2


@pytest.fixture
def fake_run(monkeypatch):
    """Replace api.run in the pipelines with a recorder: derivation tests need no training."""
    seen = []

    def record(cfg, **kwargs):
        seen.append(cfg)
        return {"run": cfg.name, "student": cfg.student.name}

    monkeypatch.setattr(pipelines.api, "run", record)
    return seen


def test_takd_chain_of_assistants_links_each_stage_to_the_previous(tiny_overrides, fake_run):
    recipe = _recipe(tiny_overrides, ("resnet56", "/ckpt/t.pt"), method="dkd")
    recipe["method"]["beta"] = 2.0
    summary = pipelines.takd(overrides=recipe, assistant=["resnet32", "resnet20"], echo=False)
    names = [cfg.name for cfg in fake_run]
    assert names == ["assistant1-resnet32", "assistant2-resnet20", "student"]
    assert [cfg.teacher.name for cfg in fake_run] == ["resnet56", "resnet32", "resnet20"]
    assert fake_run[0].teacher.checkpoint == "/ckpt/t.pt"
    for before, after in zip(fake_run, fake_run[1:]):
        assert after.teacher.checkpoint == str(run_dir_for(before) / "checkpoints" / "best.pt")
    assert all(cfg.method.name == "dkd" and cfg.method.hparams["beta"] == 2.0 for cfg in fake_run)
    assert all(Path(cfg.out_dir) == Path(summary["dir"]) for cfg in fake_run)


def test_pipeline_options_are_validated_with_a_clear_message(tiny_overrides, fake_run):
    recipe = _recipe(tiny_overrides, ("resnet56", "/ckpt/t.pt"))
    with pytest.raises(ConfigError, match="takd.assistant: required"):
        pipelines.takd(overrides=recipe, echo=False)
    recipe["takd"] = {"assistant": "resnet32", "assistnt_options": {}}
    with pytest.raises(ConfigError, match="takd.assistnt_options: unknown key. Did you mean 'assistant_options'"):
        pipelines.takd(overrides=recipe, echo=False)
    with pytest.raises(ConfigError, match="stage 'assistant-resnet32'.*method.temprature"):
        pipelines.takd(overrides={**recipe, "takd": {"assistant": "resnet32"}, "method": {"name": "kd", "temprature": 3}}, echo=False)
    assert fake_run == []  # nothing ran: every stage is validated first
    del recipe["takd"]
    with pytest.raises(ConfigError, match="eskd.stop_epoch: required"):
        pipelines.eskd(overrides=recipe, echo=False)
    with pytest.raises(ConfigError, match="beyond the teacher's 5 epochs"):
        pipelines.eskd(overrides=recipe, stop_epoch=6, teacher_epochs=5, echo=False)
    with pytest.raises(ConfigError, match="val_fraction > 0"):
        pipelines.eskd(overrides={**recipe, "data": {"name": "digits", "val_fraction": 0.0}}, stop_epoch=1, echo=False)


def test_keep_best_within_saves_the_first_best_epoch_inside_the_window(tiny_overrides, tmp_path):
    cfg = build_config(tiny_overrides)
    hook = pipelines.keep_best_within(tmp_path / "early.pt", 3, cfg)
    distiller = CrossEntropy(create_model("resnet8", num_classes=10, in_channels=1))
    for epoch, val in enumerate([50.0, 70.0, 70.0, 90.0]):
        hook(distiller, epoch, {"val_acc": val})
    saved = safe_load(tmp_path / "early.pt")
    assert (saved["epoch"], saved["val_acc"], saved["model"]) == (2, 70.0, "resnet8")


def test_eskd_distils_from_the_best_validation_checkpoint_of_the_first_epochs(tiny_overrides):
    recipe = _epochs(tiny_overrides, 1)
    recipe["teacher"] = {"name": "resnet14", "checkpoint": "ignored.pt"}
    recipe["method"] = {"name": "kd"}
    summary = pipelines.eskd(overrides=recipe, stop_epoch=2, teacher_epochs=3, echo=False)
    root = Path(summary["dir"])
    teacher_log = [json.loads(line) for line in (root / "teacher" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in teacher_log] == [1, 2, 3] and summary["stages"]["teacher"]["method"] == "ce"
    best_early = max(r["val_acc"] for r in teacher_log[:2])
    early = summary["early_teacher"]
    assert early["val_acc"] == best_early
    assert early["epoch"] == next(r["epoch"] for r in teacher_log if r["val_acc"] == best_early)
    # the saved weights are that epoch's: they score the recorded validation accuracy again
    teacher_cfg = build_config(yaml.safe_load((root / "teacher" / "config.yaml").read_text()))
    assert evaluate_checkpoint(early["checkpoint"], teacher_cfg.data, device="cpu", amp=teacher_cfg.train.amp)["val_acc"] == pytest.approx(best_early)
    student_cfg = yaml.safe_load((root / "student" / "config.yaml").read_text())
    assert student_cfg["teacher"]["checkpoint"] == early["checkpoint"]
    assert summary["student"]["teacher"] == "resnet14" and "teacher_val_acc" in summary["student"]
    assert summary["student"]["teacher_val_acc"] == pytest.approx(best_early)


def test_pipeline_command_runs_and_prints_the_summary(tiny_overrides, fake_run, capsys):
    args = ["pipeline", "takd", "takd.assistant=resnet14", f"out_dir={tiny_overrides['out_dir']}", "data.name=digits",
            "student.name=resnet8", "teacher.name=resnet20", "teacher.checkpoint=t.pt", "method.name=kd", "--quiet"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["pipeline"] == "takd" and list(summary["stages"]) == ["assistant-resnet14", "student"]
    assert main(["pipeline", "tkd"]) == 2
    assert "Did you mean 'takd'" in capsys.readouterr().err


def test_pipeline_help_has_examples_and_list_shows_pipelines(capsys):
    with pytest.raises(SystemExit):
        main(["pipeline", "--help"])
    assert "examples" in capsys.readouterr().out
    assert main(["list", "pipelines", "-v"]) == 0
    out = capsys.readouterr().out
    assert "takd" in out and "eskd" in out and "Early-stopped KD" in out
