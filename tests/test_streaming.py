"""Streaming image folders (ImageNet, CUB-200-2011, train/val trees) on tiny fake trees made here,
plus the new recipes and the optional TensorBoard log."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import gapkd.api
from gapkd import testing
from gapkd.config import DataConfig, build_config
from gapkd.data import FolderData, build_data, load_dataset
from gapkd.data.loader import Normalizer
from gapkd.data.streaming import IMAGENET_MEAN, IMAGENET_STD, StreamingLoader, center_crop, random_resized_box
from gapkd.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def write_image(path: Path, seed: int, size=(40, 30)) -> None:
    testing.write_image(path, seed, size, quality=95)


def imagenet_tree(root: Path, classes=("n03", "n01", "n02"), train=5, val=2) -> Path:
    for c, wnid in enumerate(classes):
        for i in range(train):
            write_image(root / "train" / wnid / f"{wnid}_{i}.JPEG", 100 * c + i)
        for i in range(val):
            write_image(root / "val" / wnid / f"ILSVRC2012_val_{c}{i}.JPEG", 1000 + 100 * c + i)
    return root


CUB_CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
CUB_IS_TRAIN = [1, 0, 1, 1, 0]  # per image within each class


def cub_tree(root: Path) -> Path:
    folder = root / "CUB_200_2011"
    images, labels, split = [], [], []
    image_id = 0
    for c, name in enumerate(CUB_CLASSES):
        for i, is_train in enumerate(CUB_IS_TRAIN):
            image_id += 1
            write_image(folder / "images" / name / f"bird_{i}.jpg", image_id)
            images.append(f"{image_id} {name}/bird_{i}.jpg")
            labels.append(f"{image_id} {c + 1}")
            split.append(f"{image_id} {is_train}")
    for file, lines in (("images.txt", images), ("image_class_labels.txt", labels), ("train_test_split.txt", split),
                        ("classes.txt", [f"{c + 1} {n}" for c, n in enumerate(CUB_CLASSES)])):
        (folder / file).write_text("\n".join(lines) + "\n")
    return folder


def data_cfg(path, **kw) -> DataConfig:
    base = dict(name="imagenet", path=str(path), image_size=16, batch_size=4, eval_batch_size=5, val_fraction=0.2, workers=0)
    return DataConfig(**{**base, **kw})


# ---------------------------------------------------------------------------------
# Layouts and splits


def test_imagenet_layout_classes_labels_and_splits(tmp_path):
    root = imagenet_tree(tmp_path / "imagenet")
    data = load_dataset(data_cfg(root))
    assert isinstance(data, FolderData)
    assert data.classes == ["n01", "n02", "n03"]  # sorted wnids: torchvision weights' class order
    assert (data.num_classes, data.in_channels, data.image_size) == (3, 3, 16)
    assert (data.mean, data.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert len(data.train) == 15 and len(data.test) == 6
    for split, folder in ((data.train, "train"), (data.test, "val")):
        for row in range(len(split)):
            relative = split.files[row].decode()
            assert relative.startswith(f"{folder}/") and relative.split("/")[1] == data.classes[int(split.labels[row])]
    bundle = build_data(data_cfg(root), CPU, seed=0)
    # validation: 1 of 5 per class held out of train (stratified), disjoint from what is trained on
    assert bundle.val.num_samples == 3 and bundle.train.num_samples == 12
    assert sorted(bundle.val.split.labels.tolist()) == [0, 1, 2]
    assert set(bundle.train.split.indices.tolist()).isdisjoint(bundle.val.split.indices.tolist())
    assert bundle.test.num_samples == 6 and len(bundle.train) == 3 and len(bundle.test) == 2


def test_cub_official_split_files_are_read(tmp_path):
    folder = cub_tree(tmp_path)
    for path in (tmp_path, folder):  # the parent or CUB_200_2011 itself
        data = load_dataset(data_cfg(path, name="cub200"))
        assert data.classes == CUB_CLASSES
        assert len(data.train) == 3 * CUB_IS_TRAIN.count(1) and len(data.test) == 3 * CUB_IS_TRAIN.count(0)
        # labels from image_class_labels.txt (1-based there), membership from train_test_split.txt
        for split, wanted in ((data.train, 1), (data.test, 0)):
            for row in range(len(split)):
                _, cls, file = split.files[row].decode().split("/")
                assert cls == CUB_CLASSES[int(split.labels[row])]
                assert CUB_IS_TRAIN[int(file[len("bird_"):-len(".jpg")])] == wanted


def test_cub_missing_split_file_and_plain_tree(tmp_path):
    folder = cub_tree(tmp_path / "a")
    (folder / "train_test_split.txt").unlink()
    with pytest.raises(DataError, match="train_test_split.txt"):
        load_dataset(data_cfg(folder, name="cub200"))
    imagenet_tree(tmp_path / "b", train=2, val=1)
    (tmp_path / "b" / "val").rename(tmp_path / "b" / "test")
    data = load_dataset(data_cfg(tmp_path / "b", name="cub200"))
    assert (len(data.train), len(data.test)) == (6, 3)
    with pytest.raises(DataError, match="neither the official CUB_200_2011 layout"):
        load_dataset(data_cfg(tmp_path / "nothing", name="cub200"))


def test_bad_layouts_give_clear_errors(tmp_path):
    flat = imagenet_tree(tmp_path / "flat", train=1, val=0)
    write_image(flat / "val" / "ILSVRC2012_val_00000001.JPEG", 1)
    with pytest.raises(DataError, match="no class folders.*large-datasets.md"):
        load_dataset(data_cfg(flat))
    missing = imagenet_tree(tmp_path / "missing", train=1, val=0)
    with pytest.raises(DataError, match="no val/ split"):
        load_dataset(data_cfg(missing))
    with pytest.raises(DataError, match="train.* is not a folder"):
        load_dataset(data_cfg(tmp_path / "nowhere"))
    empty = imagenet_tree(tmp_path / "empty", train=1, val=1)
    (empty / "train" / "n09").mkdir()
    with pytest.raises(DataError, match="n09 holds no images"):
        load_dataset(data_cfg(empty))
    extra = imagenet_tree(tmp_path / "extra", train=1, val=1)
    write_image(extra / "val" / "n99" / "x.JPEG", 1)
    with pytest.raises(DataError, match="not among the training classes"):
        load_dataset(data_cfg(extra))
    both = imagenet_tree(tmp_path / "both", train=1, val=1)
    write_image(both / "test" / "n01" / "x.jpg", 1)
    with pytest.raises(DataError, match="both val/ and test/"):
        load_dataset(data_cfg(both, name="image-folder-stream"))
    with pytest.raises(DataError, match="needs data.path"):
        load_dataset(DataConfig(name="image-folder-stream"))


@pytest.mark.parametrize("workers", [0, 1])
def test_unreadable_image_is_named(tmp_path, workers):
    root = imagenet_tree(tmp_path / "imagenet", train=2, val=1)
    bad = root / "train" / "n02" / "n02_1.JPEG"
    bad.write_bytes(b"not a jpeg at all")
    bundle = build_data(data_cfg(root, val_fraction=0.0, workers=workers), CPU, seed=0)
    with pytest.raises(DataError) as caught:
        list(bundle.train.epoch(0))
    message = str(caught.value)
    assert str(bad) in message and "is not a readable image" in message and "Traceback" not in message


def test_image_size_is_rejected_for_in_memory_datasets_and_ranges_checked():
    with pytest.raises(ConfigError, match="data.image_size applies to the streaming datasets"):
        load_dataset(DataConfig(name="digits", image_size=32))
    with pytest.raises(ConfigError, match="augment.scale"):
        build_config(overrides={"student": {"name": "resnet8"}, "data": {"augment": {"scale": [0.5, 0.1]}}})


def test_streaming_keys_at_their_defaults_leave_the_run_hash_alone():
    plain = build_config(overrides={"student": {"name": "resnet8"}})
    spelled = build_config(overrides={"student": {"name": "resnet8"}, "data": {
        "workers": 3, "augment": {"scale": [0.08, 1.0], "ratio": [3 / 4, 4 / 3], "eval_crop_fraction": 0.875}}})
    assert spelled.hparams_hash() == plain.hparams_hash()  # earlier runs keep their names and resume
    changed = build_config(overrides={"student": {"name": "resnet8"}, "data": {"augment": {"scale": [0.2, 1.0]}}})
    assert changed.hparams_hash() != plain.hparams_hash()


# ---------------------------------------------------------------------------------
# Transforms


def test_random_resized_box_stays_in_its_ranges():
    rng = np.random.default_rng(0)
    for _ in range(500):
        left, top, w, h = random_resized_box(40, 30, (0.08, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= left and left + w <= 40 and 0 <= top and top + h <= 30
        # the drawn sides were rounded to whole pixels: each is within 0.5 of the exact one
        assert (w + 0.5) * (h + 0.5) >= 0.08 * 1200
        assert (w - 0.5) / (h + 0.5) <= 4 / 3 and (w + 0.5) / (h - 0.5) >= 3 / 4
    # no crop of aspect 10 fits a 40x30 image: the fallback is the full width at aspect 10, centred
    assert random_resized_box(40, 30, (0.5, 1.0), (10.0, 10.0), rng) == (0, 13, 40, 4)


def test_center_crop_geometry():
    pixels = np.random.default_rng(1).integers(0, 256, (32, 64, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    # shorter side already 32 at crop fraction 1: no resize, the middle 32 columns
    assert np.array_equal(np.asarray(center_crop(image, 32, 1.0)), pixels[:, 16:48])
    # shorter side to round(16 / 0.5) = 32 is again a no-op; then the central 16x16
    assert np.array_equal(np.asarray(center_crop(image, 16, 0.5)), pixels[8:24, 24:40])
    assert np.asarray(center_crop(image, 24, 0.875)).shape == (24, 24, 3)


def test_train_batches_are_crops_or_mirrors_and_normalised_on_the_device(tmp_path):
    """With a full-image crop (scale 1, ratio 1) of square images at their own size, training yields each
    image or its mirror image, normalised with the ImageNet constants; both flips occur."""
    root = tmp_path / "square"
    for c in ("a", "b"):
        for i in range(4):
            write_image(root / "train" / c / f"{i}.png", 10 * ord(c) + i, size=(16, 16))
        write_image(root / "val" / c / "0.png", ord(c), size=(16, 16))
    cfg = data_cfg(root, name="image-folder-stream", val_fraction=0.0, augment={"scale": [1, 1], "ratio": [1, 1]})
    bundle = build_data(cfg, CPU, seed=0)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255
    flips = set()
    for epoch in range(3):
        for batch in bundle.train.epoch(epoch):
            for image, index in zip(batch.images, batch.indices):
                original = torch.from_numpy(np.array(Image.open(bundle.data.train.path(int(index))).convert("RGB")))
                original = (original.permute(2, 0, 1).float() - mean) / std
                same, mirrored = torch.allclose(image, original, atol=1e-5), torch.allclose(image, original.flip(2), atol=1e-5)
                assert same or mirrored
                flips.add(mirrored)
    assert flips == {True, False}


def test_epoch_is_a_function_of_seed_and_epoch_for_any_worker_count(tmp_path):
    root = imagenet_tree(tmp_path / "imagenet")
    run = lambda seed, epoch, workers: [  # noqa: E731
        (b.images, b.labels, b.indices) for b in build_data(data_cfg(root, workers=workers), CPU, seed=seed).train.epoch(epoch)]
    first = run(0, 2, 0)
    for other in (run(0, 2, 0), run(0, 2, 2)):
        assert all(torch.equal(x, y) for a, b in zip(first, other) for x, y in zip(a, b))
    assert not torch.equal(torch.cat([b[2] for b in first]), torch.cat([b[2] for b in run(0, 3, 0)]))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, run(1, 2, 0)))
    bundle = build_data(data_cfg(root), CPU, seed=0)
    test_rows = torch.cat([b.indices for b in bundle.test.epoch(5)])
    assert test_rows.tolist() == list(range(6))  # evaluation keeps file order, every epoch
    assert all(b.images.shape[1:] == (3, 16, 16) and b.images.dtype == torch.float32 for b in bundle.test.epoch(0))


def test_channels_last_and_rank_slices(tmp_path):
    root = imagenet_tree(tmp_path / "imagenet", train=4, val=1)
    data = load_dataset(data_cfg(root))
    normalizer = Normalizer(data.mean, data.std, CPU, channels_last=True)
    make = lambda rank, world: StreamingLoader(data.train, 6, normalizer, CPU, train=True, size=8, seed=3,  # noqa: E731
                                               rank=rank, world_size=world)
    whole = make(0, 1)
    batch = next(whole.epoch(0))
    assert batch.images.is_contiguous(memory_format=torch.channels_last)
    ranks = [make(r, 2) for r in range(2)]
    assert all(len(r) == len(whole) == 2 for r in ranks)
    for full, *parts in zip(whole.batches(1), *(r.batches(1) for r in ranks)):
        assert torch.equal(torch.cat(parts), full)  # each rank its slice of the same global batch
    # the engine's DDP interface: shard() gives the same slices, and weights average to the global mean
    for world in (2, 4):
        shards = [whole.shard(r, world) for r in range(world)]
        for full, *parts in zip(whole.batches(1), *(v.batches(1) for v in shards)):
            assert torch.equal(torch.cat(parts), full)
        for b, *ws in zip(whole.batches(1), *(v.weights() for v in shards)):
            assert sum(ws) == pytest.approx(world)
        assert sum(len(next(v.epoch(1)).labels) for v in shards) == 6
    assert whole.rank == 0 and whole.world_size == 1  # shard() returns views; the loader is unchanged
    with pytest.raises(DataError, match="smaller than the 4 processes"):
        StreamingLoader(data.train, 2, normalizer, CPU, train=True, size=8, world_size=4)


# ---------------------------------------------------------------------------------
# End to end, recipes, TensorBoard


def test_train_then_distill_one_epoch_on_a_fake_imagenet(tmp_path):
    root = imagenet_tree(tmp_path / "imagenet", train=6, val=2)
    common = {
        "out_dir": str(tmp_path / "runs"), "data": {"name": "imagenet", "path": str(root), "image_size": 16, "batch_size": 6,
                                                    "val_fraction": 1 / 6, "workers": 0},
        "optim": {"lr": 0.05}, "schedule": {"name": "constant"}, "train": {"epochs": 1, "device": "cpu", "log_every": 1000},
    }
    teacher = gapkd.api.run(build_config(common, overrides={"name": "t", "student": {"name": "resnet8"}}), echo=False)
    assert teacher["epochs"] == 1 and 0 <= teacher["test_acc_at_best_val"] <= 100
    env = json.loads((tmp_path / "runs" / "t" / "env.json").read_text())
    assert env["data"] == {"train": 15, "val": 3, "test": 6, "classes": 3}
    student = gapkd.api.run(build_config(common, overrides={
        "name": "s", "student": {"name": "resnet8"}, "method": {"name": "kd"}, "data": {"workers": 1},
        "teacher": {"name": "resnet8", "checkpoint": str(tmp_path / "runs" / "t" / "checkpoints" / "best.pt")}}), echo=False)
    assert student["method"] == "kd" and "teacher_test_acc" in student
    records = [json.loads(line) for line in (tmp_path / "runs" / "s" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1 and "loss/kd" in records[0]


def test_tensorboard_gets_every_number_of_every_record(tmp_path, tiny_overrides):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = build_config(tiny_overrides, overrides={"name": "tb", "train": {"tensorboard": True}})
    gapkd.api.run(cfg, echo=False)
    run_dir = tmp_path / "runs" / "tb"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    numbers = {k for r in records for k, v in r.items() if isinstance(v, (int, float)) and k != "epoch"}
    assert set(events.Tags()["scalars"]) == numbers
    for key in ("train_loss", "val_acc", "test_acc", "lr"):
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        assert logged == [(r["epoch"], pytest.approx(r[key], rel=1e-6)) for r in records]


def test_tensorboard_missing_is_one_clear_error(tmp_path, tiny_overrides, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    cfg = build_config(tiny_overrides, overrides={"name": "tb", "train": {"tensorboard": True}})
    with pytest.raises(ConfigError, match=r'pip install "gapkd\[tensorboard\]"'):
        gapkd.api.run(cfg, echo=False)
    assert not (tmp_path / "runs" / "tb").exists()  # failed before anything was written
