"""teacher.input: a teacher trained at another size, normalisation or channel order sees each batch
converted on the device, once per teacher forward; the numbers are checked against a by-hand conversion."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gapkd.api import build_distiller, run
from gapkd.config import build_config, identity_payload
from gapkd.data import build_data
from gapkd.errors import ConfigError
from gapkd.methods import StepInfo
from gapkd.models import create_model
from gapkd.teachers.input import InputAdapter

IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
DATA = ([0.5071, 0.4867, 0.4408], [0.2675, 0.2565, 0.2761])  # CIFAR-100's


def by_hand(x, data_mean, data_std, mean, std, size, bgr=False):
    view = lambda v: torch.tensor(v).view(1, -1, 1, 1)  # noqa: E731
    pixels = x * view(data_std) + view(data_mean)  # what the student's normalisation undid: [0, 1] RGB
    if bgr:
        pixels = pixels[:, [2, 1, 0]]
    teacher = (pixels - view(mean)) / view(std)
    return F.interpolate(teacher, size=(size, size), mode="bilinear", align_corners=False, antialias=size < x.shape[-1])


@pytest.mark.parametrize("bgr", [False, True])
def test_the_batch_is_renormalised_reordered_and_resized_as_by_hand(bgr):
    torch.manual_seed(0)
    teacher = create_model("resnet18", num_classes=10).eval()  # an ImageNet-shaped teacher
    adapter = InputAdapter(teacher, *DATA, size=64, mean=IMAGENET[0], std=IMAGENET[1], channels="bgr" if bgr else "rgb").eval()
    x = torch.randn(3, 3, 32, 32)
    expected = by_hand(x, *DATA, *IMAGENET, 64, bgr)
    assert torch.allclose(adapter.adapt(x), expected, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(adapter(x), teacher(expected), atol=1e-4)
        features, reference = adapter.forward_features(x), teacher.forward_features(expected)
    assert [tuple(s.shape) for s in features.stages] == [tuple(s.shape) for s in reference.stages]
    assert features.stages[0].shape[-1] == 16  # the teacher's own resolution inside (64 px / 4)
    assert list(adapter.state_dict()) == list(teacher.state_dict())  # the teacher's own keys: no prefix, no constants
    big = torch.randn(2, 3, 128, 128)  # shrinking is antialiased
    assert torch.allclose(adapter.adapt(big), by_hand(big, *DATA, *IMAGENET, 64, bgr), atol=1e-5)


def test_nothing_set_is_the_identity_and_stagewise_running_goes_through_the_adapter():
    torch.manual_seed(0)
    teacher = create_model("resnet8", num_classes=10).eval()
    same = InputAdapter(teacher, *DATA)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(same.adapt(x), x)
    adapter = InputAdapter(teacher, *DATA, size=48, mean=IMAGENET[0], std=IMAGENET[1]).eval()
    with torch.no_grad():
        h = adapter.forward_stem(x)
        for stage in adapter.stages:
            h = stage(h)
        assert torch.allclose(adapter.forward_head(h)[1], adapter(x), atol=1e-5)  # what DFPT-KD runs


def test_a_32px_teacher_teaches_an_8px_student_with_one_conversion_per_step(tmp_path, monkeypatch):
    """The digits data (8x8, one channel) and a teacher that sees them at 32 px with other statistics."""
    cfg = build_config(None, None, [
        "method.name=kd", "student.name=resnet8", "teacher.name=resnet14", "teacher.checkpoint=x.pt",
        "teacher.input.size=32", "teacher.input.mean=[0.5]", "teacher.input.std=[0.25]", "data.train_subset=128",
        "data.batch_size=64", "train.device=cpu", "train.epochs=1", "train.amp=off", f"out_dir={tmp_path}"])
    bundle = build_data(cfg.data, torch.device("cpu"), 0)
    cfg.teacher.checkpoint = None  # a fresh teacher is enough to count conversions
    distiller = build_distiller(cfg, bundle.data)
    calls = []
    real = InputAdapter.adapt
    monkeypatch.setattr(InputAdapter, "adapt", lambda self, x: calls.append(tuple(x.shape)) or real(self, x))
    batch = next(iter(bundle.train))
    out = distiller(batch.images, batch.labels, StepInfo(0, 0, 1, 2))
    assert calls == [tuple(batch.images.shape)]  # once per step, for the whole batch
    assert set(out.losses) == {"ce", "kd"}


def test_a_distillation_run_with_teacher_input(tmp_path):
    teacher = build_config(None, None, ["student.name=resnet14", "train.epochs=1", "train.device=cpu", "train.amp=off",
                                        "data.train_subset=200", "data.augment.crop_padding=1", f"out_dir={tmp_path}", "name=t"])
    run(teacher, echo=False)
    checkpoint = tmp_path / "t" / "checkpoints" / "best.pt"
    cfg = build_config(None, None, ["method.name=kd", "student.name=resnet8", "teacher.name=resnet14", f"teacher.checkpoint={checkpoint}",
                                    "teacher.input.size=8", "train.epochs=1", "train.device=cpu", "train.amp=off",
                                    "data.train_subset=200", f"out_dir={tmp_path}", "name=s"])
    summary = run(cfg, echo=False)
    saved = build_config(None, tmp_path / "s" / "config.yaml")  # what a resume reads back
    assert saved.teacher.input == cfg.teacher.input and saved.hparams_hash() == cfg.hparams_hash()
    plain = build_config(None, None, ["method.name=kd", "student.name=resnet8", "teacher.name=resnet14", f"teacher.checkpoint={checkpoint}",
                                      "train.epochs=1", "train.device=cpu", "train.amp=off", "data.train_subset=200",
                                      f"out_dir={tmp_path}", "name=p"])
    # teacher.input that matches the data changes nothing: the same teacher accuracy as without it
    assert summary["teacher_test_acc"] == run(plain, echo=False)["teacher_test_acc"]
    assert cfg.hparams_hash() != plain.hparams_hash()


def test_bad_teacher_input_gets_one_clear_error():
    base = ["method.name=kd", "student.name=resnet8", "teacher.name=resnet14", "teacher.checkpoint=x.pt"]
    with pytest.raises(ConfigError, match="teacher.input.mean and teacher.input.std go together"):
        build_config(None, None, [*base, "teacher.input.mean=[0.5]"])
    with pytest.raises(ConfigError, match="student.input: the student sees the data as it is"):
        build_config(None, None, [*base, "student.input.size=32"])
    with pytest.raises(ConfigError, match="one value per channel of the data"):
        InputAdapter(create_model("resnet8", num_classes=10), *DATA, mean=[0.5], std=[0.5])
    # configs without teacher.input (or hf) hash as before these keys existed, so earlier runs keep their names
    # (and config.yaml, the dump, leaves them out too)
    cfg = build_config(None, None, base)
    for payload in (cfg.model_dump(mode="json"), identity_payload(cfg, "run_hash"), identity_payload(cfg, "study_key")):
        assert {"input", "hf"}.isdisjoint(payload["teacher"]) and {"input", "hf"}.isdisjoint(payload["student"])
    set_input = build_config(None, None, [*base, "teacher.input.size=64"])
    assert identity_payload(set_input, "run_hash")["teacher"]["input"]["size"] == 64 and set_input.hparams_hash() != cfg.hparams_hash()
