"""The KD-loss decomposition, agreement / calibration, the aid-adapt method, the AID pipeline,
per-epoch diagnostics and `gapkd analyze`."""
import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from gapkd.analysis import (
    class_similarity,
    compare_logits,
    decompose,
    dkd_terms,
    expected_calibration_error,
    inner_class,
    kd_loss,
    spread,
    top1_agreement,
)
from gapkd.methods.losses import kd_kl

# --- decomposition: hand computation ------------------------------------------------------------

def _softmax(row, tau):
    e = np.exp(row / tau - (row / tau).max())
    return e / e.sum()


def _kl(p, q):
    return float(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0))


def _by_hand(teacher, student, labels, tau):
    """L_KD, L_class and L_inner straight from the spec's definitions, with Python loops."""
    p = [_softmax(r, tau) for r in teacher]
    q = [_softmax(r, tau) for r in student]
    n = len(labels)
    kd = sum(_kl(a, b) for a, b in zip(p, q)) / n
    class_term = 0.0
    for c in sorted(set(labels)):
        members = [i for i in range(n) if labels[i] == c]
        p_bar = np.mean([p[i] for i in members], axis=0)
        q_bar = np.mean([q[i] for i in members], axis=0)
        class_term += len(members) * _kl(p_bar, q_bar)
    class_term /= n
    return kd, class_term, kd - class_term


def test_terms_match_a_hand_computation():
    teacher = np.array([[2.0, 0.5, -1.0], [1.5, 1.0, 0.0], [-0.5, 2.5, 0.3], [0.2, 0.1, 3.0], [1.0, -2.0, 0.5]])
    student = np.array([[1.0, 0.0, 0.0], [0.3, 0.8, -0.2], [0.0, 1.0, 1.0], [0.5, 0.5, 0.6], [0.1, -0.4, 0.9]])
    labels = [0, 0, 1, 2, 0]
    tau = 2.0
    kd, class_term, inner = _by_hand(teacher, student, labels, tau)
    t, s, y = torch.tensor(teacher), torch.tensor(student), torch.tensor(labels)
    assert kd_loss(t, s, tau).item() == pytest.approx(kd, rel=1e-12)
    assert class_similarity(t, s, y, tau).item() == pytest.approx(class_term, rel=1e-12)
    assert inner_class(t, s, y, tau).item() == pytest.approx(inner, rel=1e-10)
    assert kd_loss(t, s, tau).item() * tau**2 == pytest.approx(kd_kl(s, t, tau).item(), rel=1e-6)  # kd_kl runs in float32
    p = [_softmax(r, tau) for r in teacher]
    p_bar0 = np.mean([p[0], p[1], p[4]], axis=0)
    spread_t = (_kl(p[0], p_bar0) + _kl(p[1], p_bar0) + _kl(p[4], p_bar0)) / 5  # classes 1 and 2 have one sample: 0
    assert spread(t, y, tau).item() == pytest.approx(spread_t, rel=1e-12)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_parts_add_up_to_kd_and_are_non_negative(seed, dtype):
    generator = torch.Generator().manual_seed(seed)
    n, classes = 40, 7
    teacher = (torch.randn(n, classes, generator=generator) * 4).to(dtype)
    student = torch.randn(n, classes, generator=generator).to(dtype)
    labels = torch.randint(0, classes - 1, (n,), generator=generator)  # the last class absent from the batch
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for tau in (1.0, 4.0):
        kd, class_term, inner = kd_loss(teacher, student, tau), class_similarity(teacher, student, labels, tau), inner_class(teacher, student, labels, tau)
        assert kd.item() == pytest.approx((class_term + inner).item(), abs=tol)
        assert class_term.item() >= 0 and inner.item() >= -tol and kd.item() > 0
        tckd, nckd, weight = dkd_terms(teacher, student, labels, tau)
        per_sample_kd = (F.softmax(teacher / tau, 1) * (F.log_softmax(teacher / tau, 1) - F.log_softmax(student / tau, 1))).sum(1)
        torch.testing.assert_close(tckd + weight * nckd, per_sample_kd, atol=tol, rtol=0)
        assert (tckd >= -tol).all() and (nckd >= -tol).all()
        torch.testing.assert_close(weight, 1 - F.softmax(teacher / tau, 1).gather(1, labels[:, None]).squeeze(1), atol=tol, rtol=0)


def test_each_class_term_is_non_negative():
    # joint convexity holds class by class: the inner term of every single class is >= 0
    generator = torch.Generator().manual_seed(7)
    teacher, student = torch.randn(30, 5, generator=generator, dtype=torch.float64) * 3, torch.randn(30, 5, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 5, (30,), generator=generator)
    for c in labels.unique():
        rows = labels == c
        assert inner_class(teacher[rows], student[rows], labels[rows], 2.0).item() >= -1e-14


def test_closed_form_one_class_in_the_logits():
    t, s, y = torch.randn(6, 1, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64), torch.zeros(6, dtype=torch.long)
    terms = decompose(t, s, y, 4.0).as_dict()
    assert all(v == 0 for v in terms.values()), terms


def test_closed_form_one_class_in_the_batch():
    # every sample of class 2: L_class = KL(p_bar || q_bar) of the whole batch
    generator = torch.Generator().manual_seed(1)
    t, s = torch.randn(8, 4, generator=generator, dtype=torch.float64), torch.randn(8, 4, generator=generator, dtype=torch.float64)
    y = torch.full((8,), 2)
    p_bar, q_bar = F.softmax(t / 3, 1).mean(0), F.softmax(s / 3, 1).mean(0)
    expected = float((p_bar * (p_bar / q_bar).log()).sum())
    assert class_similarity(t, s, y, 3.0).item() == pytest.approx(expected, rel=1e-12)


def test_closed_form_one_sample_per_class_or_constant_within_class():
    generator = torch.Generator().manual_seed(2)
    t, s = torch.randn(5, 5, generator=generator, dtype=torch.float64), torch.randn(5, 5, generator=generator, dtype=torch.float64)
    y = torch.arange(5)
    d = decompose(t, s, y, 4.0)
    assert d.inner == pytest.approx(0, abs=1e-15) and d.class_ == pytest.approx(d.kd, rel=1e-12)
    assert d.spread_teacher == pytest.approx(0, abs=1e-15) and d.spread_student == pytest.approx(0, abs=1e-15)
    # several samples per class, but every model predicts the same within a class: nothing inner-class
    y2 = torch.tensor([0, 0, 1, 1, 1, 3])
    d2 = decompose(t[y2], s[y2], y2, 4.0)
    assert d2.inner == pytest.approx(0, abs=1e-15) and d2.class_ == pytest.approx(d2.kd, rel=1e-12)


def test_closed_form_identical_teacher_and_student():
    generator = torch.Generator().manual_seed(3)
    x, y = torch.randn(12, 6, generator=generator, dtype=torch.float64) * 2, torch.randint(0, 6, (12,), generator=generator)
    d = decompose(x, x.clone(), y, 4.0)
    for term in (d.kd, d.class_, d.inner, d.tckd, d.nckd, d.nckd_weighted):
        assert term == pytest.approx(0, abs=1e-15)
    assert d.spread_teacher == d.spread_student > 0


def test_closed_form_one_hot_teacher():
    # p_i = e_yi: L_KD is the student's cross-entropy at tau, L_class = (1/n) sum_c n_c (-log q_bar_c[c]),
    # D_T = 0, and DKD's whole loss is TCKD (the non-target mass of the teacher is 0)
    generator = torch.Generator().manual_seed(4)
    y = torch.tensor([0, 0, 1, 2, 2, 2, 3])
    teacher = 1e4 * F.one_hot(y, 4).double()
    student = torch.randn(7, 4, generator=generator, dtype=torch.float64)
    tau = 2.0
    d = decompose(teacher, student, y, tau)
    assert d.kd == pytest.approx(F.cross_entropy(student / tau, y).item(), rel=1e-12)
    q = F.softmax(student / tau, 1)
    expected_class = sum(-(y == c).sum().item() * math.log(q[y == c].mean(0)[c].item()) for c in range(4)) / 7
    assert d.class_ == pytest.approx(expected_class, rel=1e-12)
    assert d.spread_teacher == 0 and d.tckd == pytest.approx(d.kd, rel=1e-12) and d.nckd_weighted == 0


# --- agreement and calibration ------------------------------------------------------------------

def test_top1_agreement_on_a_hand_made_case():
    a = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    b = torch.tensor([[2.0, 0.0, 0.0], [0.0, 5.0, 1.0], [2.0, 0.0, 1.0], [9.0, 0.0, 0.0]])
    assert top1_agreement(a, b) == pytest.approx(75.0)


def test_expected_calibration_error_on_hand_made_cases():
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.38, 0.62], [0.64, 0.36]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 1])
    # bin (13/15, 14/15]: confidences .9, .9, accuracy .5 -> 2/4 * .4; bin (9/15, 10/15]: .62, .64, accuracy .5 -> 2/4 * .13
    assert expected_calibration_error(probs.log(), labels) == pytest.approx(100 * (0.5 * 0.4 + 0.5 * 0.13), rel=1e-9)
    calibrated = torch.tensor([[0.7, 0.3]] * 10, dtype=torch.float64)
    assert expected_calibration_error(calibrated.log(), torch.tensor([0] * 7 + [1] * 3)) == pytest.approx(0, abs=1e-9)
    # with 2 bins the two bins split at 0.5: .9 and .9 vs ... all four confidences are > .5 -> one bin
    mean_conf, acc = (0.9 + 0.9 + 0.62 + 0.64) / 4, 0.5
    assert expected_calibration_error(probs.log(), labels, bins=2) == pytest.approx(100 * abs(acc - mean_conf), rel=1e-9)


# --- the aid-adapt method -------------------------------------------------------------------------

def _models(seed=0):
    from gapkd.models import create_model

    torch.manual_seed(seed)
    teacher = create_model("resnet14", num_classes=5, in_channels=1)
    reference = create_model("resnet8", num_classes=5, in_channels=1)
    return teacher, reference


def _adapt(**hyper):
    from gapkd.methods import METHODS

    teacher, reference = _models()
    return METHODS.get("aid-adapt")(copy.deepcopy(teacher), teacher, reference=reference, **hyper)


def test_aid_adapt_trains_only_the_adapted_teacher():
    from gapkd.methods import StepInfo

    method = _adapt(beta=1.0, gamma=1.0)
    frozen = {name: {k: v.clone() for k, v in getattr(method, name).state_dict().items()} for name in ("teacher", "reference")}
    adapted_before = {k: v.clone() for k, v in method.student.state_dict().items()}
    trained = [p for g in method.param_groups() for p in g["params"]]
    assert {id(p) for p in trained} == {id(p) for p in method.student.parameters()}
    optimizer = torch.optim.SGD(trained, lr=0.1, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    method.train()
    for step in range(3):
        images, labels = torch.randn(8, 1, 8, 8, generator=generator), torch.randint(0, 5, (8,), generator=generator)
        out = method(images, labels, StepInfo(0, step, 1, 3))
        assert set(out.losses) == {"ce", "inner", "class"}
        optimizer.zero_grad()
        sum(out.losses.values()).backward()
        if step == 0:
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.student.parameters() if p.dim() > 1)
            assert all(p.grad is None for p in (*method.teacher.parameters(), *method.reference.parameters()))
        optimizer.step()
    for name, state in frozen.items():
        assert all(torch.equal(state[k], v) for k, v in getattr(method, name).state_dict().items()), name
    assert not all(torch.equal(adapted_before[k], v) for k, v in method.student.state_dict().items())
    assert not method.teacher.training and not method.reference.training and method.student.training
    running = {"running_teacher_sums", "running_teacher_counts", "running_reference_sums", "running_reference_counts"}
    assert all(k.startswith("student.") or k in running for k in method.trainable_state_dict())  # running sums resume
    assert running <= set(method.trainable_state_dict()) and method.running_teacher_counts.sum().item() == pytest.approx(8 * (1 + 0.99 + 0.99**2))  # decayed per step


@pytest.mark.parametrize("scaling,means", [(False, "batch"), (True, "batch"), (True, "running")])
def test_aid_loss_matches_an_independent_computation(scaling, means):
    from gapkd.methods import StepInfo

    tau, beta, gamma, ce_weight = 3.0, 0.7, 1.3, 0.5
    method = _adapt(temperature=tau, beta=beta, gamma=gamma, ce_weight=ce_weight, temperature_scaling=scaling, class_means=means)
    with torch.no_grad():  # the adapted teacher starts from T0: move it away so the class term is not 0
        for p in method.student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    method.eval()  # batch-norm in eval mode: the three models' logits can be recomputed outside the method
    generator = torch.Generator().manual_seed(1)
    images, labels = torch.randn(6, 1, 8, 8, generator=generator), torch.tensor([0, 0, 1, 1, 1, 3])
    out = method(images, labels, StepInfo(0, 0, 1, 1))
    with torch.no_grad():
        adapted, original, reference = (m(images).double().numpy() for m in (method.student, method.teacher, method.reference))
    y = labels.tolist()
    ce = -np.mean([math.log(_softmax(row, 1.0)[c]) for row, c in zip(adapted, y)])
    _, _, inner = _by_hand(adapted, reference, y, tau)
    _, class_to_original, _ = _by_hand(original, adapted, y, tau)
    scale = tau**2 if scaling else 1.0
    assert out.losses["ce"].item() == pytest.approx(ce_weight * ce, rel=1e-5)
    assert out.losses["inner"].item() == pytest.approx(beta * scale * inner, rel=1e-4)
    assert out.losses["class"].item() == pytest.approx(gamma * scale * class_to_original, rel=1e-4)
    assert inner > 0 and class_to_original > 0


def _inner_with_means(p_rows, q_rows, labels, p_bar, q_bar):
    """(1/n) sum_i [KL(p_i || q_i) - sum_k p_ik log(p_bar_yi,k / q_bar_yi,k)] with loops, for given class means."""
    total = 0.0
    for p, q, c in zip(p_rows, q_rows, labels):
        total += _kl(p, q) - sum(pk * math.log(a / b) for pk, a, b in zip(p, p_bar[c], q_bar[c]))
    return total / len(labels)


def test_running_class_means_match_a_hand_computation_over_two_batches():
    """Batch 2's L_inner uses the means of decay * (batch 1's sums) + batch 2's sums, for both models; a class
    alone in batch 2 (class 3) still counts, where batch means give it exactly 0."""
    from gapkd.methods import StepInfo

    tau, decay = 0.5, 0.6  # a low tau: sharp, far-apart distributions, so float32 rounding stays small next to the terms
    method = _adapt(temperature=tau, class_means="running", running_decay=decay, beta=1.0, temperature_scaling=False)
    method.eval()  # fixed batch-norm statistics, so the logits can be recomputed outside
    method.training = True  # but the running sums update, as in training
    generator = torch.Generator().manual_seed(3)
    batches = [(torch.randn(7, 1, 8, 8, generator=generator), torch.tensor([0, 0, 1, 3, 3, 1, 0])),
               (torch.randn(5, 1, 8, 8, generator=generator), torch.tensor([0, 1, 1, 3, 0]))]
    sums = {"p": np.zeros((5, 5)), "q": np.zeros((5, 5))}
    counts = np.zeros(5)
    for step, (images, labels) in enumerate(batches):
        out = method(images, labels, StepInfo(0, step, 1, 2))
        with torch.no_grad():
            p_rows = [_softmax(r, tau) for r in method.student(images).double().numpy()]
            q_rows = [_softmax(r, tau) for r in method.reference(images).double().numpy()]
        y = labels.tolist()
        counts = decay * counts + np.bincount(y, minlength=5)
        for key, rows in (("p", p_rows), ("q", q_rows)):
            sums[key] = decay * sums[key]
            for row, c in zip(rows, y):
                sums[key][c] += row
        means = {key: sums[key] / np.maximum(counts, 1e-12)[:, None] for key in sums}
        expected = _inner_with_means(p_rows, q_rows, y, means["p"], means["q"])
        assert out.losses["inner"].item() == pytest.approx(expected, rel=1e-4)
        if step == 0:  # the first step's means are the batch's: the decomposition's L_inner itself
            _, _, batch_inner = _by_hand(method.student(images).detach().double().numpy(),
                                         method.reference(images).double().numpy(), y, tau)
            assert out.losses["inner"].item() == pytest.approx(batch_inner, rel=1e-4)
    np.testing.assert_allclose(method.running_teacher_counts.numpy(), counts, rtol=1e-6)
    # class 3 is alone in batch 2: with batch means its sample adds 0 (its mean is itself), with running means it does not
    images, labels = batches[1]
    alone = labels == 3
    p_rows = [_softmax(r, tau) for r in method.student(images[alone]).detach().double().numpy()]
    q_rows = [_softmax(r, tau) for r in method.reference(images[alone]).double().numpy()]
    assert _inner_with_means(p_rows, q_rows, [3], means["p"], means["q"]) > 1e-4


def test_running_means_without_memory_equal_batch_means_in_value_and_gradient():
    """running_decay=0 keeps only the current batch; the gradient through exact class means is 0, so holding
    them constant (as the running mode does) changes nothing."""
    from gapkd.methods import StepInfo

    generator = torch.Generator().manual_seed(4)
    images, labels = torch.randn(9, 1, 8, 8, generator=generator), torch.tensor([0, 0, 1, 2, 2, 2, 4, 1, 0])
    grads = {}
    for means in ("batch", "running"):
        method = _adapt(class_means=means, running_decay=0.0, temperature=4.0)
        method.train()
        out = method(images, labels, StepInfo(0, 0, 1, 1))
        grads[means] = (out.losses["inner"].item(), torch.autograd.grad(out.losses["inner"], list(method.student.parameters())))
    assert grads["running"][0] == pytest.approx(grads["batch"][0], rel=1e-4) and grads["batch"][0] > 0
    for a, b in zip(grads["running"][1], grads["batch"][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("key,value,message", [
    ("class_means", "ema", "class_means"), ("running_decay", 1.0, "running_decay"), ("running_decay", -0.1, "running_decay"),
])
def test_bad_aid_adapt_values_fail_with_the_key(key, value, message):
    from gapkd.config import validate_hparams
    from gapkd.errors import ConfigError
    from gapkd.methods import METHODS

    with pytest.raises(ConfigError, match=message):
        validate_hparams(METHODS.get("aid-adapt"), {key: value})


def test_aid_adapt_without_reference_says_what_to_set():
    from gapkd.errors import ConfigError
    from gapkd.methods import METHODS

    teacher, _ = _models()
    with pytest.raises(ConfigError, match="method.reference_checkpoint"):
        METHODS.get("aid-adapt")(copy.deepcopy(teacher), teacher)


# --- end to end on digits -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory):
    """A resnet14 teacher trained for one epoch on a slice of digits, and the shared overrides."""
    from gapkd.api import run
    from gapkd.config import build_config

    out = tmp_path_factory.mktemp("aid")
    base = {
        "out_dir": str(out),
        "data": {"name": "digits", "batch_size": 32, "train_subset": 160, "test_subset": 60, "augment": {"crop_padding": 1, "flip": False}},
        "optim": {"lr": 0.05},
        "schedule": {"name": "cosine"},
        "train": {"epochs": 1, "device": "cpu", "log_every": 1000},
    }
    run(build_config(base, overrides={"name": "teacher", "student": {"name": "resnet14"}}), echo=False)
    return base, str(out / "teacher" / "checkpoints" / "best.pt")


def _pipeline_overrides(digits_teacher, name, **aid):
    base, teacher = digits_teacher
    aid = {"max_teacher_drop": 100.0, **aid}  # a 1-epoch teacher on 18 validation images: not what these tests check
    return {**copy.deepcopy(base), "name": name, "student": {"name": "resnet8"},
            "teacher": {"name": "resnet14", "checkpoint": teacher}, "aid": aid}


def test_pipeline_end_to_end(digits_teacher):
    from gapkd.api import evaluate_checkpoint
    from gapkd.config import DataConfig
    from gapkd.pipeline_aid import aid

    summary = aid(overrides=_pipeline_overrides(digits_teacher, "pipe", beta=2.0), echo=False)
    root = digits_teacher[0]["out_dir"] + "/pipe"
    adapt_cfg = yaml.safe_load(open(f"{root}/2-adapt/config.yaml"))
    assert adapt_cfg["method"]["name"] == "aid-adapt" and adapt_cfg["method"]["beta"] == 2.0
    assert adapt_cfg["student"]["name"] == "resnet14" and adapt_cfg["train"]["epochs"] == 1  # 10% of 1 epoch, at least 1
    assert adapt_cfg["optim"]["lr"] == pytest.approx(0.005)  # the distillation lr / 10
    assert adapt_cfg["method"]["reference_checkpoint"].endswith("1-reference/checkpoints/best.pt")
    distill_cfg = yaml.safe_load(open(f"{root}/3-distill/config.yaml"))
    assert distill_cfg["teacher"]["checkpoint"].endswith("2-adapt/checkpoints/best.pt") and distill_cfg["method"]["name"] == "kd"

    report = json.loads(open(f"{root}/adapted_teacher_report.json").read())
    assert "our reading of the published abstract" in report["note"]
    assert "our reading of the published abstract" in open(f"{root}/adapted_teacher_report.md").read()
    for split in ("val", "test"):
        for key in ("teacher_acc", "spread_teacher", "class", "inner", "kd", "agreement", "teacher_ece"):
            assert set(report[split][key]) == {"before", "after"}, key
        assert report[split]["kd"]["after"] == pytest.approx(report[split]["class"]["after"] + report[split]["inner"]["after"], rel=1e-9)
    # "before" is T0, "after" the adapted teacher's best-validation checkpoint
    data_cfg = DataConfig(**digits_teacher[0]["data"])
    t0 = evaluate_checkpoint(report["teacher_checkpoint"], data_cfg, device="cpu", amp=digits_teacher[0]["train"].get("amp", "auto"))
    assert report["val"]["teacher_acc"]["before"] == pytest.approx(t0["val_acc"]) and report["test"]["teacher_acc"]["before"] == pytest.approx(t0["test_acc"])
    assert report["val"]["teacher_acc"]["after"] == pytest.approx(summary["stages"]["adapt"]["best_val_acc"])
    assert summary["student_test_acc_at_best_val"] == summary["stages"]["distill"]["test_acc_at_best_val"]
    assert json.loads(open(f"{root}/aid_summary.json").read())["student_checkpoint"].endswith("3-distill/checkpoints/best.pt")


def test_adaptation_moves_l_inner_with_the_defaults_and_barely_as_written(tmp_path):
    """All of digits, a resnet14 teacher trained for 3 epochs, the pipeline at its defaults (1 adaptation epoch
    at lr/10): L_inner(T ‖ S_ref) on the validation split falls by a clear margin; the loss as written before
    (no τ², batch means; its adaptation stage only) barely moves it."""
    from gapkd.api import run
    from gapkd.config import build_config
    from gapkd.pipeline_aid import adaptation_check, adapted_teacher_report, aid, parse_aid_config, pipeline_dir_for, stage_configs

    base = {"out_dir": str(tmp_path), "data": {"name": "digits", "batch_size": 32, "augment": {"crop_padding": 1, "flip": False}},
            "optim": {"lr": 0.05}, "schedule": {"name": "cosine"}, "train": {"epochs": 3, "device": "cpu", "amp": "off", "log_every": 1000}}
    run(build_config(base, overrides={"name": "teacher", "student": {"name": "resnet14"}}), echo=False)
    common = {**base, "student": {"name": "resnet8"}, "teacher": {"name": "resnet14", "checkpoint": str(tmp_path / "teacher/checkpoints/best.pt")}}
    # 143 validation images: one image is 0.7 points, so the tolerance here allows a few
    new = aid(overrides={**common, "name": "defaults", "aid": {"max_teacher_drop": 3.0}}, echo=False)["adaptation"]
    reference = str(tmp_path / "defaults/1-reference/checkpoints/best.pt")  # the same S_ref for both
    cfg, options, hyper = parse_aid_config(overrides={**common, "name": "as-written", "aid": {
        "temperature_scaling": False, "class_means": "batch", "reference_checkpoint": reference}})
    pipeline_dir = pipeline_dir_for(cfg, options, hyper)
    adapt = stage_configs(cfg, options, hyper, pipeline_dir)["adapt"]
    run(adapt, echo=False)
    old = adaptation_check(adapted_teacher_report(adapt, pipeline_dir, None), options)
    assert new["within_tolerance"] and new["inner_change_percent"] < -10, new["message"]
    assert abs(old["inner_change_percent"]) < 5, old["message"]
    assert new["inner_before"] == pytest.approx(old["inner_before"], rel=1e-9)  # same T0, same S_ref, same split


def test_pipeline_resumes_and_skips_finished_stages(digits_teacher, monkeypatch):
    import gapkd.api as api
    import gapkd.engine.trainer as trainer
    from gapkd.pipeline_aid import aid

    overrides = _pipeline_overrides(digits_teacher, "resumed", adapt_epochs=2, ref_epochs=1)
    calls = []
    real_fit, real_save = api.fit, trainer.atomic_save

    def counting_fit(distiller, data, cfg, run_dir, *args, **kwargs):
        calls.append(cfg.name)
        return real_fit(distiller, data, cfg, run_dir, *args, **kwargs)

    def crash_in_adaptation(obj, path):
        real_save(obj, path)
        if "2-adapt" in str(path) and str(path).endswith("state.pt"):
            raise KeyboardInterrupt  # killed right after the adaptation's first epoch

    monkeypatch.setattr(api, "fit", counting_fit)
    monkeypatch.setattr(trainer, "atomic_save", crash_in_adaptation)
    with pytest.raises(KeyboardInterrupt):
        aid(overrides=overrides, echo=False)
    monkeypatch.setattr(trainer, "atomic_save", real_save)
    assert calls == ["1-reference", "2-adapt"]
    first = aid(overrides=overrides, echo=False)
    assert calls == ["1-reference", "2-adapt", "2-adapt", "3-distill"]  # the reference is not trained again
    root = digits_teacher[0]["out_dir"] + "/resumed"
    assert "resuming 2-adapt after epoch 1/2" in open(f"{root}/2-adapt/train.log").read()
    assert [json.loads(x)["epoch"] for x in open(f"{root}/2-adapt/metrics.jsonl")] == [1, 2]
    again = aid(overrides=overrides, echo=False)
    assert calls == ["1-reference", "2-adapt", "2-adapt", "3-distill"] and again == first


def _report(acc_before, acc_after, inner_before=0.05, inner_after=0.03):
    return {"val": {"teacher_acc": {"before": acc_before, "after": acc_after}, "inner": {"before": inner_before, "after": inner_after}}}


def test_adaptation_check_states_both_numbers_and_the_tolerance():
    from gapkd.pipeline_aid import AIDOptions, adaptation_check

    check = adaptation_check(_report(60.0, 59.5), AIDOptions())
    assert check["within_tolerance"] and check["teacher_drop"] == pytest.approx(0.5) and check["max_teacher_drop"] == 1.0
    assert check["inner_change_percent"] == pytest.approx(-40.0)
    assert "0.0500 -> 0.0300 (-40.0%)" in check["message"] and "60.00% -> 59.50%" in check["message"]
    assert adaptation_check(_report(60.0, 59.0), AIDOptions())["within_tolerance"]  # exactly at the tolerance
    over = adaptation_check(_report(60.0, 58.5), AIDOptions())
    assert not over["within_tolerance"] and "lost 1.50 points" in over["message"] and "aid.max_teacher_drop=1" in over["message"]
    assert "lower aid.beta or aid.adapt_lr" in over["message"]
    assert adaptation_check(_report(60.0, 58.5), AIDOptions(max_teacher_drop=2))["within_tolerance"]
    assert adaptation_check(_report(60.0, 65.0), AIDOptions(max_teacher_drop=0))["within_tolerance"]  # a gain is fine
    assert adaptation_check({"test": {}}, AIDOptions())["within_tolerance"]  # no validation split: nothing to check


def test_pipeline_stops_when_the_teacher_drops_too_much_and_warn_goes_on(digits_teacher, monkeypatch, capsys):
    """The adapted teacher's validation accuracy is lowered by 5 points in its report: with the default action
    the pipeline stops before distilling, keeping the finished stages; with on_teacher_drop=warn it distils
    from the same adapted teacher (the check options do not change the pipeline's folder)."""
    import gapkd.pipeline_aid as pipeline_aid
    from gapkd.pipeline_aid import AdaptationError, aid

    real = pipeline_aid.adapted_teacher_report

    def worse(*args, **kwargs):
        report = copy.deepcopy(real(*args, **kwargs))
        report["val"]["teacher_acc"]["after"] = report["val"]["teacher_acc"]["before"] - 5.0
        return report

    monkeypatch.setattr(pipeline_aid, "adapted_teacher_report", worse)
    overrides = _pipeline_overrides(digits_teacher, "dropped", max_teacher_drop=1.0)
    with pytest.raises(AdaptationError, match=r"lost 5\.00 points.*aid\.max_teacher_drop=1"):
        aid(overrides=overrides, echo=False)
    root = digits_teacher[0]["out_dir"] + "/dropped"
    assert json.loads(open(f"{root}/2-adapt/summary.json").read())["epochs"] == 1  # the finished stages are kept
    assert not (Path(root) / "3-distill").exists()
    assert "teacher top-1" in capsys.readouterr().err  # the verdict is printed even when quiet
    with pytest.warns(UserWarning, match="lost 5.00 points"):
        summary = aid(overrides=_pipeline_overrides(digits_teacher, "dropped", max_teacher_drop=1.0, on_teacher_drop="warn"), echo=False)
    assert summary["dir"] == root and not summary["adaptation"]["within_tolerance"]
    assert summary["adaptation"]["teacher_drop"] == pytest.approx(5.0)
    assert (Path(root) / "3-distill" / "summary.json").is_file()


def test_pipeline_with_a_given_reference_and_bad_options(digits_teacher):
    from gapkd.errors import ConfigError
    from gapkd.pipeline_aid import aid, parse_aid_config, pipeline_dir_for, stage_configs

    overrides = _pipeline_overrides(digits_teacher, "given", reference_checkpoint="ref.pt")
    overrides["method"] = {"name": "kd", "temperature": 2.0}
    cfg, options, hyper = parse_aid_config(overrides=overrides)
    stages = stage_configs(cfg, options, hyper, pipeline_dir_for(cfg, options, hyper))
    assert stages["reference"] is None and stages["adapt"].method.hparams["reference_checkpoint"] == "ref.pt"
    assert stages["adapt"].method.hparams["reference_model"] == "resnet8"
    assert stages["distill"].method.hparams["temperature"] == 2.0
    with pytest.raises(ConfigError, match=r"aid\.bta.*Did you mean 'beta'"):
        parse_aid_config(overrides=_pipeline_overrides(digits_teacher, "x", bta=1.0))
    with pytest.raises(ConfigError, match="aid.adapt_epochs"):
        parse_aid_config(overrides=_pipeline_overrides(digits_teacher, "x", adapt_epochs=0))
    with pytest.raises(ConfigError, match="aid.max_teacher_drop"):
        parse_aid_config(overrides=_pipeline_overrides(digits_teacher, "x", max_teacher_drop=-1))
    with pytest.raises(ConfigError, match=r"aid.on_teacher_drop.*'error' or 'warn'"):
        parse_aid_config(overrides=_pipeline_overrides(digits_teacher, "x", on_teacher_drop="stop"))
    with pytest.raises(ConfigError, match=r"aid.class_means.*'running' or 'batch'"):
        parse_aid_config(overrides=_pipeline_overrides(digits_teacher, "x", class_means="ema"))
    with pytest.raises(ConfigError, match="aid.running_decay"):
        parse_aid_config(overrides=_pipeline_overrides(digits_teacher, "x", running_decay=1.5))
    with pytest.raises(ConfigError, match="aid.reference_checkpoint=ref.pt does not exist"):
        aid(overrides=overrides, echo=False)
    bad = _pipeline_overrides(digits_teacher, "x")
    bad["method"] = {"name": "ce"}
    with pytest.raises(ConfigError, match="takes no teacher"):
        parse_aid_config(overrides=bad)


def test_diagnostics_are_logged_per_epoch_and_change_nothing(digits_teacher):
    from gapkd.analysis import analyze_models
    from gapkd.api import build_model, run, run_dir_for
    from gapkd.config import ModelConfig, build_config
    from gapkd.data import build_data, load_dataset
    from gapkd.engine.checkpoint import safe_load

    base, teacher = digits_teacher
    common = {**copy.deepcopy(base), "student": {"name": "resnet8"}, "method": {"name": "kd", "temperature": 3.0},
              "teacher": {"name": "resnet14", "checkpoint": teacher}}
    common["train"]["epochs"] = 2
    common["train"]["amp"] = "off"  # compared below with an fp32 computation (auto is bf16 on CPUs with native bf16)
    on = build_config(common, overrides=["name=diag-on", "train.diagnostics=true"])
    off = build_config(common, overrides=["name=diag-off"])
    assert on.hparams_hash() == off.hparams_hash()
    run(on, echo=False)
    run(off, echo=False)
    lines = [json.loads(x) for x in open(run_dir_for(on) / "metrics.jsonl")]
    assert [x["epoch"] for x in lines] == [1, 2]
    for line in lines:
        assert {"diag/kd", "diag/class", "diag/inner", "diag/tckd", "diag/nckd"} <= set(line)
        assert line["diag/kd"] == pytest.approx(line["diag/class"] + line["diag/inner"], rel=1e-9)
        assert line["diag/kd"] == pytest.approx(line["diag/tckd"] + line["diag/nckd_weighted"], rel=1e-9)
    assert not any(k.startswith("diag/") for k in json.loads(open(run_dir_for(off) / "metrics.jsonl").readline()))
    a, b = (safe_load(run_dir_for(c) / "checkpoints" / "last.pt")["state_dict"] for c in (on, off))
    assert all(torch.equal(a[k], b[k]) for k in a)  # logging diagnostics does not change training
    # the last epoch's diagnostics are the decomposition of the teacher vs last.pt on the validation split
    data = load_dataset(on.data)
    bundle = build_data(on.data, torch.device("cpu"), on.seed, data=data)
    student = build_model(ModelConfig(name="resnet8", checkpoint=str(run_dir_for(on) / "checkpoints" / "last.pt")), data, "student")
    report = analyze_models(build_model(on.teacher, data, "teacher"), student, bundle.val, 3.0)
    for key in ("kd", "class", "inner", "tckd", "nckd"):
        assert lines[-1][f"diag/{key}"] == pytest.approx(report[key], rel=1e-4, abs=1e-7)


def test_analyze_command_prints_a_table_and_json(digits_teacher, capsys):
    from gapkd.cli import main

    base, teacher = digits_teacher
    data = ["data.name=digits", "data.train_subset=160", "data.test_subset=60", "--device", "cpu"]
    assert main(["analyze", teacher, teacher, *data, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    expected = {"teacher", "student", "dataset", "split", "samples", "teacher_acc", "student_acc", "agreement", "teacher_ece",
                "student_ece", "kd", "class", "inner", "tckd", "nckd", "spread_teacher", "spread_student", "per_class"}
    assert expected <= set(report) and report["split"] == "val"
    assert report["agreement"] == 100.0 and report["kd"] == pytest.approx(0, abs=1e-12)  # a model against itself
    assert report["spread_teacher"] == report["spread_student"] > 0
    assert {"class", "samples", "spread_teacher", "spread_student"} == set(report["per_class"][0])
    assert main(["analyze", teacher, teacher, *data, "--split", "test"]) == 0
    table = capsys.readouterr().out
    assert "L_inner" in table and "ECE" in table and "test" in table.splitlines()[0]


def test_compare_logits_is_consistent_with_its_parts():
    generator = torch.Generator().manual_seed(5)
    t, s = torch.randn(20, 4, generator=generator) * 3, torch.randn(20, 4, generator=generator)
    y = torch.randint(0, 4, (20,), generator=generator)
    report = compare_logits(t, s, y, 2.0, class_names=["a", "b", "c", "d"])
    counts = torch.bincount(y, minlength=4)
    assert [row["samples"] for row in report["per_class"]] == [int(c) for c in counts if c > 0]
    weighted = sum(row["samples"] * row["spread_teacher"] for row in report["per_class"]) / 20
    assert weighted == pytest.approx(report["spread_teacher"], rel=1e-12)
    assert report["inner_share"] == pytest.approx(report["inner"] / report["kd"])


@pytest.mark.parametrize("command", ["aid", "analyze"])
def test_help_shows_an_example_and_aid_says_it_is_our_reading(command, capsys):
    from gapkd.cli import main

    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    assert "example" in out
    if command == "aid":
        assert "our reading of the published abstract" in " ".join(out.split())
