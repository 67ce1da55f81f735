"""SP, CC, VID, RKD, PKT, NST and KD-SVD (issue 18, part A): each loss against an independent
numpy computation on random tensors (values, and gradients by central differences of the numpy
formula), what trains and what stays frozen, a few steps end to end on digits, the modules and
losses `gapkd list methods -v` lists, and the recipes."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from gapkd.api import run, run_dir_for
from gapkd.config import build_config
from gapkd.errors import ConfigError
from gapkd.methods import METHODS, StepInfo, TaskInfo
from gapkd.models import create_model
from test_methods_a import assert_three_steps_train_exactly, random_teacher  # noqa: F401  (random_teacher: a fixture)

REPO = Path(__file__).resolve().parents[1]
NAMES = ["sp", "cc", "vid", "rkd", "pkt", "nst", "kdsvd"]
TASK16 = TaskInfo(num_classes=10, in_channels=3, image_size=16, num_train=100)
STEP = StepInfo(epoch=0, step=0, epochs=1, steps_per_epoch=1)


def rng(seed=0):
    return np.random.default_rng(seed)


def numeric_gradient(f, x, h=1e-6):
    """Central differences of the numpy function f at x (float64), entry by entry."""
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[index] += h
        down[index] -= h
        grad[index] = (f(up) - f(down)) / (2 * h)
    return grad


def check(torch_loss, numpy_loss, student, teacher, rel=1e-4):
    """Value of torch_loss(student, teacher) equals numpy_loss; its gradient in the student equals
    the numpy formula's central differences."""
    x = torch.tensor(student, requires_grad=True)
    value = torch_loss(x, torch.tensor(teacher))
    assert value.item() == pytest.approx(numpy_loss(student, teacher), rel=rel, abs=1e-9)
    value.backward()
    expected = numeric_gradient(lambda s: numpy_loss(s, teacher), student)
    scale = np.abs(expected).max()
    assert scale > 0
    np.testing.assert_allclose(x.grad.numpy(), expected, rtol=1e-3, atol=1e-3 * scale)


def huber(d):
    d = np.abs(d)
    return np.where(d < 1, 0.5 * d * d, d - 0.5)


def block_mean(f, size):
    b, c, h, w = f.shape
    return f.reshape(b, c, size, h // size, size, w // size).mean(axis=(3, 5))


# ---------------------------------------------------------------- numpy references
def sp_reference(s, t):
    b = s.shape[0]

    def gram(f):
        f = f.reshape(b, -1)
        g = np.array([[f[i] @ f[j] for j in range(b)] for i in range(b)])
        return g / np.linalg.norm(g, axis=1, keepdims=True)

    return float(((gram(t) - gram(s)) ** 2).sum() / b**2)


def pkt_reference(s, t, eps=1e-7):
    def distribution(f):
        b = len(f)
        norms = [math.sqrt(sum(v * v for v in row)) + eps for row in f]
        k = np.array([[(f[i] @ f[j]) / (norms[i] * norms[j]) for j in range(b)] for i in range(b)])
        k = (k + 1) / 2
        return k / k.sum(axis=1, keepdims=True)

    ps, pt = distribution(s), distribution(t)
    return float(np.mean(pt * np.log((pt + eps) / (ps + eps))))


def rkd_distance_reference(s, t):
    def distances(f):
        b = len(f)
        d = np.array([[np.linalg.norm(f[i] - f[j]) if i != j else 0.0 for j in range(b)] for i in range(b)])
        return d / d[~np.eye(b, dtype=bool)].mean()

    return float(huber(distances(s) - distances(t)).mean())


def rkd_angle_reference(s, t):
    def cosines(f):
        b = len(f)
        out = []
        for j in range(b):
            unit = [(f[i] - f[j]) / np.linalg.norm(f[i] - f[j]) if i != j else np.zeros_like(f[j]) for i in range(b)]
            out += [unit[i] @ unit[k] for i in range(b) for k in range(b)]
        return np.array(out)

    return float(huber(cosines(s) - cosines(t)).mean())


def nst_reference(s, t):
    size = min(s.shape[2], t.shape[2])
    s, t = block_mean(s, size), block_mean(t, size)

    def units(f):
        f = f.reshape(f.shape[0], f.shape[1], -1)
        return f / np.maximum(np.linalg.norm(f, axis=2, keepdims=True), 1e-12)  # a dead (all-zero) channel stays zero

    def kernel(a, b):
        return np.mean([[(a[n, i] @ b[n, j]) ** 2 for i in range(a.shape[1]) for j in range(b.shape[1])] for n in range(len(a))])

    s, t = units(s), units(t)
    return float(kernel(t, t) + kernel(s, s) - 2 * kernel(s, t))


def vid_reference(s, t, weights, log_scale, eps):
    size = min(s.shape[2], t.shape[2])
    s, t = block_mean(s, size), block_mean(t, size)
    w1, w2, w3 = weights
    hidden = np.maximum(np.einsum("oc,nchw->nohw", w1, s), 0)
    hidden = np.maximum(np.einsum("oc,nchw->nohw", w2, hidden), 0)
    mean = np.einsum("oc,nchw->nohw", w3, hidden)
    var = np.log1p(np.exp(log_scale)) + eps
    var = var[None, :, None, None]
    return float(np.mean(0.5 * ((mean - t) ** 2 / var + np.log(var))))


def cc_repdistiller_reference(s, t):
    delta = np.abs(s - t)
    return float(np.mean([sum(delta[i, d] * delta[i + 1, d] for d in range(s.shape[1])) for i in range(len(s) - 1)]))


def cc_gaussian_reference(s, t, gamma, order):
    def correlation(f):
        f = f / np.linalg.norm(f, axis=1, keepdims=True)
        c = f @ f.T
        return sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * c**p for p in range(order + 1))

    return float(np.mean((correlation(s) - correlation(t)) ** 2))


def kdsvd_reference(students, teachers, k, layout="paper"):
    """Per sample, numpy's SVD of each stage matrix; the rest as the paper's pseudo-code, in loops."""
    batch = students[0].shape[0]
    total = 0.0
    for n in range(batch):
        previous = None
        for fs, ft in zip(students, teachers):
            def decompose(f, count):
                c, h, w = f.shape
                matrix = f.reshape(c, h * w).T if layout == "paper" else f.reshape(c * h, w)
                _, values, vh = np.linalg.svd(matrix, full_matrices=False)
                v = vh.T[:, :count]
                return values[:count] / np.linalg.norm(values[:count]), v / np.linalg.norm(v, axis=0, keepdims=True)

            t_values, t_vectors = decompose(ft[n], k)
            _, s_vectors = decompose(fs[n], k + 3)
            aligned = np.zeros_like(t_vectors)
            for j in range(k):  # the student vector most aligned with teacher vector j, sign-matched
                cosines = s_vectors.T @ t_vectors[:, j]
                best = int(np.argmax(np.abs(cosines)))
                aligned[:, j] = np.sign(cosines[best]) * s_vectors[:, best]
            current = (aligned * t_values, t_vectors * t_values)
            if previous is not None:
                for a in range(current[0].shape[0]):
                    for b in range(previous[0].shape[0]):
                        for j in range(k):
                            ks = math.exp(-(current[0][a, j] - previous[0][b, j]) ** 2 / 8)
                            kt = math.exp(-(current[1][a, j] - previous[1][b, j]) ** 2 / 8)
                            total += (ks - kt) ** 2
            previous = current
    return total / batch


# ---------------------------------------------------------------- losses: values and gradients
def test_sp_loss_matches_the_gram_formula():
    from gapkd.methods.sp import similarity_preserving_loss

    r = rng(0)
    check(similarity_preserving_loss, sp_reference, r.normal(size=(5, 3, 2, 2)), r.normal(size=(5, 7, 2, 2)))


def test_pkt_loss_matches_the_conditional_probability_kl():
    from gapkd.methods.pkt import pkt_loss

    r = rng(1)
    check(pkt_loss, pkt_reference, r.normal(size=(6, 4)), r.normal(size=(6, 9)))


def test_rkd_distance_and_angle_match_the_pairwise_and_triplet_formulas():
    from gapkd.methods.rkd import rkd_angle_loss, rkd_distance_loss

    r = rng(2)
    s, t = r.normal(size=(5, 4)), r.normal(size=(5, 6)) * 3
    check(rkd_distance_loss, rkd_distance_reference, s, t)
    check(rkd_angle_loss, rkd_angle_reference, s, t)
    # large differences reach the linear part of the Huber loss
    far = r.normal(size=(5, 4)) * np.array([50, 0.01, 0.01, 0.01])
    check(rkd_distance_loss, rkd_distance_reference, far, t)


def test_nst_loss_matches_the_polynomial_mmd_with_pooling_of_the_larger_map():
    from gapkd.methods.nst import nst_loss

    r = rng(3)
    check(nst_loss, nst_reference, r.normal(size=(2, 3, 4, 4)), r.normal(size=(2, 5, 2, 2)))
    check(nst_loss, nst_reference, r.normal(size=(2, 3, 2, 2)), r.normal(size=(2, 4, 4, 4)))


def test_vid_nll_matches_the_gaussian_formula_in_inputs_and_variance():
    from gapkd.methods.vid import vid_nll, vid_regressor, vid_variance

    r = rng(4)
    torch.manual_seed(0)
    regressor = vid_regressor(3, 5).double()
    weights = [conv.weight.detach().numpy()[:, :, 0, 0] for conv in regressor if isinstance(conv, torch.nn.Conv2d)]
    log_scale = r.normal(size=5)
    eps = 1e-5

    def loss(s, t, ls=torch.tensor(log_scale)):
        from gapkd.methods.losses import match_spatial

        s, t = match_spatial(s, t)
        return vid_nll(regressor(s), t, vid_variance(ls, eps))

    s, t = r.normal(size=(2, 3, 4, 4)), r.normal(size=(2, 5, 2, 2))
    check(loss, lambda a, b: vid_reference(a, b, weights, log_scale, eps), s, t)
    # the variance parameter's gradient
    ls = torch.tensor(log_scale, requires_grad=True)
    loss(torch.tensor(s), torch.tensor(t), ls).backward()
    expected = numeric_gradient(lambda v: vid_reference(s, t, weights, v, eps), log_scale)
    np.testing.assert_allclose(ls.grad.numpy(), expected, rtol=1e-3, atol=1e-7)


def test_vid_starts_every_variance_at_init_pred_var():
    from gapkd.methods.vid import vid_variance

    method = METHODS.get("vid")(*_models(), task=TASK16, init_pred_var=3.0)
    assert len(method.log_scales) == 3
    for log_scale, channels in zip(method.log_scales, [64, 128, 256]):
        assert log_scale.shape == (channels,)
        assert torch.allclose(vid_variance(log_scale, 1e-5), torch.full((channels,), 3.0, dtype=torch.float32))


def test_cc_losses_match_the_delta_product_and_the_taylor_gaussian_formulas():
    from gapkd.methods.cc import gaussian_correlation_loss, repdistiller_correlation_loss

    r = rng(5)
    s, t = r.normal(size=(6, 4)), r.normal(size=(6, 4))
    check(repdistiller_correlation_loss, cc_repdistiller_reference, s, t)
    check(lambda a, b: gaussian_correlation_loss(a, b, 0.4, 2), lambda a, b: cc_gaussian_reference(a, b, 0.4, 2), s, t)


def test_cc_taylor_expansion_tends_to_the_gaussian_kernel_on_unit_vectors():
    from gapkd.methods.cc import taylor_gaussian_correlation

    x = rng(6).normal(size=(5, 3))
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    exact = np.exp(-0.4 * ((unit[:, None, :] - unit[None, :, :]) ** 2).sum(-1))
    approx = taylor_gaussian_correlation(torch.tensor(x), 0.4, 10).numpy()
    np.testing.assert_allclose(approx, exact, rtol=1e-6)


@pytest.mark.parametrize("layout, shapes", [
    ("paper", [((2, 3, 4, 4), (2, 3, 4, 4)), ((2, 5, 2, 2), (2, 5, 2, 2))]),  # equal channels, any widths
    ("mdistiller", [((2, 3, 4, 4), (2, 6, 4, 4)), ((2, 5, 3, 3), (2, 4, 3, 3))]),  # equal widths, any channels
])
def test_kdsvd_loss_matches_the_per_sample_svd_computation(layout, shapes):
    from gapkd.methods.kdsvd import kdsvd_loss

    r = rng(7)
    students = [r.normal(size=s) for s, _ in shapes]
    teachers = [r.normal(size=t) for _, t in shapes]

    def ours(*students_):
        return kdsvd_loss([torch.tensor(s) for s in students_], [torch.tensor(t) for t in teachers], 1, layout)

    value = ours(*students).item()
    assert value > 0 and value == pytest.approx(kdsvd_reference(students, teachers, 1, layout), rel=1e-4)
    inputs = [torch.tensor(s, requires_grad=True) for s in students]
    kdsvd_loss(inputs, [torch.tensor(t) for t in teachers], 1, layout).backward()
    for i, student in enumerate(students):
        def numpy_loss(x, i=i):
            return kdsvd_reference([x if j == i else s for j, s in enumerate(students)], teachers, 1, layout)

        expected = numeric_gradient(numpy_loss, student)
        np.testing.assert_allclose(inputs[i].grad.numpy(), expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())


def test_kdsvd_refuses_pairs_whose_stages_cannot_be_aligned():
    with pytest.raises(ConfigError, match="equal channels.*method.layout=mdistiller"):
        METHODS.get("kdsvd")(*_models("resnet8", "resnet8x4"), task=TASK16)
    METHODS.get("kdsvd")(*_models("resnet8", "resnet8x4"), task=TASK16, layout="mdistiller")  # equal widths: fine


@pytest.mark.parametrize("loss", ["sp.similarity_preserving_loss", "pkt.pkt_loss", "rkd.rkd_distance_loss", "rkd.rkd_angle_loss",
                                  "nst.nst_loss", "cc.repdistiller_correlation_loss", "cc.gaussian_correlation_loss"])
def test_relation_losses_compute_in_float32_under_bf16_autocast(loss):
    """Autocast would run their matmuls in bf16, which rounds away the small differences they compare
    (measured before the fix: RKD's distance term 9.04 instead of 3.18, PKT's 0.95 instead of 0.0072)."""
    import importlib

    module, name = loss.split(".")
    fn = getattr(importlib.import_module(f"gapkd.methods.{module}"), name)
    extra = (0.4, 2) if "gaussian" in name else ()
    torch.manual_seed(0)
    shape = (16, 8, 4, 4) if module in ("sp", "nst") else (16, 32)
    s, t = torch.rand(shape) + 1, torch.rand(shape) + 1  # positive, like post-ReLU features: similarities near 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = fn(s.bfloat16(), t.bfloat16(), *extra)
    full = fn(s.bfloat16().float(), t.bfloat16().float(), *extra)
    assert half.dtype == torch.float32 and half.item() == pytest.approx(full.item(), rel=1e-5)


# ---------------------------------------------------------------- the methods on real models
def _models(student="resnet8", teacher="resnet8x4"):
    torch.manual_seed(0)
    return create_model(student, num_classes=10), create_model(teacher, num_classes=10)


def _batch(n=6, size=16):
    torch.manual_seed(1)
    return torch.randn(n, 3, size, size), torch.arange(n) % 4


def _features(model, x):
    with torch.no_grad():
        return model.eval().forward_features(x)


def _ce(logits, labels):
    return float(torch.nn.functional.cross_entropy(logits.double(), labels))


@pytest.mark.parametrize("name, hyper, term, reference", [
    ("sp", {"beta": 7.0}, "sp", lambda fs, ft, m: sp_reference(fs.stages[2].numpy(), ft.stages[2].numpy())),
    ("sp", {"beta": 7.0, "stage": 0}, "sp", lambda fs, ft, m: sp_reference(fs.stages[0].numpy(), ft.stages[0].numpy())),
    ("pkt", {"beta": 7.0}, "pkt", lambda fs, ft, m: pkt_reference(fs.pooled.numpy(), ft.pooled.numpy())),
    ("rkd", {"beta": 7.0, "distance_weight": 2.0}, "distance", lambda fs, ft, m: 2 * rkd_distance_reference(fs.pooled.numpy(), ft.pooled.numpy())),
    ("rkd", {"beta": 7.0, "angle_weight": 3.0}, "angle", lambda fs, ft, m: 3 * rkd_angle_reference(fs.pooled.numpy(), ft.pooled.numpy())),
    ("nst", {"beta": 7.0}, "nst", lambda fs, ft, m: sum(nst_reference(a.numpy(), b.numpy()) for a, b in zip(fs.stages, ft.stages))),
    ("cc", {"beta": 7.0}, "cc", lambda fs, ft, m: cc_repdistiller_reference(
        m.embed_student(fs.pooled).detach().numpy(), m.embed_teacher(ft.pooled).detach().numpy())),
    ("kdsvd", {"beta": 7.0, "layout": "mdistiller"}, "kdsvd", lambda fs, ft, m: kdsvd_reference(
        [a.numpy() for a in fs.stages], [b.numpy() for b in ft.stages], 1, "mdistiller")),
])
def test_method_weights_its_term_on_the_reference_features_plus_ce(name, hyper, term, reference):
    student, teacher = _models()
    method = METHODS.get(name)(student, teacher, task=TASK16, **hyper)
    x, y = _batch()
    method.eval()  # features from the same (eval-mode) student
    out = method(x, y, STEP)
    fs, ft = _features(student, x), _features(teacher, x)
    assert set(out.losses) == set(method.loss_terms)
    # PKT on post-ReLU pooled features of random models: similarities near 1, a tiny KL, float32 cancellation
    assert out.losses[term].item() == pytest.approx(7.0 * reference(fs, ft, method), rel=1e-2 if name == "pkt" else 1e-4)
    assert out.losses["ce"].item() == pytest.approx(_ce(fs.logits, y), rel=1e-5)


def test_vid_sums_the_stage_nlls_of_its_regressors():
    student, teacher = _models()
    method = METHODS.get("vid")(student, teacher, task=TASK16, beta=2.0)
    x, y = _batch()
    method.eval()
    out = method(x, y, STEP)
    fs, ft = _features(student, x), _features(teacher, x)
    expected = 0.0
    for regressor, log_scale, a, b in zip(method.regressors, method.log_scales, fs.stages, ft.stages):
        weights = [conv.weight.detach().numpy()[:, :, 0, 0] for conv in regressor if isinstance(conv, torch.nn.Conv2d)]
        expected += vid_reference(a.numpy(), b.numpy(), weights, log_scale.detach().numpy(), 1e-5)
    assert out.losses["vid"].item() == pytest.approx(2.0 * expected, rel=1e-4)


def test_stagewise_methods_pair_the_first_stages_both_models_have():
    """ShuffleV2 lists its final 1x1 conv as a 4th stage: paired with a 3-stage ResNet, the first 3 are used,
    and SP compares the third (RepDistiller's feat[-2] of both)."""
    task = TaskInfo(num_classes=10, in_channels=3, image_size=32, num_train=100)
    student, teacher = _models("ShuffleV2", "resnet8x4")
    assert METHODS.get("sp")(student, teacher, task=task).stage == 2
    assert METHODS.get("nst")(student, teacher, task=task).pairs == 3
    vid = METHODS.get("vid")(student, teacher, task=task)
    assert [r[0].in_channels for r in vid.regressors] == [116, 232, 464]
    with pytest.raises(ConfigError, match="method.stage=3"):
        METHODS.get("sp")(student, teacher, task=task, stage=3)


# ---------------------------------------------------------------- what trains, what stays frozen
@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_exactly_the_student_and_the_listed_modules_and_the_teacher_never_changes(name):
    student, teacher = _models("resnet8", "resnet14")
    method = METHODS.get(name)(student, teacher, task=TASK16)
    named = dict(method.named_parameters())
    expected = {n for n in named if n.startswith("student.") or n.split(".")[0] in method.extra_modules}
    assert {n.split(".")[0] for n in expected} == {"student", *method.extra_modules}
    trained = {id(p) for g in method.param_groups() for p in g["params"]}
    assert {n for n, p in named.items() if id(p) in trained} == expected
    assert_three_steps_train_exactly(method, teacher, expected, *_batch(8))


# ---------------------------------------------------------------- end to end on digits
@pytest.mark.parametrize("name", NAMES)
def test_end_to_end_on_digits_logs_every_listed_term(name, tiny_overrides, random_teacher):  # noqa: F811
    tiny_overrides["train"]["epochs"] = 1
    cfg = build_config(tiny_overrides, overrides=[f"method.name={name}", "teacher.name=resnet14", f"teacher.checkpoint={random_teacher}"])
    summary = run(cfg, echo=False)
    assert summary["method"] == name and summary["epochs"] == 1 and 0 <= summary["test_acc_at_best_val"] <= 100
    record = json.loads((run_dir_for(cfg) / "metrics.jsonl").read_text().splitlines()[0])
    cls = METHODS.get(name)
    assert {k[len("loss/"):] for k in record if k.startswith("loss/")} == set(cls.loss_terms)
    assert all(math.isfinite(record[f"loss/{k}"]) for k in cls.loss_terms)
    state = torch.load(run_dir_for(cfg) / "checkpoints" / "state.pt", weights_only=True)["model"]
    for module in cls.extra_modules:  # what the method adds is saved for resume
        assert any(k.startswith(module + ".") for k in state), module


def test_list_methods_verbose_names_the_losses_and_modules_each_adds(capsys):
    from gapkd.cli import main

    assert main(["list", "methods", "-v"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name in NAMES:
        cls = METHODS.get(name)
        at = next(i for i, line in enumerate(lines) if line.split()[0] == name)
        assert cls.describe() in lines[at] and str(cls.hparam_defaults()) in lines[at]
        assert f"losses: {', '.join(cls.loss_terms)};" in lines[at + 1]
        for module in cls.extra_modules:
            assert f"{module} (" in lines[at + 1]
        if not cls.extra_modules:
            assert lines[at + 1].endswith("beside the student: none")


# ---------------------------------------------------------------- recipes
@pytest.mark.parametrize("name", NAMES)
def test_recipes_exist_for_the_standard_pairs_with_the_method_defaults(name):
    import yaml

    pairs = ["resnet32x4-resnet8x4", "wrn_40_2-wrn_16_2", "resnet56-resnet20", "vgg13-vgg8"]
    if name != "kdsvd":  # KD-SVD needs equal channels per stage (or widths), which no heterogeneous pair has
        pairs.append("resnet32x4-shufflev2")
    for dataset in ("cifar100", "cifar10"):
        for pair in pairs:
            tree = yaml.safe_load((REPO / "configs" / dataset / pair / f"{name}.yaml").read_text())
            assert tree["method"]["name"] == name
            assert {k: v for k, v in tree["method"].items() if k != "name"} == {
                k: v for k, v in METHODS.get(name).hparam_defaults().items() if k in tree["method"]}


PAIRS = sorted({p.parent.name for name in NAMES for p in (REPO / "configs" / "cifar100").glob(f"*/{name}.yaml")})


@pytest.mark.parametrize("pair", PAIRS)
def test_every_recipe_of_a_pair_builds_its_distiller(pair):
    recipes = [REPO / "configs" / "cifar100" / pair / f"{name}.yaml" for name in NAMES]
    recipes = [path for path in recipes if path.is_file()]
    assert len(recipes) >= len(NAMES) - 1  # KD-SVD only where the stages have equal channels
    configs = [build_config(None, path) for path in recipes]
    student = create_model(configs[0].student.name, num_classes=100)
    teacher = create_model(configs[0].teacher.name, num_classes=100)
    task = TaskInfo(100, 3, 32, 1000)
    for cfg in configs:
        assert cfg.data.name == "cifar100" and cfg.train.epochs == 240
        METHODS.get(cfg.method.name)(student, teacher, task=task, **cfg.method.hparams)


def test_evidence_seeds_prints_mean_and_sample_std_over_the_seeds_found(tmp_path):
    import subprocess
    import sys

    for seed, (test, val) in enumerate([(40.0, 41.0), (44.0, 45.0), (42.0, 49.0)]):
        run_dir = tmp_path / f"sp_resnet56-resnet20_s{seed}"
        run_dir.mkdir()
        (run_dir / "summary.json").write_text(json.dumps({"test_acc_at_best_val": test, "best_val_acc": val}))
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "evidence_seeds.py"), "--out-dir", str(tmp_path),
                          "--methods", "sp", "kd"], check=True, capture_output=True, text=True).stdout
    assert "| sp | 0 1 2 | 42.00 ± 2.00 | 45.00 ± 4.00 |" in out
    assert "| kd | none finished |" in out
