"""Folding a frozen teacher's BatchNorm into its convolutions: same outputs, fewer layers, and
models where folding would change an output are left alone."""
import copy

import pytest
import torch
from torch import nn

from gapkd.api import build_config, prepare_distiller
from gapkd.data import build_data
from gapkd.models import create_model
from gapkd.models.fold import fold_batchnorm


def calibrated(name: str, size: int = 32, channels: int = 3) -> nn.Module:
    """A zoo model with non-trivial BatchNorm statistics and affine parameters, in eval mode."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_channels=channels).train()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
        for _ in range(3):
            model(torch.randn(16, channels, size, size) * 2 + 0.5)
    return model.eval().requires_grad_(False)


def batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("name", ["resnet20", "resnet8x4", "wrn_16_2", "vgg8", "MobileNetV2", "ShuffleV1", "ShuffleV2", "resnet18"])
def test_folded_zoo_models_compute_the_same_features(name):
    model = calibrated(name)
    reference = copy.deepcopy(model)
    before = batchnorms(model)
    folded = fold_batchnorm(model, torch.randn(2, 3, 32, 32))
    assert folded > 0
    assert batchnorms(model) == before - folded
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        ref, out = reference.forward_features(x), model.forward_features(x)
    for a, b in zip([*ref.stages, ref.pooled, ref.logits], [*out.stages, out.pooled, out.logits]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * max(1.0, float(a.abs().max())))


def test_every_conv_bn_pair_of_a_resnet_is_folded():
    model = calibrated("resnet20")
    # 19 convs each followed by a BN, plus 2 projection shortcuts (1x1 conv, BN)
    assert fold_batchnorm(model, torch.randn(2, 3, 32, 32)) == 21
    assert batchnorms(model) == 0


class SharedConvOutput(nn.Module):
    """bn(conv(x)) + conv(x): folding bn into conv would change the second use."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_a_model_whose_conv_output_is_reused_is_left_unchanged():
    model = SharedConvOutput()
    with torch.no_grad():
        model.bn.running_mean.fill_(0.3)
        model.bn.running_var.fill_(2.0)
    model.eval()
    state = copy.deepcopy(model.state_dict())
    assert fold_batchnorm(model, torch.randn(2, 3, 8, 8)) == 0
    assert isinstance(model.bn, nn.BatchNorm2d)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])


def test_training_mode_is_refused():
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(create_model("resnet8", num_classes=10), torch.randn(2, 3, 32, 32))


def _digits_cfg(tmp_path, method, **train):
    teacher = tmp_path / "teacher.pt"
    torch.save({"format": "gapkd-model", "model": "resnet8", "num_classes": 10,
                "state_dict": calibrated("resnet8", 8, 1).state_dict()}, teacher)
    return build_config({
        "out_dir": str(tmp_path), "data": {"name": "digits"}, "student": {"name": "resnet8"},
        "teacher": {"name": "resnet8", "checkpoint": str(teacher)}, "method": {"name": method},
        "train": {"device": "cpu", **train},
    })


@pytest.mark.parametrize("method", ["kd", "dfpt-kd+"])
def test_prepare_distiller_folds_only_the_frozen_teacher(tmp_path, method):
    cfg = _digits_cfg(tmp_path, method, amp="off")
    bundle = build_data(cfg.data, torch.device("cpu"), 0)
    folded = prepare_distiller(cfg, bundle, torch.device("cpu"))
    plain = prepare_distiller(cfg.model_copy(update={"train": cfg.train.model_copy(update={"fold_teacher_bn": False})}),
                              bundle, torch.device("cpu"))
    assert batchnorms(folded.teacher) == 0 and batchnorms(plain.teacher) > 0
    assert batchnorms(folded.student) == batchnorms(plain.student) > 0  # the student trains its BatchNorm
    if method == "dfpt-kd+":  # the fine-tuned copy of teacher stages keeps (and trains) its BatchNorm
        assert batchnorms(folded) - batchnorms(folded.teacher) == batchnorms(plain) - batchnorms(plain.teacher)
    images = next(iter(bundle.test.epoch(0))).images
    with torch.no_grad():
        torch.testing.assert_close(folded.teacher(images), plain.teacher(images), rtol=1e-4, atol=1e-4)


def test_fold_setting_changes_the_run_hash_only_when_turned_off(tmp_path):
    on = _digits_cfg(tmp_path, "kd")
    off = _digits_cfg(tmp_path, "kd", fold_teacher_bn=False)
    default_payload = on.model_dump(mode="json")
    assert default_payload["train"]["fold_teacher_bn"] is True
    assert on.hparams_hash() != off.hparams_hash()
    same = _digits_cfg(tmp_path, "kd", fold_teacher_bn=True)
    assert same.hparams_hash() == on.hparams_hash()


def test_compiled_training_step_matches_eager(tmp_path):
    """train.compile traces the distiller's forward with torch.compile; the 'eager' backend runs
    the captured graph without code generation, so the losses must equal eager mode's."""
    cfg = _digits_cfg(tmp_path, "kd", amp="off")
    bundle = build_data(cfg.data, torch.device("cpu"), 0)
    batch = next(iter(bundle.train.epoch(0)))
    from gapkd.methods import StepInfo

    info = StepInfo(0, 0, 1, 1, batch.indices)
    torch.manual_seed(1)
    eager = prepare_distiller(cfg, bundle, torch.device("cpu")).train()
    torch.manual_seed(1)
    compiled_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"compile": "eager"})})
    compiled = prepare_distiller(compiled_cfg, bundle, torch.device("cpu")).train()
    expected = eager(batch.images, batch.labels, info).losses
    got = compiled(batch.images, batch.labels, info).losses
    assert compiled._compiled_call_impl is not None
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name])
