"""Starting a model from weights trained on another label set (``student.init_head=reset``): every
weight but the classifier loads exactly, the classifier keeps its fresh initialisation; the default
(``load``) still refuses a class-count mismatch and names the fix; teachers are refused."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from gapkd.api import build_distiller, build_model, run, run_dir_for
from gapkd.cli import main
from gapkd.config import build_config
from gapkd.data import load_dataset
from gapkd.data.core import ImageData, make_split
from gapkd.engine.checkpoint import safe_load
from gapkd.engine.trainer import deployable_payload
from gapkd.errors import CheckpointError, ConfigError
from gapkd.methods.ce import CrossEntropy
from gapkd.models import classifier_keys, create_model, load_state_dict_strict, wrap_model
from gapkd.pipelines import eskd
from gapkd.study import run_key

REPO = Path(__file__).resolve().parents[1]

# torchvision's ResNet-18 parameter names (the layout of its IMAGENET1K_V1 file), a few of each kind
TORCHVISION_RESNET18_KEYS = ["conv1.weight", "bn1.running_var", "layer1.0.conv2.weight", "layer2.0.downsample.0.weight",
                             "layer2.0.downsample.1.running_mean", "layer4.1.bn2.bias", "fc.weight", "fc.bias"]


def _randomised(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The model's state dict with every float tensor redrawn, so no value can match a fresh model by chance."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            value = torch.randn(value.shape, generator=generator)
            value = value.abs() + 0.1 if key.endswith("running_var") else value
        state[key] = value
    return state


def _torchvision_file(path, num_classes=1000, in_channels=3, name="resnet18"):
    """A bare state dict in torchvision's layout (its files carry no num_batches_tracked); random weights."""
    state = _randomised(create_model(name, num_classes=num_classes, in_channels=in_channels), seed=1)
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(state, path)
    return state


def _data(num_classes=7, channels=3, size=32) -> ImageData:
    rng = np.random.default_rng(0)
    split = make_split(rng.integers(0, 256, (2 * num_classes, channels, size, size), dtype=np.uint8),
                       np.repeat(np.arange(num_classes), 2))
    return ImageData("tiny", [str(i) for i in range(num_classes)], split, split, (0.5,) * channels, (0.25,) * channels)


def _model_cfg(path, **extra):
    return build_config(overrides={"student": {"name": "resnet18", "checkpoint": str(path), **extra}, "data": {"name": "digits"}}).student


def test_torchvision_resnet18_loads_all_but_the_classifier_with_reset(tmp_path):
    path = tmp_path / "resnet18-imagenet.pth"
    state = _torchvision_file(path)
    assert all(key in state for key in TORCHVISION_RESNET18_KEYS) and state["fc.weight"].shape == (1000, 512)
    torch.manual_seed(5)
    fresh_head = {k: v.clone() for k, v in create_model("resnet18", num_classes=7).fc.state_dict().items()}
    torch.manual_seed(5)  # the same fresh initialisation inside build_model
    model = build_model(_model_cfg(path, init_head="reset"), _data(), "student")
    loaded = model.state_dict()
    backbone = [k for k in state if not k.startswith("fc.")]
    assert len(backbone) == 100  # torchvision's resnet18 file: 102 tensors, 2 of them fc
    for key in backbone:
        assert torch.equal(loaded[key], state[key]), key
    assert loaded["fc.weight"].shape == (7, 512) and loaded["fc.bias"].shape == (7,)
    assert torch.equal(loaded["fc.weight"], fresh_head["weight"]) and torch.equal(loaded["fc.bias"], fresh_head["bias"])
    assert not torch.equal(loaded["fc.weight"], state["fc.weight"][:7])
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_default_load_refuses_the_class_count_mismatch_and_names_the_fix(tmp_path):
    path = tmp_path / "resnet18-imagenet.pth"
    _torchvision_file(path)
    with pytest.raises(CheckpointError) as caught:
        build_model(_model_cfg(path), _data(), "student")
    message = str(caught.value)
    assert "fc.weight: file (1000, 512) vs model (7, 512)" in message
    assert "Only the classifier differs: the file's is for 1000 classes, the model's for 7" in message
    assert "student.init_head=reset" in message


def test_reset_still_refuses_backbone_keys_that_do_not_fit_and_names_them(tmp_path):
    state = _torchvision_file(tmp_path / "full.pth")
    torch.save({k: v for k, v in state.items() if k != "layer3.1.conv1.weight"}, tmp_path / "missing.pth")
    torch.save({**state, "layer5.0.conv1.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    torch.save({**state, "layer2.0.conv1.weight": torch.zeros(128, 64, 1, 1)}, tmp_path / "shape.pth")
    expected = {"missing.pth": "missing keys (1): layer3.1.conv1.weight", "extra.pth": "unexpected keys (1): layer5.0.conv1.weight",
                "shape.pth": "layer2.0.conv1.weight: file (128, 64, 1, 1) vs model (128, 64, 3, 3)"}
    for name, fragment in expected.items():
        with pytest.raises(CheckpointError) as caught:
            build_model(_model_cfg(tmp_path / name, init_head="reset"), _data(), "student")
        message = str(caught.value)
        assert fragment in message and "fc." not in message and "left out (it is reset)" in message, message


def test_reset_maps_foreign_layouts_and_finds_the_classifier_by_identity():
    # RepDistiller / mdistiller's CIFAR ResNet names the classifier `linear`: renamed, then left out
    source = create_model("resnet18_cifar", num_classes=100)
    state = {k.replace("fc.", "linear.").replace("downsample", "shortcut"): v for k, v in _randomised(source, 2).items()}
    model = create_model("resnet18_cifar", num_classes=10)
    head = model.fc.weight.clone()
    load_state_dict_strict(model, state, reset_head=True)
    assert torch.equal(model.layer4[1].conv2.weight, state["layer4.1.conv2.weight"]) and torch.equal(model.fc.weight, head)
    assert classifier_keys(create_model("resnet18")) == {"fc.weight", "fc.bias"}
    assert classifier_keys(create_model("mobilenet_v2")) == {"classifier.1.weight", "classifier.1.bias"}  # after the dropout

    class Net(torch.nn.Module):  # a user's model, wrapped: its state-dict keys drop the wrapper's `model.` prefix
        def __init__(self, classes):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU())
            self.head = torch.nn.Linear(4, classes)

        def forward(self, x):
            return self.head(self.body(x).mean((2, 3)))

    wrapped = wrap_model(Net(5), stages=["body"], classifier="head", input_size=8)
    assert classifier_keys(wrapped) == {"head.weight", "head.bias"}
    other = Net(9).state_dict()
    load_state_dict_strict(wrapped, other, reset_head=True)
    assert torch.equal(wrapped.model.body[0].weight, other["body.0.weight"]) and wrapped.model.head.weight.shape == (5, 4)


def test_gapkd_checkpoint_of_another_dataset_starts_a_student(tmp_path, tiny_overrides):
    """A gapkd checkpoint trained for 100 classes (as on CIFAR-100) starts a 10-class digits student."""
    source = create_model("resnet8", num_classes=100, in_channels=1)
    source.load_state_dict(_randomised(source, 3))
    payload = deployable_payload(CrossEntropy(source), build_config(overrides={"student": {"name": "resnet8"}}), epoch=240, val_acc=70.0)
    assert payload["format"] == "gapkd-model" and payload["num_classes"] == 100
    path = tmp_path / "cifar100-resnet8.pt"
    torch.save(payload, path)

    plain = build_config(tiny_overrides, overrides=[f"student.checkpoint={path}"])
    digits = load_dataset(plain.data)
    with pytest.raises(CheckpointError, match=r"trained for 100 classes but digits has 10; set student.init_head=reset"):
        build_distiller(plain, digits)
    cfg = build_config(tiny_overrides, overrides=[f"student.checkpoint={path}", "student.init_head=reset", "train.epochs=1"])
    student = build_distiller(cfg, digits).student
    assert torch.equal(student.layer3[0].conv1.weight, source.layer3[0].conv1.weight)
    assert student.fc.weight.shape == (10, 64)

    summary = run(cfg, echo=False)
    run_dir = run_dir_for(cfg)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if "val_acc" in r] == [1]
    assert all(np.isfinite(v) for r in records for k, v in r.items() if k.startswith("train/") and isinstance(v, float))
    assert summary["best_val_acc"] is not None
    best = safe_load(run_dir / "checkpoints" / "best.pt")
    assert best["num_classes"] == 10 and best["state_dict"]["fc.weight"].shape == (10, 64)
    assert not torch.equal(best["state_dict"]["layer3.0.conv1.weight"], source.layer3[0].conv1.weight)  # it trained
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["student"]["init_head"] == "reset"
    again = build_config(saved)
    assert again == cfg and again.hparams_hash() == cfg.hparams_hash()
    assert run(again, echo=False) == summary  # finished: found by its hash, not run again


def test_hash_of_configs_without_init_head_is_unchanged():
    """Literal hashes computed before init_head existed: earlier runs keep their names and resume."""
    fixed = {"student": {"name": "resnet18", "checkpoint": "weights/resnet18.pth"}, "teacher": {"name": "resnet34", "checkpoint": "t.pt"},
             "method": {"name": "kd"}, "data": {"name": "digits"}}
    assert build_config(overrides=fixed).hparams_hash() == "0a7ca62e"
    assert build_config(overrides={"student": {"name": "resnet8"}}).hparams_hash() == "5799977e"
    assert build_config(path=REPO / "configs/cub200/resnet34-resnet18/kd.yaml").hparams_hash() == "b40facc9"
    assert run_key(build_config(overrides=fixed), "student") == "4a932ef73cb9"  # a study's run identity, likewise
    spelled = build_config(overrides=fixed, base={"student": {"init_head": "load"}})
    assert spelled.hparams_hash() == "0a7ca62e" and run_key(spelled, "student") == "4a932ef73cb9"
    fixed["student"]["init_head"] = "reset"
    assert build_config(overrides=fixed).hparams_hash() != "0a7ca62e" and run_key(build_config(overrides=fixed), "student") != "4a932ef73cb9"


def test_teacher_reset_is_refused_and_student_reset_needs_a_checkpoint():
    tree = {"student": {"name": "resnet8"}, "teacher": {"name": "resnet34", "checkpoint": "w.pth", "init_head": "reset"}, "method": {"name": "kd"}}
    with pytest.raises(ConfigError) as caught:
        build_config(overrides=tree)
    message = str(caught.value)
    assert "teacher.init_head=reset" in message and "student.checkpoint=w.pth student.init_head=reset" in message
    with pytest.raises(ConfigError, match="student.init_head=reset .* student.checkpoint is not set"):
        build_config(overrides={"student": {"name": "resnet8", "init_head": "reset"}})
    with pytest.raises(ConfigError, match="student.init_head: Input should be 'load' or 'reset'"):
        build_config(overrides={"student": {"name": "resnet8", "checkpoint": "w.pth", "init_head": "fresh"}})


def test_teacher_of_another_label_set_names_how_to_train_it_first(tmp_path):
    path = tmp_path / "resnet18-imagenet.pth"
    _torchvision_file(path)
    teacher = build_config(overrides={"student": {"name": "resnet8"}, "teacher": {"name": "resnet18", "checkpoint": str(path)},
                                      "method": {"name": "kd"}}).teacher
    with pytest.raises(CheckpointError) as caught:
        build_model(teacher, _data(), "teacher")
    assert f"gapkd train -c <the teacher's recipe> student.name=resnet18 student.checkpoint={path} student.init_head=reset" in str(caught.value)


def test_cli_trains_a_teacher_from_the_cub_imagenet_recipe_with_reset(tmp_path, capsys):
    """`gapkd train -c configs/cub200/teachers/resnet34-imagenet.yaml student.checkpoint=...`, moved onto digits."""
    path = tmp_path / "resnet34-imagenet.pth"
    _torchvision_file(path, in_channels=1, name="resnet34")  # digits are grey: a 1-channel stem
    args = ["train", "-c", str(REPO / "configs/cub200/teachers/resnet34-imagenet.yaml"), f"student.checkpoint={path}",
            "data.name=digits", "data.image_size=null", "data.batch_size=128", "train.epochs=1", "train.device=cpu",
            "train.amp=off", f"out_dir={tmp_path / 'runs'}", "--quiet"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    saved = yaml.safe_load((tmp_path / "runs" / summary["run"] / "config.yaml").read_text())
    assert saved["student"] == {"name": "resnet34", "checkpoint": str(path), "options": {}, "init_head": "reset"}
    assert main([*args[:3], "student.init_head=load", "name=load-head", *args[3:]]) == 2
    assert "student.init_head=reset" in capsys.readouterr().err


def test_eskd_starts_its_teacher_from_the_checkpoint_with_reset(tiny_overrides, tmp_path):
    source = create_model("resnet14", num_classes=100, in_channels=1)
    path = tmp_path / "resnet14-other.pth"
    torch.save(_randomised(source, 4), path)
    recipe = {**tiny_overrides, "teacher": {"name": "resnet14", "checkpoint": str(path), "init_head": "reset"}, "method": {"name": "kd"}}
    recipe["train"] = {**recipe["train"], "epochs": 1}
    summary = eskd(overrides=recipe, stop_epoch=1, echo=False)
    root = Path(summary["dir"])
    teacher_cfg = yaml.safe_load((root / "teacher" / "config.yaml").read_text())
    assert teacher_cfg["student"] == {"name": "resnet14", "checkpoint": str(path), "options": {}, "init_head": "reset"}
    student_cfg = yaml.safe_load((root / "student" / "config.yaml").read_text())
    assert student_cfg["teacher"]["init_head"] == "load" and student_cfg["teacher"]["checkpoint"] == summary["early_teacher"]["checkpoint"]
