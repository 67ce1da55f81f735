"""SimKD, CRD and ReviewKD: losses against independent hand computations, what trains and
what stays frozen, and short end-to-end runs on digits through gapkd.api.run."""
import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gapkd.api import build_distiller, evaluate_checkpoint, run, run_dir_for
from gapkd.config import build_config
from gapkd.data import build_data
from gapkd.engine.checkpoint import safe_load
from gapkd.errors import ConfigError
from gapkd.methods import METHODS, StepInfo, TaskInfo
from gapkd.methods.reviewkd import hierarchical_context_loss
from gapkd.models import Features, StagedNet, create_model

STEP = StepInfo(epoch=0, step=0, epochs=1, steps_per_epoch=1)
REPO = Path(__file__).resolve().parents[1]


class Tiny(StagedNet):
    """One 3x3 conv + ReLU stage and a linear head: feature maps small enough to check by hand."""

    def __init__(self, channels: int, stride: int, num_classes: int = 3, in_channels: int = 1):
        super().__init__(num_classes, in_channels, [channels])
        self.stage = nn.Sequential(nn.Conv2d(in_channels, channels, 3, stride, 1), nn.ReLU())
        self.fc = nn.Linear(channels, num_classes)

    def forward_stem(self, x):
        return x

    @property
    def stages(self):
        return [self.stage]

    @property
    def classifier(self):
        return self.fc

    def forward_features(self, x):
        pre = self.stage[0](x)
        out = torch.relu(pre)
        pooled = out.mean((2, 3))
        return Features([out], pooled, self.fc(pooled), preact=[pre])


def tiny_task(num_train=6, image_size=4):
    return TaskInfo(num_classes=3, in_channels=1, image_size=image_size, num_train=num_train)


def conv_map(x, conv):
    """Independent stage output: conv then ReLU, from the conv's weights."""
    return torch.relu(F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding))


def batch_norm_train(x, bn):
    """BatchNorm in training mode, written out: batch mean and biased variance over (N, H, W)."""
    mean = x.mean((0, 2, 3), keepdim=True)
    var = x.var((0, 2, 3), unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + bn.eps) * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]


def block_mean(x, size):
    """Average pooling to ``size`` when the map's sides are multiples of it, by reshaping."""
    n, c, h, w = x.shape
    return x.reshape(n, c, size, h // size, size, w // size).mean((3, 5))


# ----------------------------------------------------------------------------------------- SimKD


@pytest.mark.parametrize("student_stride, teacher_stride", [(1, 2), (2, 1), (1, 1)])
def test_simkd_loss_and_logits_match_hand_computation(student_stride, teacher_stride):
    torch.manual_seed(0)
    student, teacher = Tiny(3, student_stride), Tiny(4, teacher_stride)
    simkd = METHODS.get("simkd")(student, teacher, task=tiny_task(), factor=2, ce_weight=0.5, feature_weight=2.0).train()
    x, y = torch.randn(3, 1, 4, 4), torch.tensor([0, 2, 1])
    out = simkd(x, y, STEP)

    with torch.no_grad():
        s_map, t_map = conv_map(x, student.stage[0]), conv_map(x, teacher.stage[0])
        side = min(s_map.shape[-1], t_map.shape[-1])
        s_map, t_map = block_mean(s_map, side), block_mean(t_map, side)  # the larger map is pooled
        layers = list(simkd.student.projector.layers)
        z = s_map
        for conv, bn in ((layers[0], layers[1]), (layers[3], layers[4]), (layers[6], layers[7])):
            z = torch.relu(batch_norm_train(F.conv2d(z, conv.weight, padding=conv.padding), bn))
        mse = ((z - t_map) ** 2).mean()
        logits = z.mean((2, 3)) @ teacher.fc.weight.T + teacher.fc.bias  # the teacher's classifier
        ce = -torch.log_softmax(logits, 1)[torch.arange(3), y].mean()
    assert out.losses["simkd"].item() == pytest.approx(2.0 * mse.item(), rel=1e-5)
    assert out.losses["ce"].item() == pytest.approx(0.5 * ce.item(), rel=1e-5)
    assert torch.allclose(out.logits, logits, atol=1e-5)


def test_simkd_projector_follows_the_paper_and_deployable_holds_it_with_the_teacher_classifier():
    student, teacher = create_model("resnet8", num_classes=10), create_model("resnet14", num_classes=10)
    simkd = METHODS.get("simkd")(student, teacher, task=TaskInfo(10, 3, 32, 100))
    deployable = simkd.deployable()
    layers = list(deployable.projector.layers)
    kinds = [type(m).__name__ for m in layers]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU"] * 3
    shapes = [(m.in_channels, m.out_channels, m.kernel_size) for m in layers if isinstance(m, nn.Conv2d)]
    assert shapes == [(64, 32, (1, 1)), (32, 32, (3, 3)), (32, 64, (1, 1))]  # teacher 64 channels, factor 2
    assert deployable.classifier is teacher.fc and deployable.backbone is student
    keys = deployable.state_dict().keys()
    assert {"projector.layers.0.weight", "teacher_classifier.weight", "teacher_classifier.bias"} <= set(keys)
    x = torch.randn(2, 3, 32, 32)
    deployable.eval()
    with torch.no_grad():
        expected = teacher.fc(deployable.projector(student.layer3(student.layer2(student.layer1(student.forward_stem(x))))).mean((2, 3)))
        assert torch.allclose(deployable(x), expected, atol=1e-5)
        assert torch.equal(simkd.eval_heads(x)["student"], deployable(x))


# ------------------------------------------------------------------------------------------- CRD


def _unit(rows):
    rows = np.asarray(rows, dtype=np.float64)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def _nce_reference(anchor, bank, candidates, z, num_data):
    """CRD Eq. 18 by hand: P = exp(<bank row, anchor> / T) / Z; positive first."""
    k = candidates.shape[1] - 1
    m_pn = k / num_data
    total = 0.0
    for b in range(len(anchor)):
        p = np.exp(bank[candidates[b]] @ anchor[b] / 0.07) / z
        total += math.log(p[0] / (p[0] + m_pn + 1e-7)) + sum(math.log(m_pn / (q + m_pn + 1e-7)) for q in p[1:])
    return -total / len(anchor)


def _tiny_crd(**hyper):
    torch.manual_seed(0)
    ids = torch.tensor([10, 3, 7, 12, 5])  # stable ids of 5 training samples, not 0..4
    task = TaskInfo(num_classes=3, in_channels=1, image_size=4, num_train=5, train_ids=ids, train_labels=torch.tensor([0, 1, 1, 2, 0]))
    hyper = {"feature_dim": 3, "num_negatives": 2, **hyper}
    return METHODS.get("crd")(Tiny(2, 1), Tiny(4, 1), task=task, **hyper).train()


def test_crd_contrast_matches_eq18_and_updates_memory_with_momentum():
    crd = _tiny_crd(momentum=0.5)
    n = 5
    mem_s = _unit([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1]])
    mem_t = _unit([[1, 2, 0], [0, 1, 3], [2, 0, 1], [1, 0, 1], [1, 1, 1]])
    crd.memory_student.copy_(torch.tensor(mem_s, dtype=torch.float32))
    crd.memory_teacher.copy_(torch.tensor(mem_t, dtype=torch.float32))
    v_s, v_t = _unit([[1, 0.5, 0], [0, 1, -1]]), _unit([[0.2, 1, 0], [1, 0, 1]])
    rows, negatives = torch.tensor([1, 3]), torch.tensor([[0, 4], [2, 2]])
    loss = crd.contrast(torch.tensor(v_s, dtype=torch.float32), torch.tensor(v_t, dtype=torch.float32), rows, negatives)

    candidates = np.array([[1, 0, 4], [3, 2, 2]])
    # Z is the first batch's mean score times the bank size, for each anchor side
    z_s = np.mean([np.exp(mem_t[candidates[b]] @ v_s[b] / 0.07) for b in range(2)]) * n
    z_t = np.mean([np.exp(mem_s[candidates[b]] @ v_t[b] / 0.07) for b in range(2)]) * n
    expected = _nce_reference(v_s, mem_t, candidates, z_s, n) + _nce_reference(v_t, mem_s, candidates, z_t, n)
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    assert crd.normalizers.tolist() == pytest.approx([z_s, z_t], rel=1e-5)

    new_s, new_t = mem_s.copy(), mem_t.copy()
    new_s[[1, 3]] = _unit(0.5 * mem_s[[1, 3]] + 0.5 * v_s)
    new_t[[1, 3]] = _unit(0.5 * mem_t[[1, 3]] + 0.5 * v_t)
    assert np.allclose(crd.memory_student.numpy(), new_s, atol=1e-6)
    assert np.allclose(crd.memory_teacher.numpy(), new_t, atol=1e-6)

    # Z is fixed after the first batch
    crd.contrast(torch.tensor(v_s, dtype=torch.float32), torch.tensor(v_t, dtype=torch.float32), rows, negatives)
    assert crd.normalizers.tolist() == pytest.approx([z_s, z_t], rel=1e-5)


def test_crd_forward_combines_embeddings_contrast_ce_and_kd(monkeypatch):
    crd = _tiny_crd(ce_weight=0.7, kd_weight=0.4, crd_weight=0.8, temperature=2.0)
    negatives = torch.tensor([[0, 4], [2, 4]])
    monkeypatch.setattr(crd, "sample_negatives", lambda rows, draw: negatives)
    mem_s, mem_t = crd.memory_student.clone().double().numpy(), crd.memory_teacher.clone().double().numpy()
    x, y = torch.randn(2, 1, 4, 4), torch.tensor([1, 2])
    out = crd(x, y, StepInfo(0, 0, 1, 1, indices=torch.tensor([3, 12])))  # ids 3 and 12 are bank rows 1 and 3

    with torch.no_grad():
        s_pooled = conv_map(x, crd.student.stage[0]).mean((2, 3))
        t_pooled = conv_map(x, crd.teacher.stage[0]).mean((2, 3))
        embed = lambda f, lin: _unit((f @ lin.weight.T + lin.bias).double().numpy())  # noqa: E731
        v_s, v_t = embed(s_pooled, crd.embed_student.linear), embed(t_pooled, crd.embed_teacher.linear)
        s_logits, t_logits = crd.student.fc(s_pooled), crd.teacher.fc(t_pooled)
    candidates = np.array([[1, 0, 4], [3, 2, 4]])
    z_s = np.mean([np.exp(mem_t[candidates[b]] @ v_s[b] / 0.07) for b in range(2)]) * 5
    z_t = np.mean([np.exp(mem_s[candidates[b]] @ v_t[b] / 0.07) for b in range(2)]) * 5
    contrast = _nce_reference(v_s, mem_t, candidates, z_s, 5) + _nce_reference(v_t, mem_s, candidates, z_t, 5)
    p_t, log_q = torch.softmax(t_logits / 2, 1), torch.log_softmax(s_logits / 2, 1)
    kd = (p_t * (torch.log(p_t) - log_q)).sum(1).mean() * 4
    ce = -torch.log_softmax(s_logits, 1)[torch.arange(2), y].mean()
    assert out.losses["crd"].item() == pytest.approx(0.8 * contrast, rel=1e-4)
    assert out.losses["kd"].item() == pytest.approx(0.4 * kd.item(), rel=1e-5)
    assert out.losses["ce"].item() == pytest.approx(0.7 * ce.item(), rel=1e-5)
    assert torch.allclose(out.logits, s_logits, atol=1e-6)


@pytest.mark.parametrize("mode", ["other-class", "any"])
def test_crd_negatives_are_uniform_over_the_allowed_rows(mode):
    crd = _tiny_crd(negatives=mode, num_negatives=6000)
    labels = torch.tensor([0, 1, 1, 2, 0])
    rows = torch.tensor([0, 1, 3])
    drawn = crd.sample_negatives(rows, crd.negative_draws(7, 3, torch.device("cpu")))
    assert drawn.shape == (3, 6000)
    for row, negatives in zip(rows.tolist(), drawn):
        allowed = [r for r in range(5) if r != row and (mode == "any" or labels[r] != labels[row])]
        counts = torch.bincount(negatives, minlength=5)
        assert sorted(torch.nonzero(counts).flatten().tolist()) == allowed  # every allowed row, nothing else
        share = counts[allowed].double() / 6000
        assert torch.all((share - 1 / len(allowed)).abs() < 0.03)  # uniform (binomial sd < 0.007)
    # drawn from the run's seed and the step, not from the global RNG (which differs between DDP processes)
    torch.manual_seed(123)
    assert torch.equal(crd.sample_negatives(rows, crd.negative_draws(7, 3, torch.device("cpu"))), drawn)
    assert not torch.equal(crd.sample_negatives(rows, crd.negative_draws(8, 3, torch.device("cpu"))), drawn)
    assert _tiny_crd(negatives=mode, num_negatives=6000).negative_seed == crd.negative_seed  # the same seed, the same draws


def test_crd_bank_is_keyed_by_training_ids_of_a_carved_split(tiny_overrides, tmp_path):
    cfg = build_config(tiny_overrides, overrides=["student.name=resnet8"])
    bundle = build_data(cfg.data, torch.device("cpu"), 0)
    train_ids = bundle.data.train.indices
    assert int(train_ids.max()) + 1 > len(train_ids)  # validation rows were carved out: ids are not 0..n-1
    teacher = create_model("resnet14", num_classes=10, in_channels=1)
    torch.save(teacher.state_dict(), tmp_path / "t.pt")
    crd_cfg = build_config(tiny_overrides, overrides=["method.name=crd", "teacher.name=resnet14", f"teacher.checkpoint={tmp_path / 't.pt'}"])
    crd = build_distiller(crd_cfg, bundle.data, bundle.train.num_samples)
    assert crd.memory_student.shape == (len(train_ids), 128) and crd.memory_teacher.shape == (len(train_ids), 128)
    assert torch.equal(crd.bank_rows(train_ids[[5, 0, 17]]), torch.tensor([5, 0, 17]))
    val_id = bundle.val.indices[:1]
    crd._ids_checked = False
    with pytest.raises(ValueError, match="not in the training split"):
        crd.bank_rows(val_id)


# -------------------------------------------------------------------------------------- ReviewKD


def test_hierarchical_context_loss_matches_hand_computation():
    torch.manual_seed(0)
    a8, b8 = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    a2, b2 = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    a1, b1 = torch.randn(2, 5, 1, 1), torch.randn(2, 5, 1, 1)
    mse = lambda u, v: float(((u.double() - v.double()) ** 2).mean())  # noqa: E731
    # 8x8: full + 1/2 at 4x4 + 1/4 at 2x2 + 1/8 at 1x1, over 1 + 1/2 + 1/4 + 1/8
    level8 = (mse(a8, b8) + mse(block_mean(a8, 4), block_mean(b8, 4)) / 2 + mse(block_mean(a8, 2), block_mean(b8, 2)) / 4
              + mse(block_mean(a8, 1), block_mean(b8, 1)) / 8) / 1.875
    level2 = (mse(a2, b2) + mse(block_mean(a2, 1), block_mean(b2, 1)) / 2) / 1.5  # 4 and 2 are not below 2
    level1 = mse(a1, b1)
    got = hierarchical_context_loss([a8, a2, a1], [b8, b2, b1])
    assert got.item() == pytest.approx(level8 + level2 + level1, rel=1e-5)


@pytest.mark.parametrize("epoch, ramp", [(0, 0.05), (9, 0.5), (19, 1.0), (100, 1.0)])
def test_reviewkd_fusion_and_loss_match_hand_computation(epoch, ramp):
    torch.manual_seed(0)
    student, teacher = Tiny(3, 1), Tiny(4, 2)  # student map 4x4, teacher map 2x2
    review = METHODS.get("reviewkd")(student, teacher, task=tiny_task(), review_weight=2.0, ce_weight=0.5).train()
    x, y = torch.randn(3, 1, 4, 4), torch.tensor([0, 1, 2])
    out = review(x, y, StepInfo(epoch, 0, 200, 1))

    deep, shallow = review.fusions[1], review.fusions[0]
    assert deep.attention is None and shallow.attention is not None
    with torch.no_grad():
        conv = lambda z, c: F.conv2d(z, c.weight, c.bias, padding=c.padding)  # noqa: E731
        s_map = conv_map(x, student.stage[0])
        s_pooled = s_map.mean((2, 3))[:, :, None, None]
        # deepest level: the pooled feature, reduced then mapped to the teacher's pooled channels
        deep_mid = batch_norm_train(conv(s_pooled, deep.reduce[0]), deep.reduce[1])
        deep_out = batch_norm_train(conv(deep_mid, deep.output[0]), deep.output[1])
        # stage level: reduce, blend with the (broadcast) deeper level by sigmoid attention, take every
        # second pixel (nearest resize 4x4 -> 2x2 to the teacher's size), map to the teacher's channels
        mid = batch_norm_train(conv(s_map, shallow.reduce[0]), shallow.reduce[1])
        deeper = deep_mid.expand_as(mid)
        att = torch.sigmoid(conv(torch.cat([mid, deeper], 1), shallow.attention[0]))
        fused = (mid * att[:, :1] + deeper * att[:, 1:])[:, :, ::2, ::2]
        shallow_out = batch_norm_train(conv(fused, shallow.output[0]), shallow.output[1])
        t_pre = F.conv2d(x, teacher.stage[0].weight, teacher.stage[0].bias, 2, 1)  # pre-activation target
        t_pooled = torch.relu(t_pre).mean((2, 3))[:, :, None, None]
        hcl = (((shallow_out - t_pre) ** 2).mean() + ((shallow_out.mean((2, 3)) - t_pre.mean((2, 3))) ** 2).mean() / 2) / 1.5
        hcl = hcl + ((deep_out - t_pooled) ** 2).mean()
        ce = -torch.log_softmax(student.fc(s_map.mean((2, 3))), 1)[torch.arange(3), y].mean()
    assert out.losses["reviewkd"].item() == pytest.approx(2.0 * ramp * hcl.item(), rel=1e-5)
    assert out.losses["ce"].item() == pytest.approx(0.5 * ce.item(), rel=1e-5)


def test_reviewkd_refuses_a_teacher_without_preactivations_unless_asked():
    class NoPreact(Tiny):
        def forward_features(self, x):
            f = super().forward_features(x)
            return Features(f.stages, f.pooled, f.logits)

    with pytest.raises(ConfigError, match="teacher_preact=false"):
        METHODS.get("reviewkd")(Tiny(3, 1), NoPreact(4, 1), task=tiny_task())
    METHODS.get("reviewkd")(Tiny(3, 1), NoPreact(4, 1), task=tiny_task(), teacher_preact=False)


def test_cifar_resnet_preactivations_are_the_stage_outputs_before_their_last_relu():
    model = create_model("resnet8", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = model.forward_features(x)
        last_block = model.layer2[-1]
        entry = model.layer1(model.forward_stem(x))
        by_hand = last_block.bn2(last_block.conv2(last_block.relu(last_block.bn1(last_block.conv1(entry))))) + last_block.downsample(entry)
        assert torch.allclose(features.preact[1], by_hand, atol=1e-6)
        assert all(torch.equal(torch.relu(p), s) for p, s in zip(features.preact, features.stages))
        assert all((p < 0).any() for p in features.preact) and torch.equal(features.logits, model(x))


def test_reviewkd_levels_of_cifar_resnets_follow_the_original():
    review = METHODS.get("reviewkd")(create_model("resnet8x4", num_classes=100), create_model("resnet32x4", num_classes=100),
                                     task=TaskInfo(100, 3, 32, 10))
    # the original's resnet8x4 setting: in/out channels 64, 128, 256, 256 (three stages + pooled), fusion width 256
    assert [f.reduce[0].in_channels for f in review.fusions] == [64, 128, 256, 256]
    assert [f.output[0].out_channels for f in review.fusions] == [64, 128, 256, 256]
    assert {f.reduce[0].out_channels for f in review.fusions} == {256}
    assert [f.attention is not None for f in review.fusions] == [True, True, True, False]


# ----------------------------------------------------------------- what trains, what stays frozen


def _trainable_names(name, distiller):
    params = dict(distiller.named_parameters())
    if name == "simkd":  # backbone without its own classifier, and the projector
        return {k for k in params if k.startswith(("student.backbone.", "student.projector.")) and ".fc." not in k}
    extra = "embed_" if name == "crd" else "fusions."
    return {k for k in params if k.startswith(("student.", extra))}


@pytest.mark.parametrize("name, hyper", [("simkd", {}), ("crd", {"num_negatives": 32}), ("reviewkd", {"warmup_epochs": 0})])
def test_gradients_reach_exactly_the_trained_parameters_and_the_teacher_stays_identical(name, hyper):
    torch.manual_seed(0)
    student, teacher = create_model("resnet8", num_classes=10), create_model("resnet14", num_classes=10)
    task = TaskInfo(10, 3, 16, 40, torch.arange(40), torch.arange(40) % 10)
    distiller = METHODS.get(name)(student, teacher, task=task, **hyper).train()
    teacher_before = copy.deepcopy(teacher.state_dict())
    x, y, ids = torch.randn(8, 3, 16, 16), torch.arange(8) % 10, torch.arange(8) * 5

    out = distiller(x, y, StepInfo(0, 0, 1, 1, ids))
    sum(out.losses.values()).backward()
    reached = {k for k, p in distiller.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    expected = _trainable_names(name, distiller)
    assert reached == expected
    grouped = {id(p) for g in distiller.param_groups() for p in g["params"]}
    assert grouped == {id(p) for k, p in distiller.named_parameters() if k in expected}

    optimizer = torch.optim.SGD([p for g in distiller.param_groups() for p in g["params"]], lr=0.1, momentum=0.9)
    for step in range(3):
        optimizer.zero_grad()
        out = distiller(x, y, StepInfo(0, step, 1, 3, ids))
        sum(out.losses.values()).backward()
        optimizer.step()
    assert not teacher.training
    after = teacher.state_dict()
    assert all(torch.equal(teacher_before[k], after[k]) for k in teacher_before)  # weights and BN statistics


# ---------------------------------------------------------------------------- end to end on digits


def _distill_cfg(tiny_overrides, teacher, method, *extra):
    return build_config(tiny_overrides, overrides=[f"name={method}", f"method.name={method}", "teacher.name=resnet14",
                                                    f"teacher.checkpoint={teacher}", *extra])


def test_simkd_end_to_end_checkpoint_evaluates_like_the_in_training_deployable(tiny_overrides, digits_teacher):
    cfg = _distill_cfg(tiny_overrides, digits_teacher, "simkd", "train.epochs=4")  # MSE alone learns slowly
    summary = run(cfg, echo=False)
    best = run_dir_for(cfg) / "checkpoints" / "best.pt"
    payload = safe_load(best)
    assert payload["model"] == "resnet8" and payload["deployable"]["method"] == "simkd"
    assert {"projector.layers.0.weight", "teacher_classifier.weight"} <= set(payload["state_dict"])
    evaluated = evaluate_checkpoint(best, cfg.data, device="cpu", amp=cfg.train.amp)
    assert evaluated["val_acc"] == summary["best_val_acc"]
    assert evaluated["test_acc"] == summary["test_acc_at_best_val"]
    assert summary["best_val_acc"] > 30  # learns through the teacher's classifier (chance is 10)
    losses = [json.loads(x) for x in (run_dir_for(cfg) / "metrics.jsonl").read_text().splitlines()]
    assert "loss/simkd" in losses[0] and "loss/ce" not in losses[0]


def test_simkd_checkpoint_refuses_a_plain_student_load(tiny_overrides, digits_teacher):
    from gapkd.errors import CheckpointError
    from gapkd.models import load_checkpoint

    cfg = _distill_cfg(tiny_overrides, digits_teacher, "simkd", "train.epochs=1")
    run(cfg, echo=False)
    with pytest.raises(CheckpointError, match="unexpected keys"):
        load_checkpoint(create_model("resnet8", num_classes=10, in_channels=1), run_dir_for(cfg) / "checkpoints" / "best.pt")


def test_crd_end_to_end_and_resume_is_exact(tiny_overrides, digits_teacher, killed_then_resumed):
    extra = ["method.num_negatives=256"]
    straight = _distill_cfg(tiny_overrides, digits_teacher, "crd", *extra)
    summary = run(straight, echo=False)
    assert summary["best_val_acc"] > 30

    interrupted = build_config(straight.model_dump(), overrides=["name=crd-interrupted"])
    killed_then_resumed(interrupted)
    a = safe_load(run_dir_for(straight) / "checkpoints" / "state.pt")["model"]
    b = safe_load(run_dir_for(interrupted) / "checkpoints" / "state.pt")["model"]
    assert {"memory_student", "memory_teacher", "normalizers"} <= set(a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_reviewkd_end_to_end(tiny_overrides, digits_teacher):
    cfg = _distill_cfg(tiny_overrides, digits_teacher, "reviewkd", "method.warmup_epochs=1")
    summary = run(cfg, echo=False)
    assert summary["best_val_acc"] > 30
    losses = [json.loads(x) for x in (run_dir_for(cfg) / "metrics.jsonl").read_text().splitlines()]
    assert all(x["loss/reviewkd"] > 0 for x in losses)
    payload = safe_load(run_dir_for(cfg) / "checkpoints" / "best.pt")
    assert "deployable" not in payload and not any(k.startswith("fusions") for k in payload["state_dict"])
