"""The strong view (data.augment.strong): each batched operation against PIL's, the draws seeded and
shared by DDP slices, the weak view untouched by it, and the DGKD pipeline's stages on digits."""
import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageEnhance, ImageOps

from gapkd import pipelines, testing
from gapkd.api import run, run_dir_for
from gapkd.config import DataConfig, build_config, identity_payload
from gapkd.data import build_data
from gapkd.data.core import make_split
from gapkd.data.loader import DeviceLoader, Normalizer, epoch_generator
from gapkd.data.strong_augment import _OPERATIONS, CUTOUT_FILL, OPS, apply_strong, cutout, strong_draws
from gapkd.errors import ConfigError, DataError

PIL_OPS = {
    "autocontrast": lambda im, v: ImageOps.autocontrast(im),
    "brightness": lambda im, v: ImageEnhance.Brightness(im).enhance(v),
    "color": lambda im, v: ImageEnhance.Color(im).enhance(v),
    "contrast": lambda im, v: ImageEnhance.Contrast(im).enhance(v),
    "equalize": lambda im, v: ImageOps.equalize(im),
    "posterize": lambda im, v: ImageOps.posterize(im, int(v)),
    "rotate": lambda im, v: im.rotate(v),
    "sharpness": lambda im, v: ImageEnhance.Sharpness(im).enhance(v),
    "shear_x": lambda im, v: im.transform(im.size, Image.AFFINE, (1, v, 0, 0, 1, 0)),
    "shear_y": lambda im, v: im.transform(im.size, Image.AFFINE, (1, 0, 0, v, 1, 0)),
    "solarize": lambda im, v: ImageOps.solarize(im, v),
    "translate_x": lambda im, v: im.transform(im.size, Image.AFFINE, (1, 0, v * im.size[0], 0, 1, 0)),
    "translate_y": lambda im, v: im.transform(im.size, Image.AFFINE, (1, 0, 0, 0, 1, v * im.size[1])),
}


def images(n=4, size=32, seed=0):
    rng = np.random.default_rng(seed)
    out = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    out[1] = out[1] // 4 + 60  # a low-contrast image: autocontrast and equalize have work to do
    return out


@pytest.mark.parametrize("name", sorted(PIL_OPS))
def test_each_operation_matches_pil_within_one_level(name):
    """Pixel operations within one grey level of PIL's (rounding), geometry exactly (nearest, black fill)."""
    low, high = next((lo, hi) for op, lo, hi in OPS if op == name)
    arrays = images()
    x = torch.from_numpy(arrays.copy()).permute(0, 3, 1, 2).float()
    for fraction in (0.15, 0.6, 0.95):
        value = low + (high - low) * fraction
        ours = _OPERATIONS[name](x, torch.full((len(x),), float(value))).round().clamp(0, 255)
        theirs = torch.stack([torch.from_numpy(np.array(PIL_OPS[name](Image.fromarray(a), value))).permute(2, 0, 1) for a in arrays]).float()
        assert (ours - theirs).abs().max().item() <= (0 if name in ("equalize", "posterize", "solarize", "rotate", "shear_x", "shear_y",
                                                                      "translate_x", "translate_y") else 1), (name, value)


def test_cutout_fills_a_clipped_square_of_the_drawn_size_with_grey():
    x = torch.zeros(2, 3, 32, 32)
    draws = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.5, 0.5]])  # size fractions / 0.5, centre x, centre y
    out = cutout(x, draws)
    box = out[0].ne(0).any(0)
    rows, cols = box.nonzero().unbind(1)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (8, 24, 8, 24)  # side 16 from corner 8, both edges drawn
    assert out[0, :, 10, 10].tolist() == list(CUTOUT_FILL)
    assert torch.equal(out[1], x[1])  # a zero size draws nothing


def test_strong_view_is_seeded_shared_by_ddp_slices_and_leaves_the_weak_view_alone():
    split = make_split(images(20, 8, seed=1), np.arange(20) % 4)
    cpu = torch.device("cpu")

    def loader(strong):
        return DeviceLoader(split, 8, Normalizer((0.5,) * 3, (0.5,) * 3, cpu), cpu, train=True, seed=3, crop_padding=2, flip=True, strong=strong)

    plain, with_strong = list(loader(False).epoch(1)), list(loader(True).epoch(1))
    assert all(b.strong_images is None for b in plain)
    assert all(torch.equal(a.images, b.images) for a, b in zip(plain, with_strong))  # weak draws come first
    again = list(loader(True).epoch(1))
    assert all(torch.equal(a.strong_images, b.strong_images) for a, b in zip(with_strong, again))
    assert not all(torch.equal(a.strong_images, b.strong_images) for a, b in zip(with_strong, loader(True).epoch(2)))
    assert not torch.equal(with_strong[0].strong_images, with_strong[0].images)
    slices = [list(loader(True).shard(rank, 2).epoch(1)) for rank in range(2)]
    for index, whole in enumerate(with_strong):
        torch.testing.assert_close(torch.cat([s[index].strong_images for s in slices]), whole.strong_images)
    evaluation = DeviceLoader(split, 8, Normalizer((0.5,) * 3, (0.5,) * 3, cpu), cpu, train=False, strong=True)
    assert next(evaluation.epoch(0)).strong_images is None  # evaluation never augments


def test_apply_strong_draws_every_operation_and_keeps_uint8():
    x = torch.from_numpy(images(64, 16, seed=2)).permute(0, 3, 1, 2).contiguous()
    draws = strong_draws(64, epoch_generator(0, 0, torch.device("cpu")))
    out = apply_strong(x, draws)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    assert set(draws["ops"].flatten().tolist()) == set(range(len(OPS)))


def test_strong_view_changes_the_run_hash_only_when_on_and_streamed_data_refuses_it(tiny_overrides, tmp_path):
    on, off = build_config(tiny_overrides, overrides=["data.augment.strong=true"]), build_config(tiny_overrides)
    assert on.hparams_hash() != off.hparams_hash()
    assert "strong" not in identity_payload(off, "run_hash")["data"]["augment"]  # off: earlier hashes kept
    for c in "ab":
        for i in range(3):
            testing.write_image(tmp_path / "imgs" / "train" / c / f"{i}.png", 10 * ord(c) + i, size=(16, 16))
        testing.write_image(tmp_path / "imgs" / "val" / c / "0.png", ord(c), size=(16, 16))
    data = DataConfig(name="image-folder-stream", path=str(tmp_path / "imgs"), image_size=16, val_fraction=0.0, workers=0,
                      augment={"strong": True})
    with pytest.raises(DataError, match="in-memory datasets"):
        build_data(data, torch.device("cpu"), seed=0)


# ----------------------------------------------------------------------------- the dgkd pipeline
@pytest.fixture
def teacher(tiny_overrides):
    tiny = dict(tiny_overrides, train={**tiny_overrides["train"], "epochs": 1})
    cfg = build_config(tiny, overrides=["name=teacher", "student.name=resnet14"])
    run(cfg, echo=False)
    return run_dir_for(cfg) / "checkpoints" / "best.pt"


def test_dgkd_pipeline_guides_each_stage_by_every_earlier_model_and_skips_finished_stages(tiny_overrides, teacher, capsys):
    tree = dict(tiny_overrides, train={**tiny_overrides["train"], "epochs": 1}, name="dg",
                teacher={"name": "resnet14", "checkpoint": str(teacher)}, method={"name": "dgkd", "drop_probability": 0.5})
    summary = pipelines.PIPELINES.get("dgkd")(overrides=tree, assistant=["resnet8", "resnet8"], echo=False)
    folder = run_dir_for(build_config(tree))
    assert list(summary["stages"]) == ["assistant1-resnet8", "assistant2-resnet8", "student"]
    guides = {stage: yaml.safe_load((folder / stage / "config.yaml").read_text())["method"]["guides"] for stage in summary["stages"]}
    assert guides["assistant1-resnet8"] == []
    assert [g["checkpoint"] for g in guides["assistant2-resnet8"]] == [str(folder / "assistant1-resnet8" / "checkpoints" / "best.pt")]
    assert [g["checkpoint"] for g in guides["student"]] == [str(folder / s / "checkpoints" / "best.pt") for s in ("assistant1-resnet8", "assistant2-resnet8")]
    assert all(yaml.safe_load((folder / s / "config.yaml").read_text())["teacher"]["checkpoint"] == str(teacher) for s in summary["stages"])
    assert json.loads((folder / "pipeline.json").read_text())["pipeline"] == "dgkd"
    pipelines.PIPELINES.get("dgkd")(overrides=tree, assistant=["resnet8", "resnet8"], echo=True)
    assert capsys.readouterr().out.count("already finished") == 3


def test_dgkd_pipeline_refuses_another_method_with_the_fix(tiny_overrides, teacher):
    tree = dict(tiny_overrides, teacher={"name": "resnet14", "checkpoint": str(teacher)}, method={"name": "kd"})
    with pytest.raises(ConfigError, match="set method.name=dgkd"):
        pipelines.PIPELINES.get("dgkd")(overrides=tree, assistant="resnet8", echo=False)


def test_fixed_views_keep_the_strong_view():
    """data.views (fixed weak views, issue 17) with data.augment.strong (MLKD, issue 19): batches carry both."""
    import torch

    from gapkd.config import DataConfig
    from gapkd.data import build_data

    cfg = DataConfig(name="digits", train_subset=64, test_subset=32, batch_size=16, views=2,
                     augment={"crop_padding": 1, "flip": True, "strong": True})
    batch = next(iter(build_data(cfg, torch.device("cpu"), 0).train.epoch(0)))
    assert batch.views is not None and batch.strong_images is not None
    assert batch.strong_images.shape == batch.images.shape and not torch.equal(batch.strong_images, batch.images)
