"""AB, FT, FSP and OFD (issue 18, part B): each loss against an independent plain formula (values and
gradients), the pre-ReLU features of the zoo families they use, what each phase trains, clear refusals,
and few-epoch digits runs that switch phase and resume across the switch exactly."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gapkd.api import run, run_dir_for
from gapkd.config import build_config
from gapkd.core.errors import ConfigError
from gapkd.core.io import safe_load
from gapkd.methods import METHODS, StepInfo, TaskInfo
from gapkd.methods.ab import ab_loss
from gapkd.methods.fsp import fsp_loss
from gapkd.methods.ft import ft_loss
from gapkd.methods.ofd import ofd_margin, ofd_stage_loss
from gapkd.models import create_model

TASK = TaskInfo(num_classes=10, in_channels=3, image_size=16, num_train=8)


def _step(epoch):
    return StepInfo(epoch=epoch, step=0, epochs=4, steps_per_epoch=1)


def _grads(loss_fn, *tensors):
    tensors = [t.detach().clone().requires_grad_(True) for t in tensors]
    value = loss_fn(*tensors)
    value.backward()
    return value.detach(), [t.grad for t in tensors]


def _pool(x, size):
    """Average pooling to ``size`` x ``size`` by reshaping (sides are multiples of it)."""
    n, c, h, w = x.shape
    return x.reshape(n, c, size, h // size, size, w // size).mean((3, 5))


# --------------------------------------------------------------------------------------------- AB


def _ab_plain(students, teachers, margin, scale):
    """The AB loss written per element: where the teacher is off and the student above -m, (s + m)^2;
    where the teacher is on and the student below m, (s - m)^2."""
    n = len(students)
    total = 0.0
    for i, (s, t) in enumerate(zip(students, teachers)):
        off = torch.where((t <= 0) & (s > -margin), (s + margin) ** 2, torch.zeros_like(s))
        on = torch.where((t > 0) & (s <= margin), (s - margin) ** 2, torch.zeros_like(s))
        total = total + (off + on).sum() * 2.0 ** (i - (n - 1)) / s.shape[0]
    return total * scale


def test_ab_loss_matches_the_plain_formula_in_value_and_gradient():
    torch.manual_seed(0)
    s = [torch.randn(4, 3, 8, 8, dtype=torch.float64) * 2, torch.randn(4, 5, 4, 4, dtype=torch.float64) * 2]
    t = [torch.randn_like(x) for x in s]
    ours, g_ours = _grads(lambda a, b: ab_loss([a, b], t, 0.7, 3e-3), *s)
    ref, g_ref = _grads(lambda a, b: _ab_plain([a, b], t, 0.7, 3e-3), *s)
    assert ours.item() > 0 and torch.allclose(ours, ref.float(), rtol=1e-6)
    for a, b in zip(g_ours, g_ref):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-9) and (a != 0).any()
    # the gradient by hand: 2 (s + m) or 2 (s - m) where the hinge is active, times weight / batch * scale
    m, last = 0.7, s[1]
    hand = torch.where((t[1] <= 0) & (last > -m), 2 * (last + m), torch.zeros_like(last))
    hand = hand + torch.where((t[1] > 0) & (last <= m), 2 * (last - m), torch.zeros_like(last))
    assert torch.allclose(g_ours[1], hand / 4 * 3e-3)


def test_ab_phases_train_the_student_stages_and_connectors_then_only_cross_entropy():
    torch.manual_seed(0)
    student, teacher = create_model("resnet8x4", num_classes=10), create_model("resnet8", num_classes=10)
    ab = METHODS.get("ab")(student, teacher, task=TASK, init_epochs=2)
    assert all(not isinstance(c, torch.nn.Identity) for c in ab.connectors)  # channels differ: conv + BN, no ReLU
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    ab.train()
    out = ab(x, y, _step(1))
    assert set(out.losses) == {"ab"}
    s_pre = student.forward_features(x).preact
    with torch.no_grad():
        t_pre = teacher.forward_features(x).preact
    expected = _ab_plain([c(p) for c, p in zip(ab.connectors, s_pre)], t_pre, 1.0, 3e-3)
    assert torch.allclose(out.losses["ab"], expected, rtol=1e-5)
    out.losses["ab"].backward()
    assert student.fc.weight.grad is None and student.conv1.weight.grad is not None
    assert all(p.grad is not None for p in ab.connectors.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    ab.zero_grad(set_to_none=True)
    out = ab(x, y, _step(2))
    assert set(out.losses) == {"ce"} and torch.allclose(out.losses["ce"], F.cross_entropy(out.logits, y))
    out.losses["ce"].backward()
    assert all(p.grad is None for p in ab.connectors.parameters()) and student.fc.weight.grad is not None
    kept = METHODS.get("ab")(student, teacher, task=TASK, init_epochs=1, ab_weight=0.5)(x, y, _step(3))
    assert set(kept.losses) == {"ce", "ab"}


# -------------------------------------------------------------------------------------------- FSP


def _fsp_plain(maps):
    """G[n, j, i] = mean over positions of top[n, j] * bottom[n, i], the larger map pooled first, by loops."""
    out = []
    for bottom, top in zip(maps[:-1], maps[1:]):
        size = min(bottom.shape[2], top.shape[2])
        bottom, top = _pool(bottom, size), _pool(top, size)
        g = torch.zeros(bottom.shape[0], top.shape[1], bottom.shape[1], dtype=bottom.dtype)
        for j in range(top.shape[1]):
            for i in range(bottom.shape[1]):
                g[:, j, i] = (top[:, j] * bottom[:, i]).mean((1, 2))
        out.append(g)
    return out


def test_fsp_loss_matches_the_plain_formula_in_value_and_gradient():
    torch.manual_seed(0)
    shapes = [(3, 4, 8, 8), (3, 4, 8, 8), (3, 6, 4, 4), (3, 2, 2, 2)]
    s = [torch.randn(*shape, dtype=torch.float64) for shape in shapes]
    t = [torch.randn(*shape, dtype=torch.float64) for shape in shapes]

    def plain(*maps):
        return sum(((a - b) ** 2).mean() for a, b in zip(_fsp_plain(list(maps)), _fsp_plain(t)))

    ours, g_ours = _grads(lambda *maps: fsp_loss(list(maps), t), *s)
    ref, g_ref = _grads(plain, *s)
    assert ours.item() > 0 and torch.allclose(ours.double(), ref, rtol=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-10) and (a != 0).any() for a, b in zip(g_ours, g_ref))


def test_fsp_phases_and_refusal_of_unequal_channels():
    torch.manual_seed(0)
    student, teacher = create_model("resnet8", num_classes=10), create_model("resnet14", num_classes=10)
    fsp = METHODS.get("fsp")(student, teacher, task=TASK, init_epochs=1)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    fsp.train()
    out = fsp(x, y, _step(0))
    assert set(out.losses) == {"fsp"}
    with torch.no_grad():
        t_maps = [teacher.forward_stem(x)]
        t_maps += teacher.forward_features(x).stages
    s_maps = [student.forward_stem(x)] + student.forward_features(x).stages
    plain = sum(((a - b) ** 2).mean() for a, b in zip(_fsp_plain(s_maps), _fsp_plain(t_maps)))
    assert torch.allclose(out.losses["fsp"], plain, rtol=1e-4)
    out.losses["fsp"].backward()
    assert student.fc.weight.grad is None and student.conv1.weight.grad is not None
    assert set(fsp(x, y, _step(1)).losses) == {"ce"}
    with pytest.raises(ConfigError, match="channels of the stem and every stage must match"):
        METHODS.get("fsp")(create_model("resnet8x4", num_classes=10), teacher, task=TASK)


# --------------------------------------------------------------------------------------------- FT


def _ft_plain(fs, ft, p):
    size = min(fs.shape[2], ft.shape[2])
    fs, ft = _pool(fs, size), _pool(ft, size)

    def factor(f):
        v = (f ** p).mean(1).reshape(f.shape[0], -1)
        return v / v.norm(dim=1, keepdim=True)

    return (factor(fs) - factor(ft)).abs().mean()


@pytest.mark.parametrize("s_side, t_side", [(8, 4), (4, 8), (4, 4)])
def test_ft_loss_matches_the_plain_formula_in_value_and_gradient(s_side, t_side):
    torch.manual_seed(0)
    fs, ft = torch.randn(3, 5, s_side, s_side, dtype=torch.float64), torch.randn(3, 7, t_side, t_side, dtype=torch.float64)
    ours, (g_ours, _) = _grads(lambda a, b: ft_loss(a, b, 2.0), fs, ft)
    ref, (g_ref, _) = _grads(lambda a, b: _ft_plain(a, b, 2.0), fs, ft)
    assert ours.item() > 0 and torch.allclose(ours.double(), ref, rtol=1e-5)
    assert torch.allclose(g_ours, g_ref, rtol=1e-4, atol=1e-9) and (g_ours != 0).any()


def test_ft_pretrains_only_the_paraphraser_then_trains_student_and_translator():
    torch.manual_seed(0)
    student, teacher = create_model("resnet8", num_classes=10), create_model("resnet8x4", num_classes=10)
    ft = METHODS.get("ft")(student, teacher, task=TASK, init_epochs=1)
    groups = {g["name"]: g for g in ft.param_groups()}
    assert groups["paraphraser"]["lr_mult"] == 0.2 and {id(p) for p in groups["paraphraser"]["params"]} == {id(p) for p in ft.paraphraser.parameters()}
    assert ft.paraphraser.encoder[-2].out_channels == 128 and ft.translator[-3].out_channels == 128  # 0.5 * 256
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    ft.train()
    stats = student.bn1.running_mean.clone()
    out = ft(x, y, _step(0))
    with torch.no_grad():
        t_map = teacher.forward_features(x).stages[-1]
    assert set(out.losses) == {"reconstruction"}
    assert torch.allclose(out.losses["reconstruction"], ((ft.paraphraser(t_map)[1] - t_map) ** 2).mean())
    assert torch.equal(student.bn1.running_mean, stats) and student.training  # the logged forward leaves the student alone
    out.losses["reconstruction"].backward()
    assert all(p.grad is not None for p in ft.paraphraser.parameters())
    assert all(p.grad is None for p in [*student.parameters(), *ft.translator.parameters()])
    ft.zero_grad(set_to_none=True)
    out = ft(x, y, _step(1))
    assert set(out.losses) == {"ce", "ft"}
    expected = 200 * _ft_plain(ft.translator(student.forward_features(x).stages[-1]), ft.paraphraser.encoder(t_map), 2.0)
    assert torch.allclose(out.losses["ft"], expected, rtol=1e-5)
    sum(out.losses.values()).backward()
    assert all(p.grad is None for p in ft.paraphraser.parameters())
    assert all(p.grad is not None for p in ft.translator.parameters()) and student.fc.weight.grad is not None


# -------------------------------------------------------------------------------------------- OFD


def _margin_plain(gamma, beta):
    out = []
    for g, b in zip(gamma.tolist(), beta.tolist()):
        s, m = abs(g), b
        cdf = 0.5 * (1 + math.erf(-m / s / math.sqrt(2)))
        out.append(m - s * math.exp(-(m / s) ** 2 / 2) / math.sqrt(2 * math.pi) / cdf if cdf > 0.001 else -3 * s)
    return torch.tensor(out)


def _ofd_plain(s, t, m):
    """mdistiller's three cases: below the margin, between the margin and 0, and positive teacher."""
    m = m.view(1, -1, 1, 1)
    loss = ((s - m) ** 2 * ((s > m) & (t <= m)) + (s - t) ** 2 * ((s > t) & (t > m) & (t <= 0)) + (s - t) ** 2 * (t > 0))
    return loss.sum() / s.shape[0]


def test_ofd_margin_and_partial_l2_match_the_plain_formulas():
    gamma, beta = torch.tensor([1.0, -0.5, 2.0, 0.3]), torch.tensor([0.0, 0.4, -1.0, 1.5])  # the last: Phi(-5) < 0.001
    margin = ofd_margin(gamma, beta)
    assert torch.allclose(margin, _margin_plain(gamma, beta), rtol=1e-6) and margin[3].item() == pytest.approx(-0.9)
    assert margin[0].item() == pytest.approx(-math.sqrt(2 / math.pi), rel=1e-6)  # E[x | x < 0] of N(0, 1)
    torch.manual_seed(0)
    s, t = torch.randn(3, 4, 5, 5, dtype=torch.float64), torch.randn(3, 4, 5, 5, dtype=torch.float64)
    ours, (g_ours, _) = _grads(lambda a, b: ofd_stage_loss(a, b, margin), s, t)
    ref, (g_ref, _) = _grads(lambda a, b: _ofd_plain(a, b, margin.double()), s, t)
    assert ours.item() > 0 and torch.allclose(ours.double(), ref, rtol=1e-6)
    assert torch.allclose(g_ours, g_ref, rtol=1e-5) and (g_ours == 0).any() and (g_ours != 0).any()


def test_ofd_method_weights_stages_pools_the_teacher_and_takes_margins_from_its_bns():
    torch.manual_seed(0)
    student, teacher = create_model("vgg8", num_classes=10), create_model("resnet50_cifar", num_classes=10)
    for bn in teacher.preact_bns():  # trained-looking BN parameters, so margins differ per channel
        torch.nn.init.normal_(bn.weight, 1, 0.3)
        torch.nn.init.normal_(bn.bias, 0, 0.5)
    ofd = METHODS.get("ofd")(student, teacher, task=TASK)
    margins = [_margin_plain(bn.weight, bn.bias) for bn in teacher.preact_bns()]
    assert all(torch.allclose(a, b, rtol=1e-5) for a, b in zip(ofd.margins(), margins))
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    ofd.train()
    out = ofd(x, y, _step(0))
    s_pre = student.forward_features(x).preact
    with torch.no_grad():
        t_pre = teacher.forward_features(x).preact
    n = len(s_pre)
    plain = sum(_ofd_plain(c(s), F.adaptive_avg_pool2d(t, c(s).shape[-2:]), m) / 2 ** (n - 1 - i)
                for i, (c, s, t, m) in enumerate(zip(ofd.connectors, s_pre, t_pre, margins)))
    assert set(out.losses) == {"ce", "ofd"} and torch.allclose(out.losses["ofd"], 1e-3 * plain, rtol=1e-4)
    sum(out.losses.values()).backward()
    assert all(p.grad is not None for p in ofd.connectors.parameters()) and all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("method", ["ab", "ofd"])
def test_pre_relu_methods_refuse_models_without_pre_relu_features(method):
    with pytest.raises(ConfigError, match="pre-ReLU stage outputs .* the student does not provide"):
        METHODS.get(method)(create_model("ShuffleV2", num_classes=10), create_model("resnet8", num_classes=10), task=TASK)
    with pytest.raises(ConfigError, match="the teacher does not provide"):
        METHODS.get(method)(create_model("resnet8", num_classes=10), create_model("MobileNetV2", num_classes=10), task=TASK)


# ---------------------------------------------------------------------------- pre-ReLU features


@pytest.mark.parametrize("name", ["wrn_16_1", "wrn_16_2", "vgg8", "resnet20", "resnet50_cifar"])
def test_pre_relu_features_follow_the_zoo_and_train_mode_updates_each_bn_once(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10)
    twin = create_model(name, num_classes=10)
    twin.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    model.train(), twin.train()
    model.forward_features(x), twin(x)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))
    model.eval()
    features = model.forward_features(x)
    assert torch.allclose(features.logits, model(x), atol=1e-5)
    bns = model.preact_bns()
    assert [bn.num_features for bn in bns] == [p.shape[1] for p in features.preact] == [s.shape[1] for s in features.stages]
    if name.startswith("wrn"):  # the zoo's preact: each stage output through the BN before the next ReLU
        assert all(torch.allclose(p, bn(s), atol=1e-5) for p, bn, s in zip(features.preact[:2], bns, features.stages))
        assert torch.allclose(torch.relu(features.preact[-1]), features.stages[-1])
    else:
        assert all(torch.allclose(torch.relu(p), s) for p, s in zip(features.preact, features.stages))
    assert all((p < 0).any() for p in features.preact)


# ------------------------------------------------------------------------- end to end on digits


PHASES = {  # losses logged in epoch 1 (initialisation) and epoch 2
    "ab": ({"ab"}, {"ce"}), "fsp": ({"fsp"}, {"ce"}), "ft": ({"reconstruction"}, {"ce", "ft"}), "ofd": ({"ce", "ofd"}, {"ce", "ofd"}),
}


@pytest.mark.parametrize("method", sorted(PHASES))
def test_digits_run_switches_phase_and_resumes_across_the_switch_exactly(method, tiny_overrides, digits_teacher, monkeypatch,
                                                                        interrupt_after_first_state):
    extra = [] if method == "ofd" else ["method.init_epochs=1"]
    straight = build_config(tiny_overrides, overrides=[f"name={method}", f"method.name={method}", "teacher.name=resnet14",
                                                       f"teacher.checkpoint={digits_teacher}", *extra])
    summary = run(straight, echo=False)
    records = [json.loads(x) for x in (run_dir_for(straight) / "metrics.jsonl").read_text().splitlines()]
    for record, names in zip(records, PHASES[method]):
        assert {k[len("loss/"):] for k in record if k.startswith("loss/")} == names
        assert all(math.isfinite(record[f"loss/{k}"]) for k in names)
    assert summary["epochs"] == 2 and 0 <= summary["test_acc_at_best_val"] <= 100

    import gapkd.build as api

    initial = {}
    real_build = api.build_distiller

    def keep_initial(*args, **kwargs):
        distiller = real_build(*args, **kwargs)
        initial.update({k: v.clone() for k, v in distiller.trainable_state_dict().items()})
        return distiller

    interrupted = build_config(straight.model_dump(), overrides=[f"name={method}-interrupted"])
    monkeypatch.setattr(api, "build_distiller", keep_initial)
    interrupt_after_first_state()
    with pytest.raises(KeyboardInterrupt):
        run(interrupted, echo=False)
    first = safe_load(run_dir_for(interrupted) / "checkpoints" / "state.pt")["model"]
    run(interrupted, echo=False)
    a = safe_load(run_dir_for(straight) / "checkpoints" / "state.pt")["model"]
    b = safe_load(run_dir_for(interrupted) / "checkpoints" / "state.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    changed = {k for k in first if not torch.equal(first[k], initial[k])}
    if method in ("ab", "fsp"):  # the initialisation trains the stages, not the classifier, which trains after it
        assert "student.conv1.weight" in changed and "student.fc.weight" not in changed
        assert not torch.equal(first["student.fc.weight"], a["student.fc.weight"])
    if method == "ft":  # only the paraphraser trains first; the student and translator after it
        assert changed and all(k.startswith("paraphraser.") for k in changed)
        assert torch.equal(first["paraphraser.encoder.0.weight"], a["paraphraser.encoder.0.weight"])
        assert not torch.equal(first["student.conv1.weight"], a["student.conv1.weight"])


# ------------------------------------------------------------------------------------------ recipes

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for name in PHASES for folder in ("cifar100", "cifar10/ladder") for p in (REPO / "configs" / folder).glob(f"*/{name}.yaml"))


def test_every_standard_pair_and_ladder_rung_has_the_recipes_its_method_supports():
    by_method = {m: {p.parent.name for p in RECIPES if p.stem == m and "ladder" not in p.parts} for m in PHASES}
    for method in ("ab", "ofd", "ft"):  # the homogeneous pairs, and RepDistiller's heterogeneous resnet50_cifar -> vgg8
        assert {"resnet32x4-resnet8x4", "wrn_40_2-wrn_16_2", "resnet56-resnet20", "vgg13-vgg8", "resnet50_cifar-vgg8"} <= by_method[method]
    assert {"resnet32x4-shufflev2", "vgg13-mobilenetv2"} <= by_method["ft"]
    assert by_method["fsp"] == {"resnet32x4-resnet8x4", "wrn_40_2-wrn_16_2", "resnet56-resnet20", "resnet110-resnet32", "vgg13-vgg8"}
    ladder = {(p.parent.name, p.stem) for p in RECIPES if "ladder" in p.parts}
    assert len(ladder) == 6 * 3 + 1  # every rung for AB, FT, OFD; FSP only where the channels match


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.parent.name}/{p.parent.name}/{p.stem}")
def test_recipe_builds_and_runs_the_initialisation_before_the_published_schedule(path):
    cfg = build_config(None, path)
    init = cfg.method.hparams.get("init_epochs", 0)
    if "ladder" in path.parts:
        assert cfg.data.name == "cifar10" and cfg.schedule.name == "cosine" and cfg.train.epochs == 100 + init
    else:
        assert cfg.train.epochs == 240 + init and list(cfg.schedule.milestones) == [150 + init, 180 + init, 210 + init]
    assert init == (0 if cfg.method.name == "ofd" else 30)
    classes = 10 if cfg.data.name == "cifar10" else 100
    student, teacher = create_model(cfg.student.name, num_classes=classes), create_model(cfg.teacher.name, num_classes=classes)
    METHODS.get(cfg.method.name)(student, teacher, task=TaskInfo(classes, 3, 32, 100), **cfg.method.hparams)


def test_list_methods_verbose_names_the_modules_and_losses(capsys):
    from gapkd.cli import main

    assert main(["list", "methods", "-v"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    for name, words in {"ab": ["connectors", "'ab'", "'ce'"], "fsp": ["'fsp'", "'ce'", "No extra modules"],
                        "ft": ["paraphraser", "translator", "'reconstruction'", "'ft'"], "ofd": ["conv+BN", "'ofd'", "'ce'"]}.items():
        assert all(word in lines[name] for word in words) and str(METHODS.get(name).hparam_defaults()) in lines[name]


@pytest.mark.parametrize("method", ["ab", "ft", "fsp"])
def test_phased_methods_refuse_ddp_with_the_reason(method):
    from gapkd.core.distributed import check_supported

    distiller = METHODS.get(method)(create_model("resnet8", num_classes=10), create_model("resnet14", num_classes=10), task=TASK)
    with pytest.raises(ConfigError, match=f"method {type(distiller).__name__} trains different parameters in its two phases.*single process"):
        check_supported(distiller)
    check_supported(METHODS.get("ofd")(create_model("resnet8", num_classes=10), create_model("resnet14", num_classes=10), task=TASK))
