"""train.compile_mode: validated, hashed only when set, passed to torch.compile; and the loop's
per-epoch sums never alias a step's outputs (CUDA graphs overwrite those at the next replay)."""
from __future__ import annotations

import pytest
import torch

from gapkd.api import prepare_distiller
from gapkd.config import build_config
from gapkd.data import build_data
from gapkd.engine.runlog import read_metrics
from gapkd.engine.trainer import fit
from gapkd.errors import ConfigError
from gapkd.methods.base import Distiller, StepOutput
from gapkd.models import create_model


def _cfg(tiny_overrides, *overrides):
    return build_config(tiny_overrides, overrides=list(overrides))


def test_compile_mode_needs_the_inductor_compiler(tiny_overrides):
    with pytest.raises(ConfigError, match="train.compile=true"):
        _cfg(tiny_overrides, "train.compile_mode=reduce-overhead")
    with pytest.raises(ConfigError, match="train.compile=true"):
        _cfg(tiny_overrides, "train.compile=eager", "train.compile_mode=max-autotune")
    with pytest.raises(ConfigError, match="compile_mode"):
        _cfg(tiny_overrides, "train.compile=true", "train.compile_mode=fastest")
    assert _cfg(tiny_overrides, "train.compile=true", "train.compile_mode=reduce-overhead").train.compile_mode == "reduce-overhead"


def test_compile_mode_is_hashed_only_when_set(tiny_overrides):
    on = _cfg(tiny_overrides, "train.compile=true")
    assert on.hparams_hash() == _cfg(tiny_overrides, "train.compile=true", "train.compile_mode=default").hparams_hash()
    assert on.hparams_hash() != _cfg(tiny_overrides, "train.compile=true", "train.compile_mode=reduce-overhead").hparams_hash()
    # the hash this config had before compile_mode existed (computed on the previous commit): runs resume
    assert on.hparams_hash() == "c9c615b1"


def test_compile_mode_reaches_torch_compile(tiny_overrides, monkeypatch):
    seen = {}

    def fake_compile(fn, **kwargs):
        seen.update(kwargs)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    cfg = _cfg(tiny_overrides, "train.compile=true", "train.compile_mode=reduce-overhead")
    prepare_distiller(cfg, build_data(cfg.data, torch.device("cpu"), 0), torch.device("cpu"))
    assert seen["backend"] == "inductor" and seen["mode"] == "reduce-overhead"
    seen.clear()
    cfg = _cfg(tiny_overrides, "train.compile=true")
    prepare_distiller(cfg, build_data(cfg.data, torch.device("cpu"), 0), torch.device("cpu"))
    assert seen["backend"] == "inductor" and seen["mode"] is None


class _ReusedOutput(Distiller):
    """Returns its loss in the same tensor every step, as a CUDA-graph replay does."""

    needs_teacher = False

    def __init__(self, student):
        super().__init__(student)
        self.register_buffer("out", torch.zeros(()), persistent=False)
        self.values: list[float] = []

    def forward(self, images, labels, step):
        logits = self.student(images)
        loss = torch.nn.functional.cross_entropy(logits, labels)
        self.values.append(float(loss.detach()))
        out = self.out.detach()  # the same memory every step, without the last step's autograd history
        out.copy_(loss)  # the reused output memory now holds this step's loss
        return StepOutput({"ce": out}, logits)


def test_epoch_loss_sums_do_not_alias_step_outputs(tiny_overrides, tmp_path):
    cfg = _cfg(tiny_overrides, "train.epochs=1")
    bundle = build_data(cfg.data, torch.device("cpu"), 0)
    distiller = _ReusedOutput(create_model("resnet8", num_classes=bundle.data.num_classes, in_channels=bundle.data.in_channels))
    fit(distiller, bundle, cfg, tmp_path / "run", torch.device("cpu"), echo=False)
    (record,) = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(distiller.values) > 2
    assert record["loss/ce"] == pytest.approx(sum(distiller.values) / len(distiller.values), rel=1e-5)
