"""Hugging Face image classifiers as teachers and students (teacher.hf / student.hf): tiny randomly
initialised ViT and ConvNeXt models written with save_pretrained into a temporary folder (offline)."""
from __future__ import annotations

import sys

import pytest
import torch

from gapkd.api import build_model, load_model, run
from gapkd.config import ModelConfig, build_config
from gapkd.data import build_data
from gapkd.errors import ConfigError
from gapkd.teachers.hf import HFClassifier

transformers = pytest.importorskip("transformers")


def tiny_vit(folder, num_labels=10, image_size=16, channels=1):
    config = transformers.ViTConfig(image_size=image_size, patch_size=4, num_channels=channels, hidden_size=16, num_hidden_layers=4,
                                    num_attention_heads=2, intermediate_size=32, num_labels=num_labels)
    torch.manual_seed(0)
    transformers.ViTForImageClassification(config).save_pretrained(folder)
    return folder


def tiny_convnext(folder, num_labels=10, channels=1):
    config = transformers.ConvNextConfig(num_channels=channels, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], patch_size=2, num_labels=num_labels)
    torch.manual_seed(0)
    transformers.ConvNextForImageClassification(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def digits():
    cfg = build_config(None, None, ["student.name=resnet8", "data.train_subset=200"])
    return build_data(cfg.data, torch.device("cpu"), 0).data


def test_transformers_does_not_pull_torchvision():
    assert "torchvision" not in sys.modules


def test_a_vit_exposes_logits_and_token_maps_and_a_convnext_its_stage_maps(tmp_path, digits):
    vit = build_model(ModelConfig(hf=str(tiny_vit(tmp_path / "vit")), input={"size": 16}), digits, "teacher").eval()
    x = torch.randn(3, 1, 8, 8)
    raw = transformers.ViTForImageClassification.from_pretrained(tmp_path / "vit").eval()
    with torch.no_grad():
        resized = torch.nn.functional.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
        assert torch.allclose(vit(x), raw(pixel_values=resized).logits, atol=1e-5)
        features = vit.forward_features(x)
    assert torch.allclose(features.logits, vit(x), atol=1e-6)
    # 4 blocks -> 4 stages; 16 px / patch 4 = a 4x4 grid of 16-channel token maps (the class token left out)
    assert [tuple(s.shape) for s in features.stages] == [(3, 16, 4, 4)] * 4 and features.pooled.shape == (3, 16)
    assert vit.model.stage_channels == [16, 16, 16, 16] and vit.model.num_classes == 10
    with pytest.raises(ConfigError, match="cannot be run stage by stage"):
        vit.model.stages
    three = build_model(ModelConfig(hf=str(tmp_path / "vit"), input={"size": 16}, options={"stages": 3}), digits, "teacher")
    assert three.model.stage_index == [1, 3, 4]  # as many stages as a CIFAR ResNet student, for AT and feature-kd

    convnext = build_model(ModelConfig(hf=str(tiny_convnext(tmp_path / "cnx"))), digits, "teacher").eval()
    with torch.no_grad():
        features = convnext.forward_features(x)
    assert [s.dim() for s in features.stages] == [4, 4] and convnext.stage_channels == [8, 16]


def test_a_vit_teacher_distils_a_cifar_resnet_student_with_logit_methods(tmp_path):
    folder = tiny_vit(tmp_path / "vit")
    for method in ("kd", "dkd"):
        cfg = build_config(None, None, [f"method.name={method}", "student.name=resnet8", f"teacher.hf={folder}", "teacher.input.size=16",
                                        "train.epochs=1", "train.device=cpu", "train.amp=off", "data.train_subset=200",
                                        f"out_dir={tmp_path / 'runs'}", f"name={method}"])
        assert cfg.teacher.name == "hf"
        summary = run(cfg, echo=False)
        assert summary["epochs"] == 1 and 0 <= summary["teacher_test_acc"] <= 100


def test_an_hf_student_trains_and_its_checkpoint_rebuilds_it(tmp_path, digits):
    folder = tiny_convnext(tmp_path / "cnx", num_labels=5)  # another label set: a fresh 10-class head
    cfg = build_config(None, None, [f"student.hf={folder}", "student.init_head=reset", "train.epochs=1", "train.device=cpu",
                                    "train.amp=off", "data.train_subset=200", f"out_dir={tmp_path / 'runs'}", "name=s"])
    run(cfg, echo=False)
    saved = build_config(None, tmp_path / "runs" / "s" / "config.yaml")  # what a resume reads back
    assert saved.student.hf == str(folder) and saved.hparams_hash() == cfg.hparams_hash()
    model, name = load_model(tmp_path / "runs" / "s" / "checkpoints" / "best.pt", digits)
    assert name == "hf" and isinstance(model, HFClassifier) and model.num_classes == 10


def test_bad_hf_teachers_get_one_clear_error(tmp_path, digits):
    with pytest.raises(ConfigError, match="classifies 5 classes but the data has 10; a teacher must be trained for these classes"):
        build_model(ModelConfig(hf=str(tiny_convnext(tmp_path / "five", num_labels=5))), digits, "teacher")
    with pytest.raises(ConfigError, match=r"does not run on 8x8 images .* set teacher.input.size=16"):
        build_model(ModelConfig(hf=str(tiny_vit(tmp_path / "vit"))), digits, "teacher")
    with pytest.raises(ConfigError, match="cannot load it"):
        build_model(ModelConfig(hf=str(tmp_path)), digits, "teacher")
    with pytest.raises(ConfigError, match="takes only options.stages"):
        build_model(ModelConfig(hf=str(tmp_path / "vit"), options={"depth": 3}), digits, "teacher")
    with pytest.raises(ConfigError, match="name=hf is a Hugging Face model: set hf="):
        ModelConfig(name="hf")
    with pytest.raises(ConfigError, match="drop name"):
        ModelConfig(name="resnet8", hf=str(tmp_path))
