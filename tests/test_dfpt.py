"""DFPT-KD and DFPT-KD+ (docs/dfpt-kd.md): the must-hold properties of gapkd issue 5."""
import json
import math
from pathlib import Path

import pytest
import torch

from gapkd.api import run, run_dir_for
from gapkd.config import OptimConfig, build_config
from gapkd.engine.optim import build_optimizer
from gapkd.errors import ConfigError
from gapkd.methods import METHODS, StepInfo
from gapkd.methods.dfpt import DFPTHparams, dfpt_losses, split_channels
from gapkd.models import create_model

REPO = Path(__file__).resolve().parents[1]
STEP = StepInfo(0, 0, 1, 1)
LOSS_NAMES = {"prompt_ce", "prompt_teacher", "prompt_student", "student_ce", "student_teacher", "student_prompt"}


def _build(method="dfpt-kd", teacher="resnet14", seed=0, **hparams):
    torch.manual_seed(seed)
    student, teacher_net = create_model("resnet8", num_classes=10), create_model(teacher, num_classes=10)
    _randomise_bn_statistics(teacher_net)
    return METHODS.get(method)(student, teacher_net, **hparams)


def _randomise_bn_statistics(model):
    """Non-trivial running statistics and affine BN weights, as a trained teacher has."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
            module.weight.data.copy_(0.5 + torch.rand(n, generator=generator))
            module.bias.data.copy_(0.1 * torch.randn(n, generator=generator))


def _batch(n=6, size=16, seed=2):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=generator), torch.randint(0, 10, (n,), generator=generator)


def _ids(params):
    return {id(p) for p in params}


# --- losses -----------------------------------------------------------------------------

def _softmax(row):
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def _kl(target_logits, logits, tau):
    """tau^2 * mean over rows of sum p log(p/q), p = softmax(target/tau), q = softmax(logits/tau)."""
    total = 0.0
    for t_row, s_row in zip(target_logits, logits):
        p, q = _softmax([v / tau for v in t_row]), _softmax([v / tau for v in s_row])
        total += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    return tau**2 * total / len(logits)


def _ce(logits, labels):
    return sum(-math.log(_softmax(row)[y]) for row, y in zip(logits, labels)) / len(labels)


def test_each_loss_term_matches_a_hand_computation():
    z_s = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
    z_p = [[0.5, 0.0, 2.0], [1.5, 1.0, -0.5]]
    z_t = [[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]]
    labels = [1, 2]
    h = DFPTHparams(temperature=2.0, student_ce_weight=0.2, student_teacher_weight=0.3, student_prompt_weight=0.7,
                    prompt_ce_weight=0.5, prompt_teacher_weight=1.5, prompt_student_weight=2.5)
    got = dfpt_losses(torch.tensor(z_s), torch.tensor(z_p), torch.tensor(z_t), torch.tensor(labels), h)
    expected = {
        "prompt_ce": 0.5 * _ce(z_p, labels),
        "prompt_teacher": 1.5 * _kl(z_t, z_p, 2.0),
        "prompt_student": 2.5 * _kl(z_s, z_p, 2.0),
        "student_ce": 0.2 * _ce(z_s, labels),
        "student_teacher": 0.3 * _kl(z_t, z_s, 2.0),
        "student_prompt": 0.7 * _kl(z_p, z_s, 2.0),
    }
    assert set(got) == LOSS_NAMES
    for name, value in expected.items():
        assert got[name].item() == pytest.approx(value, rel=1e-6), name
    off = dfpt_losses(torch.tensor(z_s), torch.tensor(z_p), torch.tensor(z_t), torch.tensor(labels),
                      DFPTHparams(student_feedback=False, teacher_anchor=False))
    assert off["prompt_student"].item() == 0.0 and off["prompt_teacher"].item() == 0.0


def test_kl_terms_without_tau_squared_are_the_scaled_ones_over_tau_squared():
    z_s, z_p, z_t = torch.randn(4, 5), torch.randn(4, 5), torch.randn(4, 5)
    labels = torch.tensor([0, 1, 2, 3])
    scaled = dfpt_losses(z_s, z_p, z_t, labels, DFPTHparams(temperature=3.0))
    unscaled = dfpt_losses(z_s, z_p, z_t, labels, DFPTHparams(temperature=3.0, kl_tau2=False))
    for name in LOSS_NAMES:
        factor = 1.0 if name.endswith("_ce") else 1.0 / 9.0
        assert unscaled[name].item() == pytest.approx(factor * scaled[name].item(), rel=1e-6), name
    # the seed blog's weights, spelled with the options: student 0.5 CE + 0.5 KLs, prompt 0.7 CE + 0.3 KLs, no tau^2
    blog = DFPTHparams(kl_tau2=False, student_ce_weight=0.5, student_teacher_weight=0.5, student_prompt_weight=0.5,
                       prompt_ce_weight=0.7, prompt_teacher_weight=0.3, prompt_student_weight=0.3)
    got = dfpt_losses(z_s, z_p, z_t, labels, blog)
    plain_kl = lambda target, logits: torch.nn.functional.kl_div(  # noqa: E731  (tau = 4, no tau^2)
        torch.log_softmax(logits / 4, 1), torch.log_softmax(target / 4, 1), reduction="batchmean", log_target=True)
    assert got["prompt_student"].item() == pytest.approx(0.3 * plain_kl(z_s, z_p).item(), rel=1e-5)
    assert got["student_teacher"].item() == pytest.approx(0.5 * plain_kl(z_t, z_s).item(), rel=1e-5)


def test_gate_fusion_is_the_blog_gate_starting_at_one():
    from gapkd.methods.dfpt import GateFusion

    gate = GateFusion(4)
    x = torch.randn(2, 4, 3, 3)
    assert torch.equal(gate(x), x)  # the gate starts at 1
    with torch.no_grad():
        gate.out.bias.fill_(-1.0)
    expected = x * 2 * torch.sigmoid(gate.out(gate.inner(x)))
    torch.testing.assert_close(gate(x), expected)
    d = _build(fusion="gate")
    assert all(isinstance(f, GateFusion) for f in d.fusions.values()) and len(d.fusions) == 2  # every stage but the last


def test_prompt_weight_decay_and_warm_up_apply_to_the_prompt_group_only():
    from gapkd.config import ScheduleConfig
    from gapkd.engine.optim import build_scheduler

    d = _build(prompt_wd_mult=0.0, prompt_warmup_epochs=2.0)
    groups = d.param_groups()
    optimizer = build_optimizer(groups, OptimConfig(lr=0.1, weight_decay=5e-4))
    assert [g["weight_decay"] for g in optimizer.param_groups] == [5e-4, 0.0]
    scheduler = build_scheduler(optimizer, ScheduleConfig(name="constant"), 4, 10, 0.1, groups)
    lrs = []
    for _ in range(25):
        lrs.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    assert all(student == pytest.approx(0.1) for student, _ in lrs)
    assert [prompt for _, prompt in lrs][:3] == pytest.approx([0.1 / 20, 0.2 / 20, 0.3 / 20])
    assert lrs[19][1] == pytest.approx(0.1) and lrs[24][1] == pytest.approx(0.1)
    resumed = build_scheduler(optimizer, ScheduleConfig(name="constant"), 4, 10, 0.1, groups)
    resumed.load_state_dict(scheduler.state_dict())  # the warm-up survives a checkpoint round trip
    default = build_optimizer(_build().param_groups(), OptimConfig(lr=0.1, weight_decay=5e-4))
    assert [g["weight_decay"] for g in default.param_groups] == [5e-4, 5e-4]


def test_forward_returns_the_losses_of_its_three_heads():
    d = _build(prompt_ce_weight=0.3, student_prompt_weight=0.6).eval()
    with torch.no_grad():
        d.prompt_head.bias.add_(torch.linspace(-1, 1, 10))  # z_P != z_T, so every term is non-trivial
    images, labels = _batch()
    out = d(images, labels, STEP)
    heads = d.eval_heads(images)
    expected = dfpt_losses(heads["student"], heads["prompt"], heads["teacher"], labels, d.hparams)
    assert torch.equal(out.logits, heads["student"])
    for name in LOSS_NAMES:
        assert out.losses[name].item() == pytest.approx(expected[name].item(), rel=1e-6)
        assert out.losses[name].item() > 0, name


# --- the prompt path starts as the teacher ------------------------------------------------

@pytest.mark.parametrize("method", ["dfpt-kd", "dfpt-kd+"])
@pytest.mark.parametrize("teacher", ["resnet14", "resnet8x4"])
@pytest.mark.parametrize("insert_after", [None, (0, 1, 2), (1,), ()])
@pytest.mark.parametrize("fusion", ["conv1x1", "gate"])
def test_prompt_path_logits_equal_the_teachers_at_initialisation(method, teacher, insert_after, fusion):
    d = _build(method, teacher, insert_after=insert_after, fusion=fusion).eval()
    images, _ = _batch()
    heads = d.eval_heads(images)
    reference = d.teacher(images)
    assert torch.equal(heads["teacher"], reference)
    torch.testing.assert_close(heads["prompt"], reference, rtol=1e-5, atol=1e-5)
    assert not torch.equal(heads["prompt"], heads["student"])


@pytest.mark.parametrize("method, extra", [("dfpt-kd", {}), ("dfpt-kd+", {"backbone_bn": "frozen"})])
def test_prompt_path_equals_the_teacher_in_training_mode_when_no_bn_statistics_move(method, extra):
    d = _build(method, **extra).train()
    images, labels = _batch()
    out = d(images, labels, STEP)
    assert out.losses["prompt_teacher"].item() == pytest.approx(0.0, abs=1e-6)


def test_dfpt_plus_copy_bn_uses_batch_statistics_by_default():
    d = _build("dfpt-kd+").train()
    assert all(m.training for m in d.prompt_backbone.modules())
    assert not any(m.training for m in d.teacher.modules())
    images, labels = _batch()
    assert d(images, labels, STEP).losses["prompt_teacher"].item() > 1e-4  # batch statistics differ from running ones
    frozen = _build("dfpt-kd+", backbone_bn="frozen").train()
    assert not any(m.training for m in frozen.prompt_backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))


# --- what trains ------------------------------------------------------------------------------

def test_dfpt_trains_only_prompt_blocks_fusions_and_prompt_head():
    d = _build()
    groups = {g["name"]: g for g in d.param_groups()}
    assert set(groups) == {"student", "prompt"}
    prompt = _ids([*d.prompt_blocks.parameters(), *d.fusions.parameters(), *d.prompt_head.parameters()])
    assert _ids(groups["prompt"]["params"]) == prompt and len(prompt) > 0
    assert _ids(groups["student"]["params"]) == _ids(d.student.parameters())
    assert not any(p.requires_grad for p in d.teacher.parameters())
    assert set(d.prompt_blocks) == set(d.fusions) == {"0", "1"}  # every stage but the last
    images, labels = _batch()
    sum(d(images, labels, STEP).losses.values()).backward()
    assert all(p.grad is None for p in d.teacher.parameters())
    assert all(p.grad is not None for g in groups.values() for p in g["params"])
    assert all(d.prompt_blocks[k].expand.weight.grad.abs().sum() > 0 for k in d.prompt_blocks)


def test_dfpt_plus_trains_a_deep_copy_of_the_stages_with_the_backbone_lr_multiplier():
    d = _build("dfpt-kd+", backbone_lr_mult=0.25)
    groups = {g["name"]: g for g in d.param_groups()}
    assert set(groups) == {"student", "prompt", "prompt_backbone"}
    assert groups["prompt_backbone"]["lr_mult"] == 0.25
    copy_classifier = _ids(d.prompt_backbone.classifier.parameters())
    assert _ids(groups["prompt_backbone"]["params"]) == _ids(d.prompt_backbone.parameters()) - copy_classifier
    teacher_storage = {p.data_ptr() for p in [*d.teacher.parameters(), *d.teacher.buffers()]}
    assert not teacher_storage & {p.data_ptr() for p in [*d.prompt_backbone.parameters(), *d.prompt_backbone.buffers()]}
    optimizer = build_optimizer(d.param_groups(), OptimConfig(lr=0.2))
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.2, 0.2, 0.05])
    images, labels = _batch()
    sum(d(images, labels, STEP).losses.values()).backward()
    assert all(p.grad is not None for p in groups["prompt_backbone"]["params"])
    assert all(p.grad is None for p in d.teacher.parameters())


def test_dfpt_plus_from_a_later_stage_leaves_the_earlier_stages_and_stem_to_the_teacher():
    d = _build("dfpt-kd+", finetune_from_stage=1)
    trained = _ids(next(g for g in d.param_groups() if g["name"] == "prompt_backbone")["params"])
    stages = d.prompt_backbone.stages
    assert trained == _ids([*stages[1].parameters(), *stages[2].parameters()])
    calls = {"teacher": 0, "copy": 0}
    d.teacher.stages[0].register_forward_hook(lambda *_: calls.__setitem__("teacher", calls["teacher"] + 1))
    stages[0].register_forward_hook(lambda *_: calls.__setitem__("copy", calls["copy"] + 1))
    d(*_batch(), STEP)
    assert calls == {"teacher": 1, "copy": 0}


def test_stop_gradients_between_the_student_and_the_prompt_path():
    for method in ("dfpt-kd", "dfpt-kd+"):
        d = _build(method)
        trained_prompt = [p for g in d.param_groups() if g["name"] != "student" for p in g["params"]]
        images, labels = _batch()
        losses = d(images, labels, STEP).losses
        (losses["prompt_ce"] + losses["prompt_teacher"] + losses["prompt_student"]).backward(retain_graph=True)
        assert all(p.grad is None for p in d.student.parameters()), "sg(z_S): the prompt loss reached the student"
        assert all(p.grad is not None for p in trained_prompt)
        d.zero_grad(set_to_none=True)
        (losses["student_ce"] + losses["student_teacher"] + losses["student_prompt"]).backward(retain_graph=True)
        assert all(p.grad is None for p in trained_prompt), "sg(z_P): the student loss reached the prompt path"
        assert all(p.grad is not None for p in d.student.parameters())
        d.zero_grad(set_to_none=True)
        losses["prompt_student"].backward(retain_graph=True)
        assert all(p.grad is None for p in d.student.parameters()) and d.prompt_head.weight.grad.abs().sum() > 0
        d.zero_grad(set_to_none=True)
        losses["student_prompt"].backward()
        assert all(p.grad is None for p in trained_prompt) and d.student.fc.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("method", ["dfpt-kd", "dfpt-kd+"])
def test_original_teacher_is_bit_identical_after_many_steps(method):
    d = _build(method)
    eval_images, _ = _batch(seed=9)
    before_state = {k: v.clone() for k, v in d.teacher.state_dict().items()}
    d.eval()
    before = d.eval_heads(eval_images)
    optimizer = build_optimizer(d.param_groups(), OptimConfig(lr=0.02, momentum=0.9, weight_decay=5e-4))
    d.train()
    for step in range(30):
        images, labels = _batch(seed=100 + step)
        loss = sum(d(images, labels, StepInfo(0, step, 1, 30)).losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    assert not any(m.training for m in d.teacher.modules())
    after_state = d.teacher.state_dict()
    assert after_state.keys() == before_state.keys()
    assert all(torch.equal(before_state[k], after_state[k]) for k in before_state), "a teacher parameter or buffer moved"
    d.eval()
    after = d.eval_heads(eval_images)
    assert torch.equal(after["teacher"], before["teacher"])
    assert (after["prompt"] - before["prompt"]).abs().max() > 1e-3  # the prompt path did train
    if method == "dfpt-kd+":
        assert not torch.equal(d.prompt_backbone.stages[1][0].conv1.weight, d.teacher.stages[1][0].conv1.weight)


# --- efficiency -----------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["dfpt-kd", "dfpt-kd+"])
def test_shared_stage_and_stem_run_once_per_step(method):
    d = _build(method).train()
    counted = {"stem": d.teacher.conv1, "stage0": d.teacher.stages[0], "stage2": d.teacher.stages[2]}
    if method == "dfpt-kd+":
        counted |= {"copy_stage0": d.prompt_backbone.stages[0], "copy_stage2": d.prompt_backbone.stages[2]}
    calls = dict.fromkeys(counted, 0)
    for name, module in counted.items():
        module.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    d(*_batch(), STEP)
    if method == "dfpt-kd":  # stage 0 shared; stage 2 runs on both paths
        assert calls == {"stem": 1, "stage0": 1, "stage2": 2}
    else:  # the copy runs the prompt path from the stem on
        assert calls == {"stem": 1, "stage0": 1, "stage2": 1, "copy_stage0": 1, "copy_stage2": 1}


def test_original_path_builds_no_autograd_graph():
    d = _build().train()
    seen = []
    d.teacher.stages[0].register_forward_hook(lambda _m, _i, out: seen.append(out.requires_grad))
    d(*_batch(), STEP)
    assert seen == [False]


# --- ablation switches ----------------------------------------------------------------------

ABLATIONS = [
    # (switch, changed state-dict prefixes, changed loss terms)
    ({"student_feedback": False}, set(), {"prompt_student"}),
    ({"teacher_anchor": False}, set(), {"prompt_teacher"}),
    ({"use_prompts": False}, {"prompt_blocks."}, set()),
    ({"use_fusion": False}, {"fusions."}, set()),
    ({"insert_after": (1,)}, {"prompt_blocks.", "fusions."}, set()),
    ({"kernels": (3,)}, {"prompt_blocks."}, set()),
    ({"r1": 2}, {"prompt_blocks."}, set()),
    ({"r2": 1.0}, {"prompt_blocks."}, set()),
    ({"head_init": "random"}, {"prompt_head."}, {"prompt_ce", "prompt_teacher", "prompt_student", "student_prompt"}),
]


@pytest.mark.parametrize("switch, changed_state, changed_losses", ABLATIONS, ids=lambda v: str(v) if isinstance(v, dict) else "")
def test_each_ablation_switch_changes_exactly_what_it_names(switch, changed_state, changed_losses):
    base, varied = _build("dfpt-kd", teacher="resnet8x4"), _build("dfpt-kd", teacher="resnet8x4", **switch)
    state_a, state_b = base.state_dict(), varied.state_dict()

    def named(key):
        return any(key.startswith(prefix) for prefix in changed_state)

    assert {k for k in state_a if not named(k)} == {k for k in state_b if not named(k)}
    for key in state_a:
        if not named(key):
            assert torch.equal(state_a[key], state_b[key]), key
    if changed_state:  # ... and the named part did change
        named_a, named_b = ({k: v for k, v in s.items() if named(k)} for s in (state_a, state_b))
        assert named_a.keys() != named_b.keys() or not all(torch.equal(named_a[k], named_b[k]) for k in named_a)
    for d in (base, varied):
        with torch.no_grad():
            d.prompt_head.bias.add_(torch.linspace(-1, 1, 10))  # z_P != z_T so both KL terms of the prompt path are live
    images, labels = _batch()
    losses_a = base.eval()(images, labels, STEP).losses
    losses_b = varied.eval()(images, labels, STEP).losses
    differing = {k for k in LOSS_NAMES if not torch.equal(losses_a[k], losses_b[k])}
    assert differing == changed_losses


def test_ablation_structures():
    assert len(_build(use_prompts=False).prompt_blocks) == 0
    assert len(_build(use_fusion=False).fusions) == 0
    d = _build(insert_after=(1,))
    assert set(d.prompt_blocks) == set(d.fusions) == {"1"}
    assert [len(b.groups) for b in _build(kernels=(3,)).prompt_blocks.values()] == [1, 1]
    assert [g[0].kernel_size for g in _build(kernels=(1, 9)).prompt_blocks["0"].groups] == [(1, 1), (9, 9)]
    wide = _build(teacher="resnet8x4", r1=2).prompt_blocks  # stage channels 64, 128, 256
    assert [b.reduce[0].out_channels for b in wide.values()] == [32, 64]
    assert _build(teacher="resnet8x4", r2=1.0).prompt_blocks["0"].passed_channels == 0
    random_head = _build(head_init="random")
    assert not torch.equal(random_head.prompt_head.weight, random_head.teacher.classifier.weight)
    assert torch.equal(_build().prompt_head.weight, _build().teacher.classifier.weight)


def test_ablated_variants_still_start_as_the_teacher_and_train():
    for switch in ({"use_prompts": False}, {"use_fusion": False}, {"use_prompts": False, "use_fusion": False}):
        d = _build(**switch).eval()
        images, labels = _batch()
        torch.testing.assert_close(d.eval_heads(images)["prompt"], d.teacher(images), rtol=1e-5, atol=1e-5)
        sum(d.train()(images, labels, STEP).losses.values()).backward()
        assert all(p.grad is not None for p in d.prompt_parameters())


# --- channel splitting --------------------------------------------------------------------

def test_split_channels_rule():
    assert split_channels(8, 0.5, 3) == [2, 1, 1]
    assert split_channels(16, 0.5, 3) == [3, 3, 2]
    assert split_channels(64, 1.0, 3) == [22, 21, 21]
    assert split_channels(8, 0.1, 3) == [1, 1, 1]  # at least one channel per group
    assert split_channels(10, 0.25, 2) == [2, 1]  # 2.5 rounds half up to 3
    with pytest.raises(ConfigError, match="kernel groups"):
        split_channels(8, 0.5, 9)


def test_small_teacher_channels_give_eight_prompt_channels_in_uneven_groups():
    d = _build(teacher="resnet14")  # stage channels 16, 32, 64
    block = d.prompt_blocks["0"]
    assert block.reduce[0].in_channels == 16 and block.reduce[0].out_channels == 8  # max(8, 16 // 4)
    assert block.group_channels == [2, 1, 1] and block.passed_channels == 4
    assert [g[0].kernel_size for g in block.groups] == [(3, 3), (5, 5), (7, 7)]
    assert d.prompt_blocks["1"].reduce[0].out_channels == 8  # max(8, 32 // 4)
    assert block.expand.out_channels == 16 and not block.expand.weight.any()
    images, labels = _batch()
    sum(d(images, labels, STEP).losses.values()).backward()
    assert all(p.grad is not None for p in block.parameters())


# --- bad input -----------------------------------------------------------------------------

def test_bad_hyperparameters_fail_with_clear_messages():
    with pytest.raises(ConfigError, match="insert_after"):
        _build(insert_after=(0, 3))
    with pytest.raises(ConfigError, match="finetune_from_stage"):
        _build("dfpt-kd+", finetune_from_stage=3)
    base = {"student": {"name": "resnet8"}, "teacher": {"name": "resnet14", "checkpoint": "t.pt"}}
    with pytest.raises(ConfigError, match="r2"):
        build_config(base, overrides=["method.name=dfpt-kd", "method.r2=0"])
    with pytest.raises(ConfigError, match="conv1x1.*gate"):
        build_config(base, overrides=["method.name=dfpt-kd", "method.fusion=attention"])
    with pytest.raises(ConfigError, match="copy.*random"):
        build_config(base, overrides=["method.name=dfpt-kd", "method.head_init=new"])
    with pytest.raises(ConfigError, match="prompt_wd_mult"):
        build_config(base, overrides=["method.name=dfpt-kd", "method.prompt_wd_mult=-1"])
    with pytest.raises(ConfigError, match="backbone_lr_mult"):
        build_config(base, overrides=["method.name=dfpt-kd", "method.backbone_lr_mult=0.5"])  # DFPT-KD+ only
    cfg = build_config(base, overrides=["method.name=dfpt-kd+", "method.kernels=[3, 5]", "method.insert_after=[0]"])
    assert cfg.method.hparams["kernels"] == (3, 5) and cfg.method.hparams["insert_after"] == (0,)


# --- end to end -------------------------------------------------------------------------------

@pytest.fixture
def digits_teacher(tiny_overrides):
    cfg = build_config(tiny_overrides, overrides={"name": "teacher", "student": {"name": "resnet14"}, "method": {"name": "ce"},
                                                  "train": {"epochs": 1}})
    run(cfg, echo=False)
    return str(run_dir_for(cfg) / "checkpoints" / "best.pt")


@pytest.mark.parametrize("method", ["dfpt-kd", "dfpt-kd+"])
def test_end_to_end_on_digits(method, tiny_overrides, digits_teacher):
    # clipping, as the recipes on CIFAR-10 do: the prompt path runs through frozen eval-mode BN and a
    # 1-epoch teacher can push it to diverge at lr 0.05 (docs/dfpt-kd.md, "Stability")
    cfg = build_config(tiny_overrides, overrides={"method": {"name": method}, "teacher": {"name": "resnet14", "checkpoint": digits_teacher},
                                                  "train": {"grad_clip": 1.0}})
    summary = run(cfg, echo=False)
    run_dir = run_dir_for(cfg)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    for line in lines:
        assert {f"loss/{name}" for name in LOSS_NAMES} <= set(line)
        assert {"val_acc/student", "val_acc/prompt", "val_acc/teacher", "test_acc/prompt", "test_acc/teacher"} <= set(line)
        assert line["val_acc/teacher"] == summary["teacher_val_acc"]  # the original path never changes
        assert line["test_acc/teacher"] == summary["teacher_test_acc"]
    assert summary["best_val_acc"] > 30
    best = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=False)
    assert set(best["state_dict"]) == set(create_model("resnet8", num_classes=10).state_dict())  # the student alone ships
    state = torch.load(run_dir / "checkpoints" / "state.pt", weights_only=False)["model"]
    assert any(k.startswith("prompt_blocks.") for k in state) and not any(k.startswith("teacher.") for k in state)
    assert any(k.startswith("prompt_backbone.") for k in state) == (method == "dfpt-kd+")
