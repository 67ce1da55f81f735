import json

import pytest
import torch

from gapkd.api import run, run_dir_for
from gapkd.config import build_config
from gapkd.engine.checkpoint import safe_load
from gapkd.errors import ConfigError, NonFiniteLossError
from gapkd.methods import METHODS
from gapkd.methods.ce import CrossEntropy

SUMMARY_KEYS = {"best_val_acc", "best_epoch", "test_acc_at_best_val", "last_val_acc", "last_test_acc", "epochs", "train_seconds"}


def test_training_writes_a_complete_run_directory(tiny_overrides):
    cfg = build_config(tiny_overrides)
    summary = run(cfg, echo=False)
    assert SUMMARY_KEYS <= set(summary)
    run_dir = run_dir_for(cfg)
    for name in ("config.yaml", "env.json", "metrics.jsonl", "train.log", "summary.json", "checkpoints/best.pt", "checkpoints/last.pt", "checkpoints/state.pt"):
        assert (run_dir / name).is_file(), name
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2]
    assert summary["best_val_acc"] == max(x["val_acc"] for x in lines)
    assert summary["test_acc_at_best_val"] == lines[summary["best_epoch"] - 1]["test_acc"]
    assert summary["best_val_acc"] > 30  # learns something in 2 epochs on digits (chance is 10)


def _final_weights(cfg):
    return safe_load(run_dir_for(cfg) / "checkpoints" / "last.pt")["state_dict"]


@pytest.mark.parametrize("amp", ["off", "bf16"])  # bf16 (+ channels_last) is what auto picks on CPUs with native bf16
def test_resume_after_interruption_is_bit_identical(tiny_overrides, monkeypatch, tmp_path, amp):
    tiny_overrides["train"]["epochs"] = 4
    tiny_overrides["train"]["amp"] = amp
    tiny_overrides["schedule"] = {"name": "step", "milestones": [2], "warmup_epochs": 1}
    straight = build_config(tiny_overrides, overrides=["name=straight"])
    run(straight, echo=False)

    interrupted = build_config(tiny_overrides, overrides=["name=interrupted"])
    import gapkd.engine.trainer as trainer

    real_save, calls = trainer.atomic_save, {"n": 0}

    def crash_after_second_state(obj, path):
        real_save(obj, path)
        if str(path).endswith("state.pt"):
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt  # as if killed right after epoch 2's checkpoint

    monkeypatch.setattr(trainer, "atomic_save", crash_after_second_state)
    with pytest.raises(KeyboardInterrupt):
        run(interrupted, echo=False)
    monkeypatch.setattr(trainer, "atomic_save", real_save)
    assert not (run_dir_for(interrupted) / "summary.json").exists()
    summary = run(interrupted, echo=False)
    assert "resuming" in (run_dir_for(interrupted) / "train.log").read_text()
    a, b = _final_weights(straight), _final_weights(interrupted)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    epochs = [json.loads(x)["epoch"] for x in (run_dir_for(interrupted) / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3, 4] and summary["epochs"] == 4


def test_finished_run_is_not_run_twice(tiny_overrides):
    cfg = build_config(tiny_overrides)
    first = run(cfg, echo=False)
    assert run(cfg, echo=False) == first


class _Exploding(CrossEntropy):
    def forward(self, images, labels, step):
        out = super().forward(images, labels, step)
        if step.step == 3:
            out.losses["ce"] = out.losses["ce"] * float("nan")
        return out


def test_nan_loss_stops_naming_step_and_term(tiny_overrides, monkeypatch):
    monkeypatch.setitem(METHODS._entries, "ce", _Exploding)
    cfg = build_config(tiny_overrides)
    with pytest.raises(NonFiniteLossError, match=r"loss term 'ce' became NaN/Inf at step 3 \(epoch 1\)"):
        run(cfg, echo=False)


def test_nan_loss_can_be_skipped_and_counted(tiny_overrides, monkeypatch):
    monkeypatch.setitem(METHODS._entries, "ce", _Exploding)
    cfg = build_config(tiny_overrides, overrides=["train.nonfinite=skip"])
    summary = run(cfg, echo=False)
    assert summary["skipped_steps"] == 1


def test_grad_clip_bounds_the_update(tiny_overrides):
    cfg = build_config(tiny_overrides, overrides=["train.grad_clip=0.001", "train.epochs=1", "optim.momentum=0", "optim.weight_decay=0", "schedule.name=constant"])
    summary = run(cfg, echo=False)
    assert summary["epochs"] == 1


def test_distill_from_a_trained_teacher(tiny_overrides):
    teacher_cfg = build_config(tiny_overrides, overrides=["name=teacher", "student.name=resnet14"])
    run(teacher_cfg, echo=False)
    ckpt = run_dir_for(teacher_cfg) / "checkpoints" / "best.pt"
    student_cfg = build_config(tiny_overrides, overrides=["name=kd", "method.name=kd", "teacher.name=resnet14", f"teacher.checkpoint={ckpt}"])
    summary = run(student_cfg, echo=False)
    assert summary["teacher"] == "resnet14" and summary["method"] == "kd"
    assert summary["teacher_test_acc"] > 30


def test_teacher_of_wrong_class_count_is_refused(tiny_overrides, tmp_path):
    from gapkd.engine.checkpoint import atomic_save
    from gapkd.engine.trainer import deployable_payload
    from gapkd.errors import CheckpointError
    from gapkd.models import create_model

    cfg = build_config(tiny_overrides, overrides=["student.name=resnet14"])
    payload = deployable_payload(CrossEntropy(create_model("resnet14", num_classes=100)), cfg, 1, None)
    atomic_save(payload, tmp_path / "t100.pt")
    bad = build_config(tiny_overrides, overrides=["method.name=kd", "teacher.name=resnet14", f"teacher.checkpoint={tmp_path / 't100.pt'}"])
    with pytest.raises(CheckpointError, match="trained for 100 classes"):
        run(bad, echo=False)


def test_auto_precision_follows_the_hardware(monkeypatch):
    import gapkd.engine.runtime as trainer  # where the runtime is resolved (gapkd.engine.trainer re-exports it)

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for native, expected in ((True, "bf16"), (False, "off")):
        monkeypatch.setattr(trainer, "cpu_has_native_bf16", lambda: native)
        assert trainer.resolve_amp(cpu, "auto") == expected
        assert trainer.resolve_channels_last(cpu, "auto") is native  # follows autocast by default
        assert trainer.resolve_amp(cuda, "auto") == "bf16"
        assert trainer.resolve_amp(cpu, "off") == "off" and trainer.resolve_amp(cpu, "fp16") == "fp16"
        assert trainer.resolve_channels_last(cpu, "auto", False) is False  # an explicit setting wins
        context, dtype = trainer.autocast_context(cpu, "auto")
        assert dtype == (torch.bfloat16 if native else None)


def test_amp_off_survives_yaml():
    """`off` is a YAML boolean: `train.amp=off` on the command line and `amp: off` in a recipe both mean fp32."""
    from gapkd.config import build_config as build

    assert build({"student": {"name": "resnet8"}}, overrides=["train.amp=off"]).train.amp == "off"
    assert build({"student": {"name": "resnet8"}, "train": {"amp": False}}).train.amp == "off"
    with pytest.raises(ConfigError, match="amp"):
        build({"student": {"name": "resnet8"}}, overrides=["train.amp=on"])
