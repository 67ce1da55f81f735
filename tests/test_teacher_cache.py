"""Fixed augmented views (data.views) and the teacher-output cache (gapkd.teacher_cache)."""
import json
import multiprocessing
import warnings

import numpy as np
import pytest
import torch
import yaml

from gapkd import teacher_cache
from gapkd.api import run, run_dir_for
from gapkd.config import build_config
from gapkd.data import build_data
from gapkd.data.views import ViewSpec, crop_flip_table, epoch_views
from gapkd.engine.checkpoint import safe_load
from gapkd.errors import ConfigError
from gapkd.methods import METHODS


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory):
    """A resnet8 teacher trained for 2 epochs on digits (quality does not matter here, only that it is fixed)."""
    out = tmp_path_factory.mktemp("teacher")
    cfg = build_config({
        "out_dir": str(out), "name": "teacher", "data": {"name": "digits", "batch_size": 64},
        "train": {"epochs": 2, "device": "cpu", "amp": "off", "log_every": 1000}, "student": {"name": "resnet8"},
        "schedule": {"name": "cosine"},
    })
    run(cfg, echo=False)
    return str(run_dir_for(cfg) / "checkpoints" / "best.pt")


def kd_overrides(tiny_overrides, tmp_path, checkpoint, **data):
    tiny_overrides["method"] = {"name": "kd"}
    tiny_overrides["teacher"] = {"name": "resnet8", "checkpoint": checkpoint}
    tiny_overrides["data"].update({"views": 4, "teacher_cache_dir": str(tmp_path / "tcache"), **data})
    return tiny_overrides


def weights(cfg):
    return safe_load(run_dir_for(cfg) / "checkpoints" / "last.pt")["state_dict"]


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- views --------------------------------------------------------------------------------


def test_views_are_fixed_by_view_seed_and_sample_id_not_by_split_or_batch():
    ids = torch.tensor([5, 17, 3, 99])
    dy, dx, flip = crop_flip_table(ViewSpec(8, seed=1), ids, padding=4, flip=True)
    assert dy.shape == (4, 8) and int(dy.min()) >= 0 and int(dy.max()) <= 8 and flip.dtype == torch.bool
    # the same sample keeps its views whatever other samples share the split
    dy2, dx2, flip2 = crop_flip_table(ViewSpec(8, seed=1), ids[[2, 0]], padding=4, flip=True)
    assert torch.equal(dy2, dy[[2, 0]]) and torch.equal(dx2, dx[[2, 0]]) and torch.equal(flip2, flip[[2, 0]])
    other, _, _ = crop_flip_table(ViewSpec(8, seed=2), ids, padding=4, flip=True)
    assert not torch.equal(other, dy)


def test_each_block_of_k_epochs_shows_every_view_once_in_a_seed_dependent_order():
    ids = torch.arange(200)
    shown = torch.stack([epoch_views(4, run_seed=0, ids=ids, epoch=e) for e in range(4)], 1)
    assert torch.equal(shown.sort(1).values, torch.arange(4).expand(200, 4))
    assert not torch.equal(shown, torch.stack([epoch_views(4, 1, ids, e) for e in range(4)], 1))  # other seed, other stream
    assert not torch.equal(shown, torch.stack([epoch_views(4, 0, ids, e) for e in range(4, 8)], 1))  # next block reshuffled


def test_loader_with_views_shows_only_the_fixed_views(tiny_overrides):
    cfg = build_config(tiny_overrides, overrides=["data.views=2", "data.augment.flip=true"])
    bundle = build_data(cfg.data, torch.device("cpu"), seed=0)
    loader = bundle.train
    seen = {}
    for epoch in range(3):
        for batch in loader.epoch(epoch):
            for image, sample, view in zip(batch.images, batch.indices.tolist(), batch.views.tolist()):
                seen.setdefault((sample, view), []).append(image)
    assert {view for _, view in seen} == {0, 1}
    repeated = [images for images in seen.values() if len(images) > 1]
    assert repeated and all(torch.equal(images[0], other) for images in repeated for other in images[1:])


# --- the cache ----------------------------------------------------------------------------


def test_kd_with_the_cache_ends_bit_identical_to_recomputing_the_teacher_on_the_same_views(tiny_overrides, tmp_path, teacher_checkpoint):
    overrides = kd_overrides(tiny_overrides, tmp_path, teacher_checkpoint)
    cached = build_config(overrides, overrides=["name=cached"])
    summary = run(cached, echo=False)
    assert summary["teacher_cache"] == "built"
    recomputed = build_config(overrides, overrides=["name=recomputed", "data.teacher_cache=false"])
    other = run(recomputed, echo=False)
    assert other["teacher_cache"] == "off"
    assert same_weights(weights(cached), weights(recomputed))
    # the teacher's reported accuracy comes from its cached val/test logits: the same as measured by its forward
    assert (summary["teacher_val_acc"], summary["teacher_test_acc"]) == (other["teacher_val_acc"], other["teacher_test_acc"])
    fresh = build_config(overrides, overrides=["name=fresh", "data.views=0"])
    run(fresh, echo=False)
    assert not same_weights(weights(cached), weights(fresh))  # the views do change training


def test_cached_steps_never_run_the_teacher(tiny_overrides, tmp_path, teacher_checkpoint, monkeypatch):
    overrides = kd_overrides(tiny_overrides, tmp_path, teacher_checkpoint)
    run(build_config(overrides, overrides=["name=build"]), echo=False)  # builds the cache (runs the teacher)
    from gapkd.methods.base import Distiller

    def forbidden(self, images):
        raise AssertionError("the teacher ran although its logits are cached")

    monkeypatch.setattr(Distiller, "teacher_forward", forbidden)
    summary = run(build_config(overrides, overrides=["name=second", "seed=1"]), echo=False)
    assert summary["teacher_cache"] == "hit"


def test_a_cache_is_never_used_for_another_teacher_precision_views_or_data(tiny_overrides, tmp_path, teacher_checkpoint):
    overrides = kd_overrides(tiny_overrides, tmp_path, teacher_checkpoint)
    run(build_config(overrides, overrides=["name=a"]), echo=False)
    assert run(build_config(overrides, overrides=["name=b", "seed=3"]), echo=False)["teacher_cache"] == "hit"
    changed_teacher = tmp_path / "other-teacher.pt"
    payload = safe_load(teacher_checkpoint)
    payload["state_dict"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in payload["state_dict"].items()}
    torch.save(payload, changed_teacher)
    for name, change in [("c", [f"teacher.checkpoint={changed_teacher}"]), ("d", ["train.amp=bf16"]), ("e", ["data.views=3"]),
                         ("f", ["data.view_seed=1"]), ("g", ["data.train_subset=500"]), ("h", ["train.fold_teacher_bn=false"])]:
        assert run(build_config(overrides, overrides=[f"name={name}", *change]), echo=False)["teacher_cache"] == "built", change
    assert len(list((tmp_path / "tcache").iterdir())) == 7


def _only_cache(tmp_path):
    (folder,) = list((tmp_path / "tcache").iterdir())
    return folder


@pytest.mark.parametrize("damage", ["truncate", "flip-a-byte", "drop-meta"])
def test_a_damaged_cache_is_rebuilt_with_one_warning_never_read(tiny_overrides, tmp_path, teacher_checkpoint, damage):
    overrides = kd_overrides(tiny_overrides, tmp_path, teacher_checkpoint)
    good = build_config(overrides, overrides=["name=good"])
    run(good, echo=False)
    folder = _only_cache(tmp_path)
    array = folder / "train.npy"
    raw = bytearray(array.read_bytes())
    if damage == "truncate":
        array.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip-a-byte":
        raw[-7] ^= 0xFF
        array.write_bytes(bytes(raw))
    else:
        (folder / "meta.json").unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = build_config(overrides, overrides=["name=again"])
        assert run(again, echo=False)["teacher_cache"] == "rebuilt"
    messages = [str(w.message) for w in caught if "teacher cache" in str(w.message)]
    assert len(messages) == 1 and "\n" not in messages[0] and "rebuilding" in messages[0]
    assert same_weights(weights(good), weights(again))  # the damaged logits were never trained on


def _fill(args):
    overrides, out = args
    torch.set_num_threads(1)
    return run(build_config(overrides, overrides=[f"name=proc{out}"]), echo=False)["teacher_cache"]


def test_two_processes_filling_the_same_cache_leave_one_valid_folder(tiny_overrides, tmp_path, teacher_checkpoint):
    overrides = kd_overrides(tiny_overrides, tmp_path, teacher_checkpoint)
    overrides["train"]["epochs"] = 1
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        statuses = pool.map(_fill, [(overrides, 0), (overrides, 1)])
    assert set(statuses) <= {"built", "hit"}
    folder = _only_cache(tmp_path)  # one folder, no temporaries left
    meta = json.loads((folder / "meta.json").read_text())
    key = meta["key"]
    cfg = build_config(overrides, overrides=["name=check"])
    bundle = build_data(cfg.data, torch.device("cpu"), seed=0)
    assert teacher_cache.open_cache(folder, key).train.shape == (bundle.train.num_samples, 4, 10)


def test_resume_after_a_kill_mid_run_with_views_is_bit_identical(tiny_overrides, tmp_path, teacher_checkpoint, monkeypatch):
    overrides = kd_overrides(tiny_overrides, tmp_path, teacher_checkpoint)
    overrides["train"]["epochs"] = 3
    straight = build_config(overrides, overrides=["name=straight"])
    run(straight, echo=False)
    interrupted = build_config(overrides, overrides=["name=interrupted"])
    from gapkd.methods.kd import KD

    real_forward = KD.forward

    def killed_mid_epoch(self, images, labels, step):
        if step.step == step.steps_per_epoch + 3:  # the 4th step of the 2nd epoch
            raise KeyboardInterrupt
        return real_forward(self, images, labels, step)

    monkeypatch.setattr(KD, "forward", killed_mid_epoch)
    with pytest.raises(KeyboardInterrupt):
        run(interrupted, echo=False)
    monkeypatch.setattr(KD, "forward", real_forward)
    assert run(interrupted, echo=False)["teacher_cache"] == "hit"
    assert "resuming" in (run_dir_for(interrupted) / "train.log").read_text()
    assert same_weights(weights(straight), weights(interrupted))


def test_topk_cache_keeps_the_top_logits_and_the_remaining_mass():
    logits = torch.randn(6, 20) * 3
    values, index, fill = teacher_cache._topk_parts(logits, 5)
    table = teacher_cache.LogitTable(None, values[:, None], index[:, None], fill[:, None], num_classes=20)
    rebuilt = table.lookup(torch.arange(6), torch.zeros(6, dtype=torch.long), torch.device("cpu"))
    top = logits.topk(5, 1)
    assert torch.equal(rebuilt.gather(1, top.indices), top.values)
    assert torch.allclose(torch.logsumexp(rebuilt, 1), torch.logsumexp(logits, 1), atol=1e-4)  # same mass at T=1


def test_methods_declare_what_they_need_from_the_teacher():
    needs = {name: METHODS.get(name).teacher_need() for name in METHODS.names()}
    for name in ("kd", "dkd", "dist", "ctkd", "logit-kd", "aid-adapt", "nkd", "wttm"):
        assert needs[name] == "logits" and METHODS.get(name).uses_teacher_cache()
    assert needs["ce"] == "none" and needs["fitnet"] == "features" and not METHODS.get("fitnet").uses_teacher_cache()
    assert needs["dfpt-kd"] == "features" and METHODS.get("dfpt-kd").uses_teacher_cache()


def test_topk_needs_views():
    with pytest.raises(ConfigError, match="data.views"):
        build_config({"student": {"name": "resnet8"}, "data": {"teacher_cache_topk": 5}})


@pytest.mark.parametrize("method", ["dfpt-kd", "dkd"])
def test_other_cached_methods_end_bit_identical_with_and_without_the_cache(tiny_overrides, tmp_path, teacher_checkpoint, method):
    overrides = kd_overrides(tiny_overrides, tmp_path, teacher_checkpoint)
    overrides["method"] = {"name": method}
    overrides["train"]["epochs"] = 1
    cached = build_config(overrides, overrides=["name=cached"])
    assert run(cached, echo=False)["teacher_cache"] == "built"
    recomputed = build_config(overrides, overrides=["name=recomputed", "data.teacher_cache=false"])
    run(recomputed, echo=False)
    assert same_weights(weights(cached), weights(recomputed))


def test_feature_methods_keep_running_the_teacher_and_list_shows_the_needs(tiny_overrides, tmp_path, teacher_checkpoint, capsys):
    overrides = kd_overrides(tiny_overrides, tmp_path, teacher_checkpoint)
    overrides["method"] = {"name": "at"}
    overrides["train"]["epochs"] = 1
    assert "teacher_cache" not in run(build_config(overrides), echo=False)
    assert not (tmp_path / "tcache").exists()
    from gapkd.cli import main

    assert main(["list", "methods", "-v"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "teacher: logits" in lines["kd"] and "teacher: features " in lines["at"] and "teacher: none" in lines["ce"]
    assert "teacher: features+cache" in lines["dfpt-kd"]


def test_streamed_data_gets_fixed_views_and_a_cache_too(tiny_overrides, tmp_path):
    from gapkd.testing import write_image

    for c in range(3):
        for i in range(6):
            write_image(tmp_path / "tree" / "train" / f"c{c}" / f"{i}.jpg", 10 * c + i, quality=95)
        write_image(tmp_path / "tree" / "val" / f"c{c}" / "0.jpg", 100 + c, quality=95)
    data = {"name": "image-folder-stream", "path": str(tmp_path / "tree"), "image_size": 16, "batch_size": 4,
            "eval_batch_size": 5, "val_fraction": 0.2, "workers": 0}
    tiny_overrides["data"] = dict(data)
    teacher = build_config(tiny_overrides, overrides=["name=teacher", "train.epochs=1"])
    run(teacher, echo=False)
    tiny_overrides["data"] = dict(data)
    overrides = kd_overrides(tiny_overrides, tmp_path, str(run_dir_for(teacher) / "checkpoints" / "best.pt"), views=2)
    cached = build_config(overrides, overrides=["name=cached"])
    bundle = build_data(cached.data, torch.device("cpu"), seed=0)
    seen = {}
    for epoch in range(3):
        for batch in bundle.train.epoch(epoch):
            for image, sample, view in zip(batch.images, batch.indices.tolist(), batch.views.tolist()):
                seen.setdefault((sample, view), []).append(image)
    assert all(torch.equal(images[0], images[-1]) for images in seen.values()) and max(map(len, seen.values())) > 1
    assert run(cached, echo=False)["teacher_cache"] == "built"
    recomputed = build_config(overrides, overrides=["name=recomputed", "data.teacher_cache=false"])
    run(recomputed, echo=False)
    assert same_weights(weights(cached), weights(recomputed))


def test_study_runs_sharing_a_teacher_share_its_cache_and_status_counts_the_hits(tmp_path, capsys):
    import copy

    from gapkd.study import resolve_study, run_study, study_status

    raw = {
        "name": "cached",
        "base": {"data": {"name": "digits", "train_subset": 120, "test_subset": 60, "batch_size": 32,
                          "augment": {"crop_padding": 1, "flip": False}},
                 "train": {"device": "cpu", "log_every": 1000, "amp": "off"}, "schedule": {"name": "cosine"}},
        "teacher_config": {"train": {"epochs": 1}},
        "student_config": {"train": {"epochs": 1}, "data": {"views": 2, "teacher_cache_dir": str(tmp_path / "tcache")}},
        "pairs": [{"teacher": "resnet14", "student": "resnet8"}],
        "methods": {"scratch": {"name": "ce"}, "kd": {}, "dkd": {"params": {"warmup_epochs": 1}}},
        "seeds": [0, 1],
        "budgets": {"smoke": {"note": "digits, 1 epoch"}},
    }
    spec = resolve_study(copy.deepcopy(raw), "smoke")
    run_study(copy.deepcopy(spec), tmp_path / "study", echo=False, log=lambda line: None)
    status = study_status(spec, tmp_path / "study")
    assert status["done"] == 7 and status["teacher_cache"] == {"built": 1, "hit": 3}
    assert len(list((tmp_path / "tcache").iterdir())) == 1
    from gapkd.cli import main

    (tmp_path / "cached.yaml").write_text(yaml.safe_dump(raw))
    assert main(["study", "status", str(tmp_path / "cached.yaml"), "--budget", "smoke", "--dir", str(tmp_path / "study")]) == 0
    assert "teacher cache: 1 built, 3 hit" in capsys.readouterr().out


def test_a_topk_cache_trains_from_the_rebuilt_logits(tiny_overrides, tmp_path, teacher_checkpoint):
    overrides = kd_overrides(tiny_overrides, tmp_path, teacher_checkpoint, teacher_cache_topk=3)
    overrides["train"]["epochs"] = 1
    summary = run(build_config(overrides, overrides=["name=topk"]), echo=False)
    assert summary["teacher_cache"] == "built" and summary["best_val_acc"] > 0
    folder = _only_cache(tmp_path)
    assert {p.stem for p in folder.glob("*.npy")} == {"train_values", "train_index", "train_fill", "val", "test"}
    assert np.load(folder / "train_values.npy").shape[1:] == (4, 3)
    with pytest.raises(ConfigError, match="keeps all 10 classes"):
        run(build_config(overrides, overrides=["name=all", "data.teacher_cache_topk=10"]), echo=False)
