"""DKD, DIST, CTKD, Logit-KD, FitNet, AT and Feature-KD: each loss against an independent numpy
computation on hand-made tensors, gradients reaching exactly what should train, a frozen teacher,
an end-to-end run on digits, and every YAML recipe under configs/ validating."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from gapkd.api import run, run_dir_for
from gapkd.config import build_config
from gapkd.engine.checkpoint import atomic_save
from gapkd.engine.optim import build_optimizer
from gapkd.engine.trainer import deployable_payload
from gapkd.errors import ConfigError
from gapkd.methods import METHODS, StepInfo, TaskInfo
from gapkd.methods.ce import CrossEntropy
from gapkd.models import create_model
from gapkd.testing import FixedLogits

REPO = Path(__file__).resolve().parents[1]
NEW_METHODS = ["dkd", "dist", "ctkd", "logit-kd", "fitnet", "at", "feature-kd"]
TASK16 = TaskInfo(num_classes=10, in_channels=3, image_size=16, num_train=100)


# ---------------------------------------------------------------- numpy references
def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def kl(p, q):
    return float(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0))


def ce(logits, labels):
    return float(np.mean([-math.log(softmax(row)[y]) for row, y in zip(logits, labels)]))


def pearson(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (np.sqrt((a * a).sum()) * np.sqrt((b * b).sum())))


STUDENT = np.array([[1.0, 2.0, 0.5, -1.0], [0.0, -1.0, 3.0, 0.2], [2.5, 0.1, 0.3, 0.0]])
TEACHER = np.array([[2.0, 0.0, 1.0, -0.5], [1.0, 1.0, 1.0, 4.0], [3.0, -1.0, 0.5, 0.5]])
LABELS = np.array([1, 2, 0])


def _step(epoch=0, epochs=10):
    return StepInfo(epoch=epoch, step=epoch, epochs=epochs, steps_per_epoch=1)


def _logit_method(name, **hyper):
    return METHODS.get(name)(FixedLogits(STUDENT), FixedLogits(TEACHER, trainable=False), **hyper)


def _run_logits(method, epoch=0):
    return method(torch.zeros(3, 1), torch.tensor(LABELS), _step(epoch))


# ---------------------------------------------------------------- logit methods
def _dkd_reference(s, t, labels, tau):
    tckd = nckd = 0.0
    for si, ti, y in zip(s, t, labels):
        ps, pt = softmax(si / tau), softmax(ti / tau)
        tckd += kl([pt[y], 1 - pt[y]], [ps[y], 1 - ps[y]])
        others = [c for c in range(len(si)) if c != y]
        nckd += kl(softmax(ti[others] / tau), softmax(si[others] / tau))
    n = len(labels)
    return tckd / n * tau**2, nckd / n * tau**2


@pytest.mark.parametrize("epoch, ramp", [(0, 0.25), (2, 0.75), (3, 1.0), (50, 1.0)])
def test_dkd_matches_hand_computation_with_linear_warmup(epoch, ramp):
    method = _logit_method("dkd", alpha=1.5, beta=6.0, temperature=2.0, warmup_epochs=4, ce_weight=0.7)
    out = _run_logits(method, epoch)
    tckd, nckd = _dkd_reference(STUDENT, TEACHER, LABELS, 2.0)
    assert out.losses["tckd"].item() == pytest.approx(ramp * 1.5 * tckd, rel=1e-5)
    assert out.losses["nckd"].item() == pytest.approx(ramp * 6.0 * nckd, rel=1e-5)
    assert out.losses["ce"].item() == pytest.approx(0.7 * ce(STUDENT, LABELS), rel=1e-5)


def test_dkd_without_warmup_has_full_weight_from_the_start():
    out = _run_logits(_logit_method("dkd", warmup_epochs=0, alpha=1.0, beta=1.0, temperature=1.0))
    tckd, nckd = _dkd_reference(STUDENT, TEACHER, LABELS, 1.0)
    assert out.losses["tckd"].item() + out.losses["nckd"].item() == pytest.approx(tckd + nckd, rel=1e-5)


def test_dist_matches_pearson_computed_by_hand():
    tau = 3.0
    out = _run_logits(_logit_method("dist", beta=1.5, gamma=0.5, temperature=tau, ce_weight=1.0))
    ps = np.stack([softmax(r / tau) for r in STUDENT])
    pt = np.stack([softmax(r / tau) for r in TEACHER])
    inter = 1 - np.mean([pearson(ps[i], pt[i]) for i in range(ps.shape[0])])
    intra = 1 - np.mean([pearson(ps[:, c], pt[:, c]) for c in range(ps.shape[1])])
    assert out.losses["inter"].item() == pytest.approx(1.5 * tau**2 * inter, rel=1e-4)
    assert out.losses["intra"].item() == pytest.approx(0.5 * tau**2 * intra, rel=1e-4)
    assert out.losses["ce"].item() == pytest.approx(ce(STUDENT, LABELS), rel=1e-5)


def _kd_reference(s, t, tau):
    return np.mean([kl(softmax(ti / tau), softmax(si / tau)) for si, ti in zip(s, t)]) * tau**2


def test_logit_kd_is_alpha_tau2_kl_plus_one_minus_alpha_ce():
    out = _run_logits(_logit_method("logit-kd", alpha=0.3, temperature=2.0))
    assert out.losses["kd"].item() == pytest.approx(0.3 * _kd_reference(STUDENT, TEACHER, 2.0), rel=1e-5)
    assert out.losses["ce"].item() == pytest.approx(0.7 * ce(STUDENT, LABELS), rel=1e-5)
    with pytest.raises(Exception):
        _logit_method("logit-kd", alpha=1.5)


def test_ctkd_curriculum_follows_the_cosine_schedule():
    method = _logit_method("ctkd", lambda_max=2.0, lambda_epochs=10)
    expected = {0: 2.0 * (1 - math.cos(math.pi / 10)) / 2, 4: 1.0, 9: 2.0, 30: 2.0}
    for epoch, value in expected.items():
        assert method.reversal_strength(epoch) == pytest.approx(value)
    assert _logit_method("ctkd", lambda_epochs=0).reversal_strength(0) == 1.0
    values = [method.reversal_strength(e) for e in range(12)]
    assert values == sorted(values) and values[0] > 0


def test_ctkd_loss_uses_the_learned_temperature_and_reverses_its_gradient():
    method = _logit_method("ctkd", ce_weight=0.1, kd_weight=0.9, min_temperature=1.0, temperature_range=20.0, lambda_epochs=10)
    tau0 = 1 + 20 / (1 + math.exp(-1.0))  # the official initial logit is 1
    out = _run_logits(method, epoch=4)  # lambda = 0.5 at the fifth epoch
    assert out.losses["kd"].item() == pytest.approx(0.9 * _kd_reference(STUDENT, TEACHER, tau0), rel=1e-5)
    assert out.losses["ce"].item() == pytest.approx(0.1 * ce(STUDENT, LABELS), rel=1e-5)
    sum(out.losses.values()).backward()
    # d(kd)/d(logit) by central differences on the numpy loss, through tau = 1 + 20 sigmoid(logit)
    h = 1e-4
    tau = lambda z: 1 + 20 / (1 + math.exp(-z))  # noqa: E731
    slope = 0.9 * (_kd_reference(STUDENT, TEACHER, tau(1 + h)) - _kd_reference(STUDENT, TEACHER, tau(1 - h))) / (2 * h)
    assert method.temperature.logit.grad.item() == pytest.approx(-0.5 * slope, rel=1e-3)


# ---------------------------------------------------------------- feature methods
def _at_map(f, p=2.0):
    a = (np.abs(f) ** p).mean(axis=0).reshape(-1)
    return a / np.sqrt((a * a).sum())


def _block_mean(f, size):
    c, h, w = f.shape
    return f.reshape(c, size, h // size, size, w // size).mean(axis=(2, 4))


def test_attention_transfer_loss_by_hand_with_pooling_of_the_larger_map():
    from gapkd.methods.at import attention_transfer_loss

    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(2, 3, 4, 4)), rng.normal(size=(2, 5, 2, 2))
    expected = np.mean([(_at_map(_block_mean(s[i], 2)) - _at_map(t[i])) ** 2 for i in range(2)])
    got = attention_transfer_loss(torch.tensor(s), torch.tensor(t), 2.0)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # same sizes, p = 3 (absolute values)
    t2 = rng.normal(size=(2, 5, 4, 4))
    expected = np.mean([(_at_map(s[i], 3) - _at_map(t2[i], 3)) ** 2 for i in range(2)])
    assert attention_transfer_loss(torch.tensor(s), torch.tensor(t2), 3.0).item() == pytest.approx(expected, rel=1e-6)


def _models(student="resnet8", teacher="resnet14", classes=10):
    torch.manual_seed(0)
    return create_model(student, num_classes=classes), create_model(teacher, num_classes=classes)


def _batch(n=4, size=16):
    torch.manual_seed(1)
    return torch.randn(n, 3, size, size), torch.arange(n) % 4


def _features(model, x):
    with torch.no_grad():
        return model.eval().forward_features(x)


def test_at_method_sums_stages_times_beta_plus_ce():
    student, teacher = _models()
    method = METHODS.get("at")(student, teacher, task=TASK16, beta=1000.0)
    x, y = _batch()
    method.eval()  # compare with features from the same (eval-mode) student
    out = method(x, y, _step())
    fs, ft = _features(student, x), _features(teacher, x)
    expected = sum(
        np.mean([(_at_map(a[i]) - _at_map(b[i])) ** 2 for i in range(len(x))])
        for a, b in zip([f.numpy() for f in fs.stages], [f.numpy() for f in ft.stages])
    )
    assert out.losses["at"].item() == pytest.approx(1000.0 * expected, rel=1e-4)
    assert out.losses["ce"].item() == pytest.approx(ce(fs.logits.numpy(), y.numpy()), rel=1e-5)


def test_fitnet_regressor_follows_the_hint_sizes():
    from gapkd.methods.fitnet import hint_regressor

    def conv(s, t):
        return hint_regressor(s, t)[0]

    same = conv((16, 8, 8), (64, 8, 8))
    assert isinstance(same, torch.nn.Conv2d) and same.kernel_size == (1, 1) and same.out_channels == 64
    down = conv((16, 8, 8), (32, 4, 4))
    assert down.stride == (2, 2) and down.kernel_size == (3, 3)
    up = conv((16, 4, 4), (32, 8, 8))
    assert isinstance(up, torch.nn.ConvTranspose2d)
    valid = conv((16, 7, 7), (32, 5, 5))
    assert valid.kernel_size == (3, 3)
    for s, t in [((16, 8, 8), (32, 4, 4)), ((16, 4, 4), (32, 8, 8)), ((16, 7, 7), (32, 5, 5))]:
        assert hint_regressor(s, t)(torch.zeros(2, *s)).shape == (2, *t)
    with pytest.raises(ConfigError, match="hint_stage"):
        hint_regressor((16, 3, 3), (32, 5, 5))


def test_fitnet_loss_is_ce_plus_beta_mse_of_the_regressed_hint():
    student, teacher = _models("resnet8", "resnet8x4")
    method = METHODS.get("fitnet")(student, teacher, task=TASK16, beta=100.0, hint_stage=1)
    assert method.regressor[0].in_channels == 32 and method.regressor[0].out_channels == 128
    x, y = _batch()
    method.eval()
    out = method(x, y, _step())
    fs, ft = _features(student, x), _features(teacher, x)
    with torch.no_grad():
        hint = method.regressor(fs.stages[1]).numpy()
    assert out.losses["hint"].item() == pytest.approx(100.0 * np.mean((hint - ft.stages[1].numpy()) ** 2), rel=1e-5)
    assert out.losses["ce"].item() == pytest.approx(ce(fs.logits.numpy(), y.numpy()), rel=1e-5)
    with pytest.raises(ConfigError, match="hint_stage=3"):
        METHODS.get("fitnet")(*_models(), task=TASK16, hint_stage=3)


def test_feature_kd_projects_every_stage_and_matches_the_spec_formula():
    student, teacher = _models("resnet8", "resnet8x4")
    method = METHODS.get("feature-kd")(student, teacher, task=TASK16, alpha=0.3, beta=0.5)
    for projection, (c_s, c_t) in zip(method.projections, [(16, 64), (32, 128), (64, 256)]):
        assert projection.bias is None and projection.weight.shape == (c_t, c_s, 1, 1)
        bound = math.sqrt(6 / (c_s + c_t))  # Xavier-uniform
        assert projection.weight.abs().max() <= bound and projection.weight.abs().max() > 0.5 * bound
    x, y = _batch()
    method.eval()
    out = method(x, y, _step())
    fs, ft = _features(student, x), _features(teacher, x)
    mse, cosine = [], []
    for projection, a, b in zip(method.projections, fs.stages, ft.stages):
        w = projection.weight.detach().numpy()[:, :, 0, 0]
        p = np.einsum("oc,nchw->nohw", w, a.numpy())
        t = b.numpy()
        mse.append(np.mean((p - t) ** 2))
        gp, gt = p.mean(axis=(2, 3)), t.mean(axis=(2, 3))
        cos = (gp * gt).sum(1) / (np.linalg.norm(gp, axis=1) * np.linalg.norm(gt, axis=1))
        cosine.append(np.mean(1 - cos))
    assert out.losses["feat_mse"].item() == pytest.approx(0.3 * np.mean(mse), rel=1e-4)
    assert out.losses["feat_cos"].item() == pytest.approx(0.3 * 0.5 * np.mean(cosine), rel=1e-4)
    assert out.losses["ce"].item() == pytest.approx(0.7 * ce(fs.logits.numpy(), y.numpy()), rel=1e-5)


def test_match_spatial_pools_only_the_larger_map():
    from gapkd.methods.losses import match_spatial

    a, b = torch.arange(32.0).view(1, 2, 4, 4), torch.ones(1, 3, 2, 2)
    pa, pb = match_spatial(a, b)
    assert pb is b and np.allclose(pa.numpy()[0], _block_mean(a.numpy()[0], 2))
    pb2, pa2 = match_spatial(b, a)
    assert pb2 is b and torch.equal(pa2, pa)


def test_feature_methods_refuse_unequal_stage_counts():
    student, teacher = _models()
    teacher.stage_channels = [16, 32]  # as if the teacher had two stages
    with pytest.raises(ConfigError, match="3 stages and the teacher 2"):
        METHODS.get("at")(student, teacher, task=TASK16)


def test_probe_changes_no_batchnorm_statistics():
    student, teacher = _models()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    METHODS.get("feature-kd")(student, teacher, task=TASK16)
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert student.training  # mode restored


# ---------------------------------------------------------------- what trains, what stays frozen
EXTRA_PARAMETERS = {"ctkd": "temperature.", "fitnet": "regressor.", "feature-kd": "projections."}


@pytest.mark.parametrize("name", NEW_METHODS)
def test_gradients_reach_exactly_the_trained_parameters_and_the_teacher_never_changes(name):
    student, teacher = _models("resnet8", "resnet8x4")
    method = METHODS.get(name)(student, teacher, task=TASK16)
    trained = {id(p) for g in method.param_groups() for p in g["params"]}
    named = dict(method.named_parameters())
    expected = {n for n in named if n.startswith("student.") or (name in EXTRA_PARAMETERS and n.startswith(EXTRA_PARAMETERS[name]))}
    assert {n for n, p in named.items() if id(p) in trained} == expected
    assert name not in EXTRA_PARAMETERS or any(n.startswith(EXTRA_PARAMETERS[name]) for n in expected)
    assert_three_steps_train_exactly(method, teacher, expected, *_batch(8))


def assert_three_steps_train_exactly(method, teacher, expected: set[str], x, y):
    """Three optimiser steps: the first step's gradients reach exactly the parameters named in ``expected``
    (and nothing else), and the teacher stays in eval mode with bit-identical weights and statistics."""
    from gapkd.config import OptimConfig

    named = dict(method.named_parameters())
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    optimizer = build_optimizer(method.param_groups(), OptimConfig(lr=0.05, weight_decay=5e-4))
    method.train()
    for step in range(3):
        out = method(x, y, StepInfo(epoch=step + 5, step=step, epochs=10, steps_per_epoch=1))
        optimizer.zero_grad()
        sum(out.losses.values()).backward()
        if step == 0:
            for n, p in named.items():
                if n in expected:
                    assert p.grad is not None and p.grad.abs().sum() > 0, n
                else:
                    assert p.grad is None, n
        optimizer.step()
    assert not teacher.training
    assert all(torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items())


# ---------------------------------------------------------------- end to end on digits
@pytest.fixture
def random_teacher(tmp_path, tiny_overrides):
    """A randomly initialised resnet14 saved as a gapkd checkpoint for digits (10 classes, 1 channel)."""
    torch.manual_seed(0)
    cfg = build_config(tiny_overrides, overrides=["student.name=resnet14"])
    payload = deployable_payload(CrossEntropy(create_model("resnet14", num_classes=10, in_channels=1)), cfg, 1, None)
    atomic_save(payload, tmp_path / "teacher.pt")
    return tmp_path / "teacher.pt"


LOSS_NAMES = {
    "dkd": {"ce", "tckd", "nckd"}, "dist": {"ce", "inter", "intra"}, "ctkd": {"ce", "kd"}, "logit-kd": {"ce", "kd"},
    "fitnet": {"ce", "hint"}, "at": {"ce", "at"}, "feature-kd": {"ce", "feat_mse", "feat_cos"},
}


@pytest.mark.parametrize("name", NEW_METHODS)
def test_end_to_end_on_digits_clips_and_trains_every_param_group(name, tiny_overrides, random_teacher, monkeypatch):
    import gapkd.engine.trainer as trainer

    clipped: list[set[int]] = []
    real_clip = torch.nn.utils.clip_grad_norm_

    def spy(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        clipped.append({id(p) for p in parameters})
        return real_clip(parameters, max_norm, *args, **kwargs)

    built = {}
    real_build = trainer.build_optimizer

    def keep(groups, cfg):
        built["groups"] = groups
        return real_build(groups, cfg)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    monkeypatch.setattr(trainer, "build_optimizer", keep)
    tiny_overrides["train"]["epochs"] = 1
    cfg = build_config(tiny_overrides, overrides=[
        f"method.name={name}", "teacher.name=resnet14", f"teacher.checkpoint={random_teacher}", "train.grad_clip=1.0",
    ])
    summary = run(cfg, echo=False)
    assert summary["method"] == name and summary["epochs"] == 1 and 0 <= summary["test_acc_at_best_val"] <= 100
    record = json.loads((run_dir_for(cfg) / "metrics.jsonl").read_text().splitlines()[0])
    assert {k[len("loss/"):] for k in record if k.startswith("loss/")} == LOSS_NAMES[name]
    assert all(math.isfinite(record[f"loss/{k}"]) for k in LOSS_NAMES[name])
    every_group_param = {id(p) for g in built["groups"] for p in g["params"]}
    # train.grad_clip_mode=per_group (the default since main's c2102bb) clips each group on its own: together, every one
    assert clipped and set().union(*clipped) == every_group_param and all(ids <= every_group_param for ids in clipped)
    if name in EXTRA_PARAMETERS:  # the extra modules are in what is trained and clipped, and are saved for resume
        state = torch.load(run_dir_for(cfg) / "checkpoints" / "state.pt", weights_only=True)["model"]
        assert any(k.startswith(EXTRA_PARAMETERS[name]) for k in state)


def test_list_methods_verbose_shows_description_and_defaults(capsys):
    from gapkd.cli import main

    assert main(["list", "methods", "-v"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    for name in NEW_METHODS:
        cls = METHODS.get(name)
        assert cls.describe() and cls.describe() in lines[name]
        assert str(cls.hparam_defaults()) in lines[name]
