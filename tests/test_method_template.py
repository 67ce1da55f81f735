"""Template for a new KD method: the method in one file, and the tests every method should have.

docs/add-a-method.md shows this file. To add a method, copy the part between the ``method``
markers into ``src/gapkd/methods/<name>.py`` (and add ``<name>`` to the import line in
``src/gapkd/methods/__init__.py``), copy the rest into ``tests/test_<name>.py``, then change both.

The example is the logit regression of Ba & Caruana, "Do Deep Nets Really Need to be Deep?"
(NeurIPS 2014): the student regresses the teacher's logits with a squared L2 loss. It is
registered as ``example-l2`` so it never collides with a real method.
"""
# --8<-- [start:method]
from __future__ import annotations

from typing import Annotated

import torch.nn.functional as F
from pydantic import Field

from gapkd.methods import Distiller, StepOutput, hparams, register_method


@hparams
class LogitL2Hparams:
    l2_weight: Annotated[float, Field(gt=0)] = 1.0
    """weight of the logit regression: half the squared L2 distance of the logits, averaged over the batch"""
    ce_weight: Annotated[float, Field(ge=0)] = 0.0
    """weight of cross-entropy with the labels (the paper trains on the teacher's logits alone)"""


@register_method("example-l2")
class LogitL2(Distiller):
    """Logit regression (Ba & Caruana, 2014): l2_weight * ||z_S - z_T||^2 / 2 (+ ce_weight * CE)."""

    Hparams = LogitL2Hparams

    def forward(self, images, labels, step):
        teacher_logits = self.teacher_forward(images).logits  # no autograd; once per step
        logits = self.student(images)
        h = self.hparams
        losses = {"l2": h.l2_weight * 0.5 * (logits - teacher_logits).pow(2).sum(dim=1).mean()}
        if h.ce_weight > 0:
            losses["ce"] = h.ce_weight * F.cross_entropy(logits, labels)
        return StepOutput(losses, logits)  # the total loss is the sum of the named terms; each is logged
# --8<-- [end:method]


# --8<-- [start:tests]
import copy
import json
import math

import pytest
import torch

from gapkd.api import run, run_dir_for
from gapkd.config import build_config
from gapkd.errors import ConfigError
from gapkd.methods import METHODS, StepInfo
from gapkd.models import create_model
from gapkd.testing import FixedLogits  # a model whose logits are hand-made numbers

STEP = StepInfo(epoch=0, step=0, epochs=1, steps_per_epoch=1)


def test_loss_matches_a_hand_computation():
    student, teacher = [[1.0, 2.0, 0.0], [0.0, 1.0, 1.0]], [[0.0, 0.0, 0.0], [1.0, 1.0, 3.0]]
    method = METHODS.get("example-l2")(FixedLogits(student), FixedLogits(teacher, trainable=False), l2_weight=2.0, ce_weight=0.5)
    out = method(torch.zeros(2, 1), torch.tensor([1, 2]), STEP)
    # squared distances 1+4+0 = 5 and 1+0+4 = 5; half of their mean is 2.5; times l2_weight 2
    assert out.losses["l2"].item() == pytest.approx(5.0)
    ce = -(math.log(math.exp(2) / (math.e + math.exp(2) + 1)) + math.log(math.e / (1 + 2 * math.e))) / 2
    assert out.losses["ce"].item() == pytest.approx(0.5 * ce, rel=1e-6)
    no_ce = METHODS.get("example-l2")(FixedLogits(student), FixedLogits(teacher, trainable=False))
    assert set(no_ce(torch.zeros(2, 1), torch.tensor([1, 2]), STEP).losses) == {"l2"}  # ce_weight 0: no term at all


def _pair():
    torch.manual_seed(0)
    return create_model("resnet8", num_classes=10, in_channels=1), create_model("resnet14", num_classes=10, in_channels=1)


def test_gradients_reach_exactly_the_student():
    student, teacher = _pair()
    method = METHODS.get("example-l2")(student, teacher, ce_weight=0.1).train()
    out = method(torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]), STEP)
    sum(out.losses.values()).backward()
    trained = {id(p) for group in method.param_groups() for p in group["params"]}
    assert trained == {id(p) for p in student.parameters()}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_teacher_is_bit_identical_after_training_steps():
    student, teacher = _pair()
    before = copy.deepcopy(teacher.state_dict())
    method = METHODS.get("example-l2")(student, teacher).train()
    optimizer = torch.optim.SGD([p for g in method.param_groups() for p in g["params"]], lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        sum(method(torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]), STEP).losses.values()).backward()
        optimizer.step()
    assert not teacher.training
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # weights and BN statistics


def test_hyper_parameters_are_validated_from_the_config(tiny_overrides):
    base = {**tiny_overrides, "teacher": {"name": "resnet14", "checkpoint": "teacher.pt"}}
    with pytest.raises(ConfigError, match="l2_weight"):
        build_config(base, overrides=["method.name=example-l2", "method.l2_weight=0"])
    with pytest.raises(ConfigError, match="temperature"):
        build_config(base, overrides=["method.name=example-l2", "method.temperature=4"])  # not one of its hyper-parameters


def test_end_to_end_on_digits(tiny_overrides):
    teacher = build_config(tiny_overrides, overrides=["name=teacher", "student.name=resnet14", "train.epochs=2"])
    run(teacher, echo=False)
    cfg = build_config(tiny_overrides, overrides=["name=student", "method.name=example-l2", "method.ce_weight=0.1",
                                                  "teacher.name=resnet14",
                                                  f"teacher.checkpoint={run_dir_for(teacher) / 'checkpoints' / 'best.pt'}"])
    summary = run(cfg, echo=False)
    assert summary["method"] == "example-l2" and summary["epochs"] == 2
    assert summary["best_val_acc"] > 30  # chance is 10
    records = [json.loads(line) for line in (run_dir_for(cfg) / "metrics.jsonl").read_text().splitlines()]
    assert {"loss/l2", "loss/ce"} <= set(records[0])
# --8<-- [end:tests]
