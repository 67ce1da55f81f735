"""`gapkd data check` on tiny image-folder trees written here (with a truncated file, a zero-byte
file, CMYK and grey images, an empty class folder, classes missing from one split) and on digits."""
import json
from pathlib import Path

import pytest

import gapkd
from gapkd import testing
from gapkd.cli import main
from gapkd.config import DataConfig
from gapkd.data import load_dataset
from gapkd.data.streaming import tolerate_layout_problems
from gapkd.errors import DataError


def write_image(path: Path, seed: int, size=(20, 16), mode="RGB") -> None:
    testing.write_image(path, seed, size, mode)


def clean_tree(root: Path, classes=("cat", "dog", "owl"), train=3, val=2) -> Path:
    for c, name in enumerate(classes):
        for i in range(train):
            write_image(root / "train" / name / f"{i}.jpg", 10 * c + i)
        for i in range(val):
            write_image(root / "val" / name / f"{i}.png", 100 + 10 * c + i)
    return root


def broken_tree(root: Path) -> Path:
    clean_tree(root, classes=("cat", "dog"))
    for i in range(3):
        write_image(root / "train" / "owl" / f"{i}.jpg", 50 + i)  # owl: in train, not in val
    (root / "train" / "empty").mkdir()  # an empty class folder
    whole = (root / "train" / "cat" / "0.jpg").read_bytes()
    (root / "train" / "cat" / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (root / "train" / "dog" / "zero.jpg").write_bytes(b"")
    write_image(root / "train" / "cat" / "cmyk.jpg", 7, mode="CMYK")
    write_image(root / "val" / "dog" / "grey.png", 8, size=(9, 7), mode="L")
    return root


def check(capsys, *argv):
    status = main(["data", "check", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_a_clean_tree_exits_0_and_counts_every_split_and_class(tmp_path, capsys):
    root = clean_tree(tmp_path / "tree")
    status, out, err = check(capsys, "data.name=image-folder-stream", f"data.path={root}", "--workers", "0",
                             "--json", str(tmp_path / "r.json"))
    assert status == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["ok"] and report["problems"] == [] and report["class_lists_agree"]
    assert report["splits"]["train"]["images"] == 9 and report["splits"]["test"]["images"] == 6
    assert report["splits"]["train"]["per_class"] == [3, 3, 3] and report["splits"]["test"]["min_per_class"] == 2
    decode = report["decode"]
    assert decode["checked"] == decode["of"] == 15 and decode["unreadable_count"] == 0
    assert decode["converted_to_rgb"] == {} and decode["smallest"]["width"] == 20 and decode["smallest"]["height"] == 16
    assert "no problems" in out and "class lists of train and test agree" in out


def test_every_problem_of_a_broken_tree_is_named_and_it_exits_2(tmp_path, capsys):
    root = broken_tree(tmp_path / "tree")
    status, out, err = check(capsys, "data.name=image-folder-stream", f"data.path={root}", "--workers", "2",
                             "--json", str(tmp_path / "r.json"))
    assert status == 2
    report = json.loads((tmp_path / "r.json").read_text())
    decode = report["decode"]
    assert decode["checked"] == decode["of"] == 6 + 4 + 3 + 3 + 1  # every listed file, the bad ones included
    assert decode["unreadable_count"] == 2 and decode["workers"] == 1  # a pool of worker processes (one per 64 files)
    assert {u["path"] for u in decode["unreadable"]} == {"train/cat/truncated.jpg", "train/dog/zero.jpg"}
    assert decode["converted_to_rgb"] == {"CMYK": 1, "L": 1}  # converted at load: counted, not errors
    assert decode["smallest"] == {"path": "val/dog/grey.png", "width": 9, "height": 7}
    assert report["splits"]["train"]["empty_classes"] == ["empty"]
    assert report["missing_in_test"] == ["owl"] and not report["class_lists_agree"]
    assert len(report["problems"]) == 3  # empty class, owl missing in val, unreadable files
    line = err.strip().splitlines()
    assert len(line) == 1 and line[0].startswith("gapkd data: error: 3 problem(s):")
    assert "train/cat/truncated.jpg" in line[0] and "'empty'" in line[0] and "'owl'" in line[0]
    assert "remove or replace them" in line[0]
    assert "train/dog/zero.jpg: UnidentifiedImageError" in out and "CMYK 1, L 1" in out


def test_held_out_classes_that_train_lacks_are_reported_not_raised(tmp_path):
    root = clean_tree(tmp_path / "tree")
    write_image(root / "val" / "fish" / "0.jpg", 3)
    with pytest.raises(DataError, match="not among the training classes"):  # a run stops at start-up ...
        load_dataset(DataConfig(name="image-folder-stream", path=str(root)))
    report = gapkd.check_data({"name": "image-folder-stream", "path": str(root)}, workers=0)  # ... the check lists them
    assert report["unknown_in_test"] == [{"folder": str(root / "val"), "class": "fish", "images": 1}]
    assert not report["ok"] and "'fish'" in report["problems"][0]
    with tolerate_layout_problems():
        pass
    with pytest.raises(DataError):  # tolerance ends with its block
        load_dataset(DataConfig(name="image-folder-stream", path=str(root)))


def test_limit_decodes_that_many_drawn_at_random(tmp_path, capsys):
    root = clean_tree(tmp_path / "tree", train=6, val=2)
    status, out, err = check(capsys, "data.name=image-folder-stream", f"data.path={root}", "--limit", "5", "--workers", "0",
                             "--json", str(tmp_path / "r.json"))
    assert status == 0, err
    decode = json.loads((tmp_path / "r.json").read_text())["decode"]
    assert decode["checked"] == 5 and decode["of"] == 24 and decode["sample_seed"] == 0
    assert "decoded 5 of 24 images (a random sample, seed 0)" in out
    assert gapkd.check_data({"name": "image-folder-stream", "path": str(root)}, limit=100, workers=0)["decode"]["checked"] == 24


def test_a_decoded_dataset_reports_its_sizes(capsys, tmp_path):
    status, out, err = check(capsys, "data.name=digits", "--json", str(tmp_path / "r.json"))
    assert status == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert not report["streamed"] and "decode" not in report
    assert report["splits"]["train"]["images"] + report["splits"]["test"]["images"] == 1797
    assert report["image_shape"] == [1, 8, 8] and report["label_range"] == [0, 9] and report["classes"] == 10
    carved = report["carved"]
    assert carved["train"] + carved["val"] == report["splits"]["train"]["images"] and carved["val"] > 0
    assert "image shape (C, H, W): (1, 8, 8), labels 0..9" in out


def test_layout_errors_and_bad_options_exit_2_with_one_line(tmp_path, capsys):
    status, out, err = check(capsys, "data.name=image-folder-stream", f"data.path={tmp_path / 'nowhere'}")
    assert status == 2 and "is not a folder" in err and len(err.strip().splitlines()) == 1
    status, out, err = check(capsys, "data.name=digits", "train.epochs=3")
    assert status == 2 and "only data.* overrides" in err
    with pytest.raises(Exception, match="at least 1 image"):
        gapkd.check_data({"name": "digits"}, limit=0)


def test_cub_official_split_with_a_class_missing_from_test_is_reported(tmp_path):
    folder = tmp_path / "CUB_200_2011"
    classes = ["001.Albatross", "002.Sooty"]
    rows = []  # (id, file, class 1-based, is_train)
    for c, name in enumerate(classes):
        for i in range(3):
            write_image(folder / "images" / name / f"b{i}.jpg", 10 * c + i)
            rows.append((len(rows) + 1, f"{name}/b{i}.jpg", c + 1, 1 if c == 1 or i < 2 else 0))  # class 2: train only
    for file, column in (("images.txt", 1), ("image_class_labels.txt", 2), ("train_test_split.txt", 3)):
        (folder / file).write_text("".join(f"{r[0]} {r[column]}\n" for r in rows))
    (folder / "classes.txt").write_text("".join(f"{c + 1} {n}\n" for c, n in enumerate(classes)))
    cfg = {"name": "cub200", "path": str(tmp_path)}
    with pytest.raises(DataError, match="has no images of class '002.Sooty'"):  # a run stops at start-up
        load_dataset(DataConfig(**cfg))
    report = gapkd.check_data(cfg, workers=0)
    assert report["missing_in_test"] == ["002.Sooty"] and report["decode"]["checked"] == 6
    assert len(report["problems"]) == 1 and "'002.Sooty'" in report["problems"][0]
