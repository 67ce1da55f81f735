"""The whole model zoo (the one test file for models): every architecture, its stages, parameter counts, checkpoint layouts of the
RepDistiller / mdistiller / SimKD / torchvision codebases, and the adapter for users' own models."""
import copy
import hashlib

import pytest
import torch
from torch import nn

from gapkd.errors import CheckpointError, ConfigError
from gapkd.methods import METHODS
from gapkd.methods.base import StepInfo
from gapkd.models import MODELS, create_model, list_models, load_checkpoint, wrap_model
from gapkd.models.info import describe_model

# Every architecture but the CIFAR ResNets (resnet8 ... resnet32x4), which test_cifar_resnet_forward_backward_and_stages covers.
NEW_MODELS = [name for name in list_models() if MODELS.get(name).family != "cifar-resnet" or name.endswith("_cifar")]
CIFAR_RESNETS = ["resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet8x4", "resnet32x4"]

# Stage channels as the original zoos define them (see docs/models.md for what each stage holds).
STAGE_CHANNELS = {
    "wrn_16_1": [16, 32, 64], "wrn_16_2": [32, 64, 128], "wrn_40_1": [16, 32, 64], "wrn_40_2": [32, 64, 128],
    **{f"vgg{d}": [128, 256, 512, 512] for d in (8, 11, 13, 16, 19)},
    "MobileNetV2": [12, 16, 48, 160, 1280], "MobileNetV2_1_0": [24, 32, 96, 320, 1280],
    "MobileNetV2_Imagenet": [24, 32, 96, 320, 1280],
    "ShuffleV1": [240, 480, 960], "ShuffleV2": [116, 232, 464, 1024], "ShuffleV2_1_5": [176, 352, 704, 1024],
    **{f"resnet{d}{s}": [64, 128, 256, 512] for d in (18, 34) for s in ("", "_cifar")},
    **{f"resnet{d}{s}": [256, 512, 1024, 2048] for d in (50, 101) for s in ("", "_cifar")},
}

# Published parameter counts (millions, CIFAR-100 heads), docs/published-results.md
PUBLISHED_M = {"resnet8": 0.08, "resnet14": 0.18, "resnet20": 0.28, "resnet32": 0.47, "resnet44": 0.67, "resnet56": 0.86,
               "resnet110": 1.74, "resnet8x4": 1.23, "resnet32x4": 7.43,
               "wrn_16_1": 0.18, "wrn_16_2": 0.70, "wrn_40_1": 0.57, "wrn_40_2": 2.26, "vgg8": 3.97, "vgg11": 9.28,
               "vgg13": 9.46, "vgg16": 14.77, "vgg19": 20.09, "MobileNetV2": 0.81, "ShuffleV1": 0.95, "ShuffleV2": 1.36,
               "resnet50_cifar": 23.71}

# torchvision's documented parameter counts at 1000 classes
TORCHVISION_PARAMS = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032, "resnet101": 44_549_160,
                      "MobileNetV2_Imagenet": 3_504_872}

# (number of tensors, sha1 of the sorted "key:shape" lines)[:16] of the state dicts that the original code
# builds at 100 classes: RepDistiller models/*.py @b84f547, SimKD models/*.py @2b389c3 (MobileNetV2_1_0,
# ShuffleV2_1_5), torchvision 0.28 (resnet*, mobilenet_v2). Computed once from that code, which is not vendored.
FOREIGN_LAYOUTS = {
    "wrn_16_1": (82, "d63f675b4daedbca"), "wrn_16_2": (83, "672c19730a52f172"),
    "wrn_40_1": (226, "f518e61dec66cc40"), "wrn_40_2": (227, "9303544e45bfe084"),
    "vgg8": (37, "cccc6df644d950e5"), "vgg11": (58, "3cc7bd26e9268378"), "vgg13": (72, "85d262b0c680e48c"),
    "vgg16": (93, "9fc34865c6bc13b9"), "vgg19": (114, "d24385c16573be93"),
    "MobileNetV2": (320, "e33ad8ebac326584"), "MobileNetV2_1_0": (320, "339a06def023a744"),
    "ShuffleV1": (296, "38b2972fbe8f20c7"), "ShuffleV2": (338, "8a87fab55985a1c0"), "ShuffleV2_1_5": (338, "0c465223af61f870"),
    "resnet18": (122, "a4fc7a252f08f8d7"), "resnet34": (218, "bc1d58d08db85691"), "resnet50": (320, "b3311f1749ce5ae1"),
    "resnet101": (626, "0b4c0d4a78bf874d"), "MobileNetV2_Imagenet": (314, "93d6c42385498150"),
}
# RepDistiller's resnetv2.py names the CIFAR ResNet's shortcut `shortcut` and its classifier `linear`
REPDISTILLER_RESNETV2 = {"resnet18_cifar": (122, "bc8601ddcde2fd7b"), "resnet50_cifar": (320, "99813486061e8af8")}


def layout_fingerprint(state):
    lines = "\n".join(f"{k}:{tuple(v.shape)}" for k, v in sorted(state.items()))
    return len(state), hashlib.sha1(lines.encode()).hexdigest()[:16]


def to_repdistiller_resnetv2(state):
    return {k.replace(".downsample.", ".shortcut.").replace("fc.", "linear.", 1) if k.startswith("fc.") or ".downsample." in k else k: v
            for k, v in state.items()}


def image_size(name):
    return 64 if MODELS.get(name).input_size == 224 else 32


def randomise_batch_norm(model):
    """Non-trivial BN statistics, so a load that misses a buffer changes the outputs."""
    generator = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=generator) - 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator) + 0.5)
    return model


# --- architecture -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NEW_MODELS)
def test_forward_backward_stages_and_stage_by_stage_running(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7)
    size = image_size(name)
    x = torch.randn(2, 3, size, size)
    feats = model.forward_features(x)
    assert model.stage_channels == STAGE_CHANNELS[name]
    assert [f.shape[1] for f in feats.stages] == model.stage_channels
    assert feats.pooled.shape == (2, model.stage_channels[-1]) and feats.logits.shape == (2, 7)
    (feats.logits.sum() + sum(f.mean() for f in feats.stages)).backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        h = model.forward_stem(x)
        for stage in model.stages:
            h = stage(h)
        pooled, logits = model.forward_head(h)
        assert torch.equal(logits, model(x)) and torch.equal(logits, model.forward_features(x).logits)


@pytest.mark.parametrize("name", sorted(PUBLISHED_M))
def test_parameter_counts_match_published(name):
    with torch.device("meta"):
        model = create_model(name, num_classes=100)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    # published values are rounded to 0.01M: allow that rounding plus 0.5%
    assert abs(params - PUBLISHED_M[name]) <= 0.005 + 0.005 * PUBLISHED_M[name]


@pytest.mark.parametrize("name", sorted(TORCHVISION_PARAMS))
def test_imagenet_models_have_torchvision_parameter_counts(name):
    with torch.device("meta"):
        model = create_model(name, num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == TORCHVISION_PARAMS[name]


def test_stems_and_resolutions():
    x = torch.randn(1, 3, 64, 64)
    imagenet = create_model("resnet18", num_classes=10).forward_features(x)
    cifar = create_model("resnet18", num_classes=10, stem="cifar").forward_features(x)
    assert [f.shape[-1] for f in imagenet.stages] == [16, 8, 4, 2]  # 7x7 stride 2 + max-pool
    assert [f.shape[-1] for f in cifar.stages] == [64, 32, 16, 8]
    assert create_model("resnet50_cifar").conv1.kernel_size == (3, 3) and create_model("resnet50").conv1.kernel_size == (7, 7)
    with pytest.raises(ConfigError, match="stem must be one of"):
        create_model("resnet18", stem="tiny")
    # the VGG zoo max-pools before its last stage only on 64x64 inputs
    vgg = create_model("vgg8", num_classes=10)
    assert [f.shape[-1] for f in vgg.forward_features(torch.randn(1, 3, 32, 32)).stages] == [16, 8, 4, 4]
    assert [f.shape[-1] for f in vgg.forward_features(torch.randn(1, 3, 64, 64)).stages] == [32, 16, 8, 4]


def test_grey_inputs_names_and_aliases():
    for name in ("wrn_16_1", "vgg8", "MobileNetV2", "ShuffleV1", "ShuffleV2", "resnet18_cifar"):
        assert create_model(name, num_classes=10, in_channels=1)(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    aliases = {"VGG13_BN": "vgg13", "wrn40_2": "wrn_40_2", "mobile_half": "MobileNetV2", "mobilenet_v2": "MobileNetV2_Imagenet",
               "shufflev2_1_5": "ShuffleV2_1_5", "RESNET50_CIFAR": "resnet50_cifar", "ResNet50": "resnet50"}
    assert {alias: MODELS.canonical(alias) for alias in aliases} == aliases


def test_stage_chains_are_not_registered_twice_and_copy_with_their_parameters():
    model = create_model("wrn_16_1", num_classes=10)
    assert len(list(model.named_parameters(remove_duplicate=False))) == len(list(model.parameters()))  # one name per parameter
    last = copy.deepcopy(model.stages[-1])  # block3 + final BN + ReLU, as DFPT-KD+ copies a stage
    assert sum(p.numel() for p in last.parameters()) == sum(p.numel() for p in [*model.block3.parameters(), *model.bn1.parameters()])
    model.eval()
    assert not any(stage.training for stage in model.stages)


def test_list_models_verbose_line():
    line = describe_model("wrn_40_2")
    assert "2.26M" in line and "[32, 64, 128]" in line and "@ 32px" in line and "FLOPs" in line
    assert {"wrn_40_2", "vgg13", "MobileNetV2", "ShuffleV1", "ShuffleV2", "resnet50_cifar", "resnet18", "MobileNetV2_Imagenet"} <= set(list_models())


@pytest.mark.parametrize("name", CIFAR_RESNETS)
def test_cifar_resnet_forward_backward_and_stages(name):
    model = create_model(name, num_classes=7, in_channels=3)
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    assert [f.shape[1] for f in feats.stages] == model.stage_channels
    assert feats.logits.shape == (2, 7) and feats.pooled.shape == (2, model.stage_channels[-1])
    model.eval()
    assert torch.allclose(model(x), model.forward_features(x).logits)
    model.train()
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_grey_inputs_and_case_insensitive_names():
    model = create_model("ResNet20", num_classes=10, in_channels=1)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_unknown_model_suggests():
    with pytest.raises(ConfigError, match="resnet32x4"):
        create_model("resnet32x5")


def test_list_models_includes_the_cifar_family():
    assert {"resnet8", "resnet20", "resnet56", "resnet32x4"} <= set(list_models())


# --- checkpoints --------------------------------------------------------------------------------


def test_checkpoint_round_trip_and_foreign_wrappers(tmp_path):
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=10).eval()
    x = torch.randn(3, 3, 32, 32)
    state = model.state_dict()
    layouts = {
        "bare": state,
        "model": {"model": state, "epoch": 240},
        "state_dict": {"state_dict": state},
        "module": {"module." + k: v for k, v in state.items()},
    }
    for name, payload in layouts.items():
        torch.save(payload, tmp_path / f"{name}.pth")
        fresh = create_model("resnet8", num_classes=10).eval()
        load_checkpoint(fresh, tmp_path / f"{name}.pth")
        assert torch.equal(fresh(x), model(x)), name


def test_incompatible_checkpoint_lists_the_problem(tmp_path):
    torch.save(create_model("resnet8", num_classes=100).state_dict(), tmp_path / "c100.pth")
    with pytest.raises(CheckpointError, match=r"fc.weight: file \(100, 64\) vs model \(10, 64\)"):
        load_checkpoint(create_model("resnet8", num_classes=10), tmp_path / "c100.pth")
    torch.save(create_model("resnet20", num_classes=10).state_dict(), tmp_path / "r20.pth")
    with pytest.raises(CheckpointError, match="unexpected keys"):
        load_checkpoint(create_model("resnet8", num_classes=10), tmp_path / "r20.pth")


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /tmp/gapkd_pwned",))


def test_malicious_checkpoint_runs_no_code(tmp_path):
    import os

    torch.save({"model": _Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="never runs code"):
        load_checkpoint(create_model("resnet8", num_classes=10), tmp_path / "evil.pth")
    assert not os.path.exists("/tmp/gapkd_pwned")


@pytest.mark.parametrize("name", sorted(FOREIGN_LAYOUTS))
def test_parameter_names_equal_the_original_codebases(name):
    with torch.device("meta"):
        model = create_model(name, num_classes=100)
    assert layout_fingerprint(model.state_dict()) == FOREIGN_LAYOUTS[name]


def test_parameter_names_spot_checks():
    keys = create_model("wrn_40_2").state_dict()
    assert {"conv1.weight", "block1.layer.0.convShortcut.weight", "block3.layer.5.bn2.running_var", "bn1.weight", "fc.bias"} <= set(keys)
    keys = create_model("vgg13").state_dict()
    assert {"block0.0.weight", "block0.1.running_mean", "block4.4.bias", "classifier.weight"} <= set(keys)
    keys = create_model("MobileNetV2").state_dict()
    assert {"conv1.0.weight", "blocks.0.0.conv.0.weight", "blocks.6.0.conv.7.running_var", "conv2.1.weight", "classifier.0.weight"} <= set(keys)
    keys = create_model("ShuffleV2").state_dict()
    assert {"layer1.0.conv5.weight", "layer3.3.conv3.weight", "conv2.weight", "bn2.running_mean", "linear.weight"} <= set(keys)
    keys = create_model("MobileNetV2_Imagenet").state_dict()
    assert {"features.0.0.weight", "features.1.conv.0.0.weight", "features.1.conv.2.running_mean", "features.2.conv.3.bias",
            "features.18.1.weight", "classifier.1.weight"} <= set(keys)
    assert "layer1.0.downsample.0.weight" in create_model("resnet50").state_dict()


@pytest.mark.parametrize("name", ["wrn_16_2", "vgg8", "MobileNetV2", "ShuffleV1", "ShuffleV2", "resnet18_cifar", "MobileNetV2_Imagenet"])
def test_checkpoint_round_trip_in_every_layout(tmp_path, name):
    torch.manual_seed(0)
    size = image_size(name)
    model = randomise_batch_norm(create_model(name, num_classes=10)).eval()
    x = torch.randn(2, 3, size, size)
    expected = model(x)
    state = model.state_dict()
    layouts = {"bare": state, "repdistiller": {"epoch": 240, "model": state, "accuracy": 75.0, "optimizer": {"state": {}, "param_groups": []}},
               "state_dict": {"state_dict": state}, "ddp": {"model": {"module." + k: v for k, v in state.items()}}}
    for layout, payload in layouts.items():
        torch.save(payload, tmp_path / f"{layout}.pth")
        fresh = create_model(name, num_classes=10).eval()
        load_checkpoint(fresh, tmp_path / f"{layout}.pth")
        assert torch.equal(fresh(x), expected), layout


@pytest.mark.parametrize("name, equivalent", [("resnet50_cifar", {}), ("resnet18_cifar", {}), ("resnet50", {"stem": "cifar"})])
def test_repdistiller_resnetv2_state_dicts_load_by_renaming(tmp_path, name, equivalent):
    torch.manual_seed(0)
    source = randomise_batch_norm(create_model(name, num_classes=100, **equivalent)).eval()
    foreign = to_repdistiller_resnetv2(source.state_dict())
    cifar_name = name if name.endswith("_cifar") else "resnet50_cifar"
    assert layout_fingerprint(foreign) == REPDISTILLER_RESNETV2[cifar_name]
    torch.save({"model": foreign}, tmp_path / "ResNet50_vanilla.pth")
    model = load_checkpoint(create_model(name, num_classes=100, **equivalent).eval(), tmp_path / "ResNet50_vanilla.pth")
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), source(x))


def test_cifar_stem_checkpoint_into_imagenet_stem_says_so(tmp_path):
    torch.save(create_model("resnet18_cifar", num_classes=10).state_dict(), tmp_path / "cifar.pth")
    with pytest.raises(CheckpointError, match=r"conv1.weight: file \(64, 3, 3, 3\) vs model \(64, 3, 7, 7\).*stem='cifar'"):
        load_checkpoint(create_model("resnet18", num_classes=10), tmp_path / "cifar.pth")


def test_failed_load_changes_nothing_and_lists_every_kind_of_problem(tmp_path):
    model = create_model("wrn_16_1", num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = create_model("wrn_16_1", num_classes=100).state_dict()
    state.pop("block2.layer.0.conv1.weight")
    state["extra.weight"] = torch.zeros(1)
    torch.save({"model": state}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(model, tmp_path / "bad.pth")
    message = str(error.value)
    assert "fc.weight: file (100, 64) vs model (10, 64)" in message
    assert "missing keys (1): block2.layer.0.conv1.weight" in message and "unexpected keys (1): extra.weight" in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_whole_distiller_checkpoint_needs_a_prefix(tmp_path):
    """mdistiller's `latest` checkpoint holds the whole distiller: {'model': {'module.student.*', 'module.teacher.*'}}."""
    torch.manual_seed(0)
    student, teacher = create_model("wrn_16_1", num_classes=10).eval(), create_model("wrn_16_2", num_classes=10).eval()
    state = {**{f"module.student.{k}": v for k, v in student.state_dict().items()}, **{f"module.teacher.{k}": v for k, v in teacher.state_dict().items()}}
    torch.save({"model": state, "epoch": 3}, tmp_path / "latest")
    with pytest.raises(CheckpointError, match="prefix='student.'"):
        load_checkpoint(create_model("wrn_16_1", num_classes=10), tmp_path / "latest")
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(load_checkpoint(create_model("wrn_16_1", num_classes=10).eval(), tmp_path / "latest", prefix="student.")(x), student(x))
    assert torch.equal(load_checkpoint(create_model("wrn_16_2", num_classes=10).eval(), tmp_path / "latest", prefix="teacher.")(x), teacher(x))


def _torchvision_models():
    try:  # used only when present (never by the core); a build that does not match torch is skipped too
        import torchvision.models as tvm

        return tvm
    except Exception as error:  # noqa: BLE001
        pytest.skip(f"torchvision is not usable here ({type(error).__name__})")


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "MobileNetV2_Imagenet"])
def test_real_torchvision_state_dicts_give_identical_outputs(tmp_path, name):
    tvm = _torchvision_models()
    builder = {"resnet18": tvm.resnet18, "resnet50": tvm.resnet50, "MobileNetV2_Imagenet": tvm.mobilenet_v2}[name]
    original = randomise_batch_norm(builder(num_classes=10)).eval()
    torch.save(original.state_dict(), tmp_path / "tv.pth")
    model = load_checkpoint(create_model(name, num_classes=10).eval(), tmp_path / "tv.pth")
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(model(x), original(x))


# --- the adapter --------------------------------------------------------------------------------


class HandNet(nn.Module):
    """A user's own network: stem, two stages, pooling and a classifier, with its own names."""

    def __init__(self, skip: bool = False, classes: int = 5):
        super().__init__()
        self.skip = skip
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.body = nn.ModuleDict({"a": nn.Sequential(nn.Conv2d(8, 12, 3, 2, 1), nn.ReLU()), "b": nn.Sequential(nn.Conv2d(12, 20, 3, 2, 1), nn.ReLU())})
        self.head = nn.Linear(20, classes)
        self.spare = nn.Identity()  # defined but never used by forward

    def forward(self, x):
        x = self.stem(x)
        a = self.body["a"](x)
        b = self.body["b"](a)
        pooled = b.mean((2, 3))
        if self.skip:  # a connection across stages: not runnable stage by stage
            pooled = pooled + a.mean((2, 3)).repeat(1, 2)[:, :20]
        return self.head(pooled)


def test_adapter_on_a_hand_written_network(tmp_path):
    torch.manual_seed(0)
    net = HandNet()
    model = wrap_model(net, stages=["body.a", "body.b"], classifier="head", input_size=16)
    assert model.stage_channels == [12, 20] and model.num_classes == 5 and model.sequential
    x = torch.randn(3, 3, 16, 16)
    feats = model.forward_features(x)
    stem = net.stem(x)
    a = net.body["a"](stem)
    assert torch.equal(feats.stages[0], a) and torch.equal(feats.stages[1], net.body["b"](a))
    assert torch.allclose(feats.pooled, feats.stages[1].mean((2, 3))) and torch.equal(feats.logits, net(x))
    # stage by stage, as DFPT-KD runs a teacher
    h = model.forward_stem(x)
    assert torch.equal(h, stem)
    for stage in model.stages:
        h = stage(h)
    assert torch.allclose(model.forward_head(h)[1], net(x), atol=1e-6)
    # gradients reach the wrapped parameters through the hooked features
    feats.stages[0].sum().backward()
    assert net.body["a"][0].weight.grad is not None and net.head.weight.grad is None
    # the wrapper's state dict is the module's own, both ways
    assert list(model.state_dict()) == list(net.state_dict())
    torch.save({"model": net.state_dict()}, tmp_path / "net.pth")
    other = wrap_model(HandNet(), stages=["body.a", "body.b"], classifier="head", input_size=16)
    assert torch.equal(load_checkpoint(other, tmp_path / "net.pth")(x), net(x))
    fresh = HandNet()
    fresh.load_state_dict(other.state_dict())
    assert torch.equal(fresh(x), net(x))
    # a copy records its own features
    clone = copy.deepcopy(model)
    assert torch.equal(clone.forward_features(x).stages[1], feats.stages[1]) and clone.stage_modules[0] is not model.stage_modules[0]


def test_adapter_refuses_stage_by_stage_running_where_it_cannot_hold():
    x = torch.randn(2, 3, 16, 16)
    skipping = wrap_model(HandNet(skip=True), stages=["body.a", "body.b"], classifier="head", input_size=16)
    assert not skipping.sequential
    assert torch.equal(skipping.forward_features(x).logits, skipping(x))  # the hooks still work
    with pytest.raises(ConfigError, match="differs from the module's logits"):
        skipping.stages
    with pytest.raises(ConfigError, match="cannot be run stage by stage"):
        skipping.forward_stem(x)
    reversed_order = wrap_model(HandNet(), stages=["body.b", "body.a"], classifier="head", input_size=16)
    with pytest.raises(ConfigError, match="order"):
        reversed_order.forward_head(torch.randn(2, 20, 4, 4))
    gap = wrap_model(HandNet(), stages=["stem.0", "body.b"], classifier="head", input_size=16)
    with pytest.raises(ConfigError, match="does not take the output of 'stem.0'"):
        gap.stages
    grouped = wrap_model(HandNet(), stages=[["stem.0", "stem.1", "stem.2", "body.a"], "body.b"], classifier="head", input_size=16)
    assert grouped.sequential and grouped.stage_channels == [12, 20]


def test_adapter_names_unknown_modules():
    with pytest.raises(ConfigError, match="no module 'body.c'.*'body.a'"):
        wrap_model(HandNet(), stages=["body.c"], classifier="head", input_size=16)
    with pytest.raises(ConfigError, match="'spare' did not run"):
        wrap_model(HandNet(), stages=["body.a", "spare"], classifier="head", input_size=16)


def test_wrapped_models_distil_with_kd():
    """A wrapped network is a student and a teacher like any zoo model: KD trains the student only."""
    torch.manual_seed(0)
    student = wrap_model(HandNet(), stages=["body.a", "body.b"], classifier="head", input_size=16)
    teacher = wrap_model(HandNet(), stages=["body.a", "body.b"], classifier="head", input_size=16)
    frozen = {k: v.clone() for k, v in teacher.state_dict().items()}
    distiller = METHODS.get("kd")(student, teacher)
    optimiser = torch.optim.SGD([p for g in distiller.param_groups() for p in g["params"]], lr=0.1)
    before = student.model.head.weight.clone()
    images, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    for step in range(3):
        out = distiller(images, labels, StepInfo(epoch=0, step=step, epochs=1, steps_per_epoch=3))
        optimiser.zero_grad()
        sum(out.losses.values()).backward()
        optimiser.step()
    assert not torch.equal(student.model.head.weight, before)
    assert all(torch.equal(frozen[k], v) for k, v in teacher.state_dict().items())


def test_zoo_models_train_and_distil_end_to_end(tiny_overrides):
    """Through gapkd.api: a wrn_16_1 teacher trained on digits, KD into a ShuffleV1 student, and the
    student's saved checkpoint evaluated back."""
    from gapkd.api import evaluate_checkpoint, run, run_dir_for
    from gapkd.config import build_config

    teacher_cfg = build_config(tiny_overrides, overrides=["name=teacher", "student.name=wrn_16_1", "student.options.drop_rate=0.1"])
    teacher = run(teacher_cfg, echo=False)
    checkpoint = run_dir_for(teacher_cfg) / "checkpoints" / "best.pt"
    student_cfg = build_config(tiny_overrides, overrides=["name=kd", "train.epochs=1", "method.name=kd", "student.name=shufflev1",
                                                          "teacher.name=WRN_16_1", f"teacher.checkpoint={checkpoint}"])
    summary = run(student_cfg, echo=False)
    # the teacher's trained weights were loaded (not re-initialised): same test accuracy as in its own run
    assert abs(summary["teacher_test_acc"] - teacher["test_acc_at_best_val"]) < 1e-6
    evaluated = evaluate_checkpoint(run_dir_for(student_cfg) / "checkpoints" / "best.pt", student_cfg.data, amp=student_cfg.train.amp)
    assert evaluated["model"] == "shufflev1" and abs(evaluated["test_acc"] - summary["test_acc_at_best_val"]) < 1e-6
