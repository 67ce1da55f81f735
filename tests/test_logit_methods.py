"""Logit standardisation, NKD, WTTM, SDD, MLKD and DGKD: every loss against an independent plain
formula (values and gradients) on random tensors, the edge cases the papers handle, the switch off
being bit-identical to kd / dkd / ctkd as they were, and short end-to-end runs on digits."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gapkd.api import run, run_dir_for
from gapkd.config import build_config, identity_payload
from gapkd.errors import ConfigError, GapkdError
from gapkd.methods import METHODS, StepInfo, TaskInfo
from gapkd.methods.dkd import dkd_terms
from gapkd.methods.losses import kd_kl, standardize_logits
from gapkd.methods.mlkd import batch_relation, class_relation, kept_fraction
from gapkd.methods.nkd import nkd_terms
from gapkd.methods.sdd import dkd_rows, kd_rows, region_logits, region_weights
from gapkd.methods.wttm import wttm_loss
from gapkd.models import create_model

STEP = StepInfo(epoch=0, step=0, epochs=1, steps_per_epoch=1)


def softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def kl_rows(p, q):
    """KL(p || q) of every row, from probabilities."""
    return (p * (np.log(p) - np.log(q))).sum(-1)


def grad_of(fn, *tensors):
    """Value and gradients of fn(*tensors) (fresh leaves in float64)."""
    leaves = [t.detach().double().clone().requires_grad_(True) for t in tensors]
    value = fn(*leaves)
    return value.detach(), torch.autograd.grad(value, leaves)


def random_logits(seed=0, n=6, c=7, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, c, generator=g) * scale).double(), (torch.randn(n, c, generator=g) * scale).double(), torch.randint(0, c, (n,), generator=g)


# ----------------------------------------------------------------------------- logit standardisation
def test_standardize_logits_is_the_z_score_with_the_unbiased_std_and_equal_logits_become_uniform():
    s, _, _ = random_logits()
    x = s.numpy()
    expected = (x - x.mean(1, keepdims=True)) / (1e-7 + x.std(1, ddof=1, keepdims=True))
    np.testing.assert_allclose(standardize_logits(s).double().numpy(), expected, rtol=1e-5, atol=1e-6)
    flat = torch.full((2, 5), 3.7)
    z = standardize_logits(flat)
    assert torch.equal(z, torch.zeros(2, 5))  # all-equal logits: a uniform softmax at any temperature, no NaN
    value, (grad,) = grad_of(lambda a: kd_kl(standardize_logits(a), standardize_logits(torch.randn(2, 5).double()), 2.0), flat)
    assert torch.isfinite(value) and torch.isfinite(grad).all()


@pytest.mark.parametrize("method", ["kd", "dkd", "ctkd"])
def test_logit_standardize_off_is_bit_identical_to_the_plain_losses(method):
    """With the switch off, the losses and gradients are exactly what the unchanged formulas give."""
    torch.manual_seed(0)
    student, teacher = create_model("resnet8", num_classes=10), create_model("resnet14", num_classes=10)
    distiller = METHODS.get(method)(student, teacher, temperature=3.0) if method != "ctkd" else METHODS.get(method)(student, teacher)
    assert distiller.hparams.logit_standardize is False
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    distiller.train()
    out = distiller(x, y, StepInfo(epoch=25, step=0, epochs=30, steps_per_epoch=1))
    logits, target = out.logits, teacher(x)
    if method == "kd":
        assert torch.equal(out.losses["kd"], 0.9 * kd_kl(logits, target, 3.0))
    elif method == "dkd":
        tckd, nckd = dkd_terms(logits, target, y, 3.0)
        assert torch.equal(out.losses["tckd"], 1.0 * 1.0 * tckd) and torch.equal(out.losses["nckd"], 1.0 * 8.0 * nckd)
    else:
        tau = distiller.temperature(distiller.reversal_strength(0))
        assert torch.equal(out.losses["kd"], 0.9 * kd_kl(logits, target, tau))


def test_logit_standardize_off_keeps_config_hashes_and_on_changes_them():
    args = ["student.name=resnet8", "teacher.name=resnet20", "teacher.checkpoint=t.pt", "method.name=kd"]
    off, on = build_config(overrides=args), build_config(overrides=[*args, "method.logit_standardize=true"])
    for which in ("run_hash", "study_key"):  # off: hashed as before the switch existed (runs keep their hashes and resume)
        assert identity_payload(off, which)["method"] == {"name": "kd", "temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9}
        assert identity_payload(on, which)["method"]["logit_standardize"] is True
    assert off.hparams_hash() != on.hparams_hash()


@pytest.mark.parametrize("method", ["kd", "ctkd"])
def test_logit_standardize_on_matches_kd_of_z_scores_and_ignores_logit_shift_and_scale(method):
    torch.manual_seed(1)
    student, teacher = create_model("resnet8", num_classes=10), create_model("resnet14", num_classes=10)
    distiller = METHODS.get(method)(student, teacher, logit_standardize=True)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    out = distiller(x, y, STEP)
    s, t = out.logits.detach().double().numpy(), teacher(x).detach().double().numpy()
    z = lambda a: (a - a.mean(1, keepdims=True)) / (1e-7 + a.std(1, ddof=1, keepdims=True))  # noqa: E731
    tau = float(distiller.temperature(0.0).detach()) if method == "ctkd" else 4.0  # CTKD: its learned temperature's start
    expected = 0.9 * kl_rows(softmax(z(t) / tau), softmax(z(s) / tau)).mean() * tau**2
    assert out.losses["kd"].item() == pytest.approx(expected, rel=1e-4)
    # the z-score removes each row's offset and scale: what standardisation lets the student ignore
    a, b = torch.randn(3, 10), torch.randn(3, 10)
    base = kd_kl(standardize_logits(a), standardize_logits(b), 2.0)
    moved = kd_kl(standardize_logits(5 * a + 3), standardize_logits(b), 2.0)
    assert moved.item() == pytest.approx(base.item(), rel=1e-4)


def test_dkd_with_logit_standardize_matches_dkd_terms_of_z_scores():
    torch.manual_seed(2)
    student, teacher = create_model("resnet8", num_classes=10), create_model("resnet14", num_classes=10)
    distiller = METHODS.get("dkd")(student, teacher, logit_standardize=True, temperature=2.0, warmup_epochs=0)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    out = distiller(x, y, STEP)
    tckd, nckd = dkd_terms(standardize_logits(out.logits), standardize_logits(teacher(x)), y, 2.0)
    assert out.losses["tckd"].item() == pytest.approx(tckd.item(), rel=1e-5)
    assert out.losses["nckd"].item() == pytest.approx(8.0 * nckd.item(), rel=1e-5)


# ----------------------------------------------------------------------------- NKD
def nkd_plain(s, t, y, tau):
    """Per-sample loops: -t_y log s_y and -tau^2 sum_{k != y} t~_k log s~_k, both batch means."""
    s, t = s.numpy(), t.numpy()
    target, other = 0.0, 0.0
    for si, ti, yi in zip(s, t, y.tolist()):
        target -= softmax(ti)[yi] * np.log(softmax(si)[yi])
        rest_s, rest_t = np.delete(si, yi), np.delete(ti, yi)
        other -= (softmax(rest_t / tau) * np.log(softmax(rest_s / tau))).sum() * tau**2
    return target / len(s), other / len(s)


def nkd_masked(s, t, y, tau):
    """The same in torch with boolean masks (the authors' layout), for gradients."""
    log_s = F.log_softmax(s, 1)[torch.arange(len(y)), y]
    t_y = F.softmax(t, 1)[torch.arange(len(y)), y].detach()
    keep = ~F.one_hot(y, s.shape[1]).bool()
    rest_s, rest_t = s[keep].view(len(y), -1), t[keep].view(len(y), -1)
    other = -(F.softmax(rest_t / tau, 1) * F.log_softmax(rest_s / tau, 1)).sum(1).mean() * tau**2
    return -(t_y * log_s).mean(), other


def test_nkd_terms_match_a_per_sample_formula_in_value_and_gradient():
    s, t, y = random_logits(3)
    target, other = nkd_terms(s, t, y, 3.0)
    expected = nkd_plain(s, t, y, 3.0)
    assert target.item() == pytest.approx(expected[0], rel=1e-5) and other.item() == pytest.approx(expected[1], rel=1e-5)
    _, (ours,) = grad_of(lambda a: sum(nkd_terms(a, t, y, 3.0)), s)
    _, (theirs,) = grad_of(lambda a: sum(nkd_masked(a, t, y, 3.0)), s)
    torch.testing.assert_close(ours, theirs)


def test_nkd_target_term_follows_the_teacher_even_where_it_is_wrong():
    """A teacher that puts little mass on the label (wrong there) gives the target term a small weight t_y:
    its gradient on the student's target logit is -t_y (1 - s_y) / N, and the non-target term does not touch it."""
    s = torch.zeros(2, 4, dtype=torch.float64)
    t = torch.tensor([[8.0, 0, 0, 0], [0, 0, 0, 8.0]], dtype=torch.float64)  # row 1: confident in class 3, label 0
    y = torch.tensor([0, 0])
    _, (grad,) = grad_of(lambda a: nkd_terms(a, t, y, 2.0)[0], s)
    t_y = F.softmax(t, 1)[:, 0]
    s_y = 0.25
    torch.testing.assert_close(grad[:, 0], -t_y * (1 - s_y) / 2)
    assert t_y[1] < 0.001 < 0.99 < t_y[0]
    _, (grad_other,) = grad_of(lambda a: nkd_terms(a, t, y, 2.0)[1], s)
    assert torch.equal(grad_other[:, 0], torch.zeros(2, dtype=torch.float64))


# ----------------------------------------------------------------------------- WTTM
def wttm_plain(s, t, gamma, weighted=True):
    """p_t ** gamma renormalised, KL to the student at temperature 1, weighted by the power sum."""
    powered = softmax(t.numpy()) ** gamma
    z = powered.sum(1)
    kl = kl_rows(powered / z[:, None], softmax(s.numpy()))
    return float(((z if weighted else 1) * kl).mean())


@pytest.mark.parametrize("weighted", [True, False])
def test_wttm_matches_the_power_transform_formula_in_value_and_gradient(weighted):
    s, t, _ = random_logits(4)
    assert wttm_loss(s, t, 0.2, weighted).item() == pytest.approx(wttm_plain(s, t, 0.2, weighted), rel=1e-5)
    _, (ours,) = grad_of(lambda a: wttm_loss(a, t, 0.2, weighted), s)

    def direct(a):
        q = F.softmax(t, 1) ** 0.2
        z = q.sum(1)
        kl = (q / z[:, None] * (torch.log(q / z[:, None]) - F.log_softmax(a, 1))).sum(1)
        return ((z if weighted else 1) * kl).mean()

    _, (theirs,) = grad_of(direct, s)
    torch.testing.assert_close(ours, theirs)


def test_wttm_weight_is_large_for_uncertain_teachers_and_gamma_one_is_plain_kl():
    c, gamma = 10, 0.25
    uniform, sure = torch.zeros(1, c), torch.tensor([[100.0] + [0.0] * (c - 1)])
    student = torch.randn(1, c)
    # Z = C^(1 - gamma) for a uniform teacher, ~1 for a one-hot one (and a teacher wrong on the label is no special case)
    assert wttm_loss(student, uniform, gamma).item() == pytest.approx(c ** (1 - gamma) * wttm_loss(student, uniform, gamma, False).item(), rel=1e-5)
    assert wttm_loss(student, sure, gamma).item() == pytest.approx(wttm_loss(student, sure, gamma, False).item(), rel=1e-4)
    s, t, _ = random_logits(5)
    assert wttm_loss(s, t, 1.0).item() == pytest.approx(kd_kl(s, t, 1.0).item(), rel=1e-6)  # Z = 1 at gamma 1


# ----------------------------------------------------------------------------- SDD
def test_region_logits_pool_cells_in_row_major_order_through_the_classifier():
    torch.manual_seed(0)
    fmap, head = torch.randn(2, 5, 8, 8), nn.Linear(5, 3)
    global_logits = head(fmap.mean((2, 3)))
    got = region_logits(fmap, global_logits, head, [1, 2, 4])
    assert got.shape == (2, 1 + 4 + 16, 3)
    expected = [global_logits]
    for k in (2, 4):
        step = 8 // k
        for i in range(k):
            for j in range(k):
                expected.append(head(fmap[:, :, i * step:(i + 1) * step, j * step:(j + 1) * step].mean((2, 3))))
    torch.testing.assert_close(got, torch.stack(expected, 1))


def test_region_weights_mark_complementary_regions():
    labels = torch.tensor([0, 1])
    # (N, R, C): sample 0 global right, locals right / wrong; sample 1 global wrong, locals wrong / right
    regions = torch.tensor([[[5.0, 0], [5, 0], [0, 5]], [[5.0, 0], [5, 0], [0, 5]]])
    assert region_weights(regions, labels, 2.0).tolist() == [[1, 1, 2], [1, 1, 2]]
    assert region_weights(regions, torch.tensor([1, 0]), 3.0).tolist() == [[1, 1, 3], [1, 1, 3]]


def test_sdd_rows_match_kd_and_dkd_row_by_row():
    s, t, y = random_logits(6)
    rows = kd_rows(s, t, 3.0)
    expected = kl_rows(softmax(t.numpy() / 3), softmax(s.numpy() / 3)) * 9
    np.testing.assert_allclose(rows.numpy(), expected, rtol=1e-6)
    tckd, nckd = dkd_rows(s, t, y, 3.0)
    for i in range(len(y)):  # DKD's batch-mean terms of a batch of one are that row's terms
        one = dkd_terms(s[i:i + 1], t[i:i + 1], y[i:i + 1], 3.0)
        assert tckd[i].item() == pytest.approx(one[0].item(), rel=1e-6, abs=1e-10)
        assert nckd[i].item() == pytest.approx(one[1].item(), rel=1e-6, abs=1e-10)


def small(name, num_classes=3):
    """A zoo model on 1-channel 32x32 inputs: its last stage's maps are 8x8, as on CIFAR."""
    return create_model(name, num_classes=num_classes, in_channels=1)


@pytest.mark.parametrize("base", ["kd", "dkd"])
def test_sdd_loss_is_the_weighted_mean_of_region_losses(base):
    torch.manual_seed(3)
    student, teacher = small("resnet8"), small("resnet14")
    sdd = METHODS.get("sdd")(student, teacher, base=base, scales=[1, 2, 4], temperature=2.0, ce_weight=0.3, kd_weight=0.7, beta=3.0)
    x, y = torch.randn(5, 1, 32, 32), torch.randint(0, 3, (5,))
    out = sdd(x, y, STEP)
    with torch.no_grad():
        f_t = teacher.forward_features(x).stages[-1]
    f_s = student.forward_features(x).stages[-1]
    expected, count = 0.0, 0
    for k in (1, 2, 4):
        step = 8 // k
        for i in range(k):
            for j in range(k):
                s = student.fc(f_s[:, :, i * step:(i + 1) * step, j * step:(j + 1) * step].mean((2, 3)))
                t = teacher.fc(f_t[:, :, i * step:(i + 1) * step, j * step:(j + 1) * step].mean((2, 3)))
                if k == 1:
                    global_right = t.argmax(1) == y
                weight = torch.where((t.argmax(1) == y) != global_right, 2.0, 1.0)
                if base == "kd":
                    per = kd_rows(s, t, 2.0)
                else:
                    per = torch.stack([1.0 * a + 3.0 * b for a, b in zip(*(torch.stack(v) for v in zip(
                        *[dkd_terms(s[n:n + 1], t[n:n + 1], y[n:n + 1], 2.0) for n in range(5)])))])
                expected = expected + (weight * per).sum()
                count += 5
    assert out.losses["sdd"].item() == pytest.approx(0.7 * expected.item() / count, rel=1e-5)
    assert out.losses["ce"].item() == pytest.approx(0.3 * F.cross_entropy(student.fc(f_s.mean((2, 3))), y).item(), rel=1e-5)
    out.losses["sdd"].backward()
    assert student.fc.weight.grad is not None and all(p.grad is None for p in teacher.parameters())


def test_sdd_scales_must_start_with_the_global_one():
    with pytest.raises(ConfigError, match="start with 1"):
        build_config(overrides=["student.name=resnet8", "teacher.name=resnet20", "teacher.checkpoint=t.pt", "method.name=sdd",
                                "method.scales=[2, 4]"])


# ----------------------------------------------------------------------------- MLKD
def test_mlkd_relations_and_masks_match_loops():
    s, t, _ = random_logits(7, n=5, c=4)
    p_s, p_t = softmax(s.numpy() / 2), softmax(t.numpy() / 2)
    batch = sum((p_t[i] @ p_t[j] - p_s[i] @ p_s[j]) ** 2 for i in range(5) for j in range(5)) / 5
    klass = sum((p_t[:, a] @ p_t[:, b] - p_s[:, a] @ p_s[:, b]) ** 2 for a in range(4) for b in range(4)) / 4
    assert batch_relation(s, t, 2.0).item() == pytest.approx(batch, rel=1e-6)
    assert class_relation(s, t, 2.0).item() == pytest.approx(klass, rel=1e-6)
    values = torch.tensor([0.3, 0.9, 0.1, 0.5, 0.7, 0.2])
    assert kept_fraction(values).item() == pytest.approx(np.mean(values.numpy() <= np.percentile(values.numpy(), 50)))


def test_mlkd_losses_match_the_official_formulas_term_by_term():
    torch.manual_seed(4)
    student, teacher = small("resnet8", 5), small("resnet14", 5)
    mlkd = METHODS.get("mlkd")(student, teacher)
    weak, strong, y = torch.randn(6, 1, 32, 32), torch.randn(6, 1, 32, 32), torch.randint(0, 5, (6,))
    out = mlkd(weak, y, StepInfo(0, 0, 1, 1, strong_images=strong))
    sw, ss, tw, ts = student(weak), student(strong), teacher(weak), teacher(strong)
    conf = F.softmax(tw, 1).max(1).values
    share = float((conf <= np.percentile(conf.detach().numpy(), 50)).float().mean())
    class_conf = F.softmax(tw, 1).sum(0)
    class_share = float((class_conf <= np.percentile(class_conf.detach().numpy(), 50)).float().mean())
    temps = [4.0, 3.0, 5.0, 2.0, 6.0]
    kd = sum(share * kd_kl(sw, tw, T) + kd_kl(ss, ts, T) for T in temps)
    assert out.losses["ce"].item() == pytest.approx(0.1 * (F.cross_entropy(sw, y) + F.cross_entropy(ss, y)).item(), rel=1e-5)
    assert out.losses["kd"].item() == pytest.approx(0.9 * kd.item(), rel=1e-5)
    assert out.losses["cc"].item() == pytest.approx(0.9 * class_share * sum(class_relation(sw, tw, T) for T in temps).item(), rel=1e-5)
    assert out.losses["bc"].item() == pytest.approx(0.9 * share * sum(batch_relation(sw, tw, T) for T in temps).item(), rel=1e-5)
    assert torch.equal(out.logits, sw)


def test_mlkd_needs_the_strong_view_with_a_clear_error():
    with pytest.raises(ConfigError, match="data.augment.strong=true"):
        build_config(overrides=["student.name=resnet8", "teacher.name=resnet20", "teacher.checkpoint=t.pt", "method.name=mlkd"])
    mlkd = METHODS.get("mlkd")(small("resnet8"), small("resnet8"))
    with pytest.raises(GapkdError, match="data.augment.strong=true"):
        mlkd(torch.randn(2, 1, 32, 32), torch.tensor([0, 1]), STEP)


# ----------------------------------------------------------------------------- DGKD
def test_dgkd_sums_kd_from_the_kept_guides_and_saves_only_the_student(tmp_path, tiny_overrides):
    from gapkd.engine.checkpoint import atomic_save
    from gapkd.engine.trainer import deployable_payload
    from gapkd.methods.ce import CrossEntropy

    torch.manual_seed(5)
    guides = []
    for index, name in enumerate(["resnet14", "resnet8"]):
        cfg = build_config(tiny_overrides, overrides=[f"student.name={name}"])
        atomic_save(deployable_payload(CrossEntropy(create_model(name, num_classes=10, in_channels=1)), cfg, 1, None), tmp_path / f"{index}.pt")
        guides.append({"name": name, "checkpoint": str(tmp_path / f"{index}.pt")})
    task = TaskInfo(num_classes=10, in_channels=1, image_size=8, num_train=10)
    teacher = create_model("resnet20", num_classes=10, in_channels=1)
    dgkd = METHODS.get("dgkd")(create_model("resnet8", num_classes=10, in_channels=1), teacher, task=task, guides=guides, temperature=3.0)
    assert len(dgkd.guides) == 2 and not any(p.requires_grad for p in dgkd.guides.parameters())
    assert set(dgkd.trainable_state_dict()) == {f"student.{k}" for k in dgkd.student.state_dict()}
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    dgkd.kept_guides = lambda: torch.tensor([True, False, True])
    dgkd.eval()  # batch norm in eval: the student's logits below are the ones the step saw
    out = dgkd(x, y, STEP)
    expected = kd_kl(out.logits, teacher(x), 3.0) + kd_kl(out.logits, dgkd.guides[1](x), 3.0)
    assert out.losses["kd"].item() == pytest.approx(0.9 * expected.item(), rel=1e-5)


def test_dgkd_drops_guides_at_the_configured_rate_but_keeps_at_least_one():
    teacher = create_model("resnet8", num_classes=10, in_channels=1)
    dgkd = METHODS.get("dgkd")(create_model("resnet8", num_classes=10, in_channels=1), teacher, drop_probability=0.9)
    dgkd.guides = nn.ModuleList([create_model("resnet8", num_classes=10, in_channels=1) for _ in range(3)])
    torch.manual_seed(0)
    draws = torch.stack([dgkd.kept_guides() for _ in range(2000)])
    assert draws.any(dim=1).all()  # never an empty set
    assert draws.float().mean().item() == pytest.approx(0.1 + 0.9**4 / 4, abs=0.02)  # 10% kept, plus the forced one
    dgkd.hparams.drop_probability = 0.0
    assert dgkd.kept_guides().all()


# ----------------------------------------------------------------------------- end to end on digits
@pytest.mark.parametrize("method, extra, losses", [
    ("kd", ["method.logit_standardize=true", "method.temperature=2", "method.kd_weight=9"], {"ce", "kd"}),
    ("nkd", [], {"ce", "target", "non_target"}),
    ("wttm", ["method.kd_weight=1"], {"ce", "wttm"}),  # the CIFAR-100 weight 4 outweighs CE for a 1-epoch teacher's flat targets
    ("sdd", ["method.base=dkd", "method.scales=[1, 2]", "method.ce_weight=1", "method.kd_weight=1"], {"ce", "sdd"}),
    ("mlkd", ["data.augment.strong=true"], {"ce", "kd", "cc", "bc"}),
])
def test_end_to_end_on_digits(method, extra, losses, tiny_overrides, digits_teacher):
    cfg = build_config(tiny_overrides, overrides=[f"name={method}", f"method.name={method}", "teacher.name=resnet14",
                                                  f"teacher.checkpoint={digits_teacher}", "train.epochs=1", *extra])
    summary = run(cfg, echo=False)
    record = json.loads((run_dir_for(cfg) / "metrics.jsonl").read_text().splitlines()[0])
    assert {k[5:] for k in record if k.startswith("loss/")} == losses
    assert all(math.isfinite(record[f"loss/{name}"]) for name in losses)
    assert summary["best_val_acc"] > 10  # above chance (10 classes) after one epoch


def test_logit_recipes_are_what_generate_logit_writes(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    configs = Path(__file__).resolve().parents[1] / "configs"
    subprocess.run([sys.executable, str(configs / "generate_logit.py"), "--out", str(tmp_path)], check=True, capture_output=True)
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.yaml"))
    assert len(written) == 130 and all((configs / p).read_text() == (tmp_path / p).read_text() for p in written)
    mlkd = build_config(path=configs / "cifar100" / "resnet32x4-shufflev1" / "mlkd.yaml")
    assert mlkd.data.augment.strong and (mlkd.train.epochs, mlkd.optim.lr) == (480, 0.01)
    dkd_ls = build_config(path=configs / "cifar100" / "resnet56-resnet20" / "dkd-ls.yaml").method.hparams
    assert (dkd_ls["temperature"], dkd_ls["alpha"], dkd_ls["beta"], dkd_ls["logit_standardize"]) == (3.0, 18.0, 36.0, True)


@pytest.mark.parametrize("method, extra", [("mlkd", ["data.augment.strong=true"]), ("dgkd", ["method.drop_probability=0.5", "GUIDE"])])
def test_resume_is_bit_identical_with_the_strong_view_and_random_guide_dropping(method, extra, tiny_overrides, digits_teacher,
                                                                                killed_then_resumed):
    """The strong view's draws and DGKD's guide draws are seeded per epoch: a run killed after epoch 1
    and started again ends with the weights of an uninterrupted run."""
    from gapkd.engine.checkpoint import safe_load

    tiny_overrides["data"]["train_subset"] = 256
    guide = f"method.guides=[{{name: resnet14, checkpoint: {digits_teacher}}}]"  # a second guide: the drops matter
    extra = [guide if e == "GUIDE" else e for e in extra]
    common = [f"method.name={method}", "teacher.name=resnet14", f"teacher.checkpoint={digits_teacher}", "train.epochs=2", *extra]
    straight = build_config(tiny_overrides, overrides=["name=straight", *common])
    run(straight, echo=False)
    interrupted = build_config(tiny_overrides, overrides=["name=interrupted", *common])
    killed_then_resumed(interrupted)
    a, b = (safe_load(run_dir_for(c) / "checkpoints" / "last.pt")["state_dict"] for c in (straight, interrupted))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
