"""Gradient clipping per parameter group (train.grad_clip_mode) and the per-group statistics the loop logs."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from gapkd.config import build_config
from gapkd.engine.clipping import clip_gradients
from gapkd.errors import ConfigError


def _groups_with_grads(scales=(1.0, 30.0)):
    torch.manual_seed(0)
    groups = []
    for index, scale in enumerate(scales):
        params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
        for p in params:
            p.grad = scale * torch.randn_like(p)
        groups.append((f"g{index}", params))
    return groups


def _norm(params):
    return float(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params])))


def test_per_group_bounds_each_group_on_its_own():
    groups = _groups_with_grads()
    before = [_norm(ps) for _, ps in groups]
    norms, factors = clip_gradients(groups, 2.0, "per_group")
    assert norms.tolist() == pytest.approx(before, rel=1e-5)
    for (_, params), norm_before, factor in zip(groups, before, factors.tolist()):
        assert factor == pytest.approx(min(1.0, 2.0 / (norm_before + 1e-6)), rel=1e-5)
        assert _norm(params) == pytest.approx(min(norm_before, 2.0), rel=1e-4)


def test_global_is_torchs_clip_over_all_parameters():
    groups = _groups_with_grads()
    reference = _groups_with_grads()  # the same values (seeded)
    total = torch.nn.utils.clip_grad_norm_([p for _, ps in reference for p in ps], 2.0)
    norms, factors = clip_gradients(groups, 2.0, "global")
    for (_, ps), (_, ref) in zip(groups, reference):
        for p, r in zip(ps, ref):
            assert torch.equal(p.grad, r.grad)  # bit-identical to the clipping before per-group modes existed
    assert factors.tolist() == pytest.approx([2.0 / float(total + 1e-6)] * 2, rel=1e-5)
    # the small group is scaled by the large one's norm: the failure per_group prevents
    assert _norm(groups[0][1]) < 0.2 * norms[0]


def test_no_clip_changes_nothing_and_reports_norms():
    groups = _groups_with_grads()
    before = [[p.grad.clone() for p in ps] for _, ps in groups]
    norms, factors = clip_gradients(groups, None, "per_group")
    assert factors.tolist() == [1.0, 1.0]
    assert all(torch.equal(p.grad, b) for (_, ps), bs in zip(groups, before) for p, b in zip(ps, bs))
    assert norms.tolist() == pytest.approx([_norm(ps) for _, ps in groups], rel=1e-5)


def test_unknown_mode_names_the_choices(tiny_overrides):
    with pytest.raises(ConfigError, match="per_group.*global"):
        build_config(tiny_overrides, overrides=["train.grad_clip_mode=perparam"])


def test_default_mode_keeps_existing_run_hashes(tiny_overrides):
    plain = build_config(tiny_overrides)
    explicit = build_config(tiny_overrides, overrides=["train.grad_clip_mode=per_group"])
    other = build_config(tiny_overrides, overrides=["train.grad_clip_mode=global"])
    assert plain.hparams_hash() == explicit.hparams_hash() != other.hparams_hash()


def test_clip_groups_split_auxiliary_modules_from_the_student():
    from gapkd.methods import METHODS
    from gapkd.models import create_model

    teacher = create_model("resnet14", num_classes=10, in_channels=1)
    student = create_model("resnet8", num_classes=10, in_channels=1)
    dfpt = METHODS.get("dfpt-kd")(student, teacher)
    assert [name for name, _ in dfpt.clip_groups()] == ["student", "prompt"]
    from gapkd.methods.base import TaskInfo

    fitnet = METHODS.get("fitnet")(copy.deepcopy(student), teacher, task=TaskInfo(10, 1, 8, 100))
    names = [name for name, _ in fitnet.clip_groups()]
    assert names == ["student", "auxiliary"]  # the regressor is clipped on its own
    assert sum(p.numel() for _, ps in fitnet.clip_groups() for p in ps) == sum(
        p.numel() for p in fitnet.parameters() if p.requires_grad)


@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory):
    from gapkd.api import run

    out = tmp_path_factory.mktemp("clip")
    base = {
        "out_dir": str(out),
        "data": {"name": "digits", "batch_size": 32, "train_subset": 320, "test_subset": 60,
                 "augment": {"crop_padding": 1, "flip": False}},
        "optim": {"lr": 0.05}, "schedule": {"name": "cosine"},
        "train": {"epochs": 2, "device": "cpu", "log_every": 1000, "amp": "off"},
    }
    run(build_config(base, overrides={"name": "teacher", "student": {"name": "resnet14"}}), echo=False)
    return base, str(out / "teacher" / "checkpoints" / "best.pt")


def _first_epoch(digits_teacher, name, method, mode):
    from gapkd.api import run

    base, teacher = digits_teacher
    run(build_config(base, overrides={
        "name": name, "student": {"name": "resnet8"}, "teacher": {"name": "resnet14", "checkpoint": teacher},
        "method": {"name": method}, "train": {"epochs": 1, "grad_clip": 1.0, "grad_clip_mode": mode}}), echo=False)
    return json.loads(open(f"{base['out_dir']}/{name}/metrics.jsonl").readline())


def test_dfpt_student_update_is_not_shrunk_by_the_prompt_path(digits_teacher):
    """The probe of the DFPT-KD failure: under one global norm the prompt path's larger gradient cuts
    the student's update (clip factor well below KD's); clipped per group, the student's factor is KD's."""
    kd = _first_epoch(digits_teacher, "kd", "kd", "per_group")
    per_group = _first_epoch(digits_teacher, "dfpt-per-group", "dfpt-kd", "per_group")
    global_ = _first_epoch(digits_teacher, "dfpt-global", "dfpt-kd", "global")
    assert per_group["grad_norm/prompt"] > 1.5 * per_group["grad_norm/student"]  # the premise of the probe
    assert per_group["clip_factor/student"] == pytest.approx(kd["clip_factor/student"], abs=0.05)
    assert global_["clip_factor/student"] < 0.8 * kd["clip_factor/student"]
    assert global_["clip_factor/student"] == pytest.approx(global_["clip_factor/prompt"])
