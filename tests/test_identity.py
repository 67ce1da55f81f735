"""Run identity comes from a mark on each config field (gapkd.config.identity), and every recipe
keeps the run hash and study run key it had when they came from hand-kept key lists."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from gapkd.config import RunConfig, build_config, identity_payload
from gapkd.core.errors import ConfigError
from gapkd.study.spec import run_key

REPO = Path(__file__).resolve().parents[1]
#: recipe|variant -> [hparams_hash, run_key(cfg, "student")], computed by main at 608d5e7 (its hand-kept key lists)
PINNED = json.loads((Path(__file__).parent / "data" / "recipe_identities.json").read_text())
VARIANTS = [
    [],
    ["train.compile=true", "train.compile_mode=reduce-overhead"],
    ["data.image_size=64"],
    ["train.fold_teacher_bn=false", "data.augment.scale=[0.2,1.0]", "train.log_every=3", "train.tensorboard=true", "data.workers=2",
     "train.threads=2", "data.root=/x", "name=n", "out_dir=o"],
    ["train.grad_clip_mode=global", "data.path=/elsewhere/images.tar.gz"],
]


def test_every_recipe_keeps_its_run_hash_and_study_key():
    changed = []
    for key, pinned in PINNED.items():
        recipe, variant = key.split("|")
        cfg = build_config({"method": {"name": "ce"}}, REPO / recipe, VARIANTS[int(variant)])
        if [cfg.hparams_hash(), run_key(cfg, "student")] != pinned:
            changed.append(key)
    assert len(PINNED) > 1000 and changed == []


def test_marks_decide_what_is_hashed():
    base = build_config(overrides={"student": {"name": "resnet8"}})
    payload = identity_payload(base, "run_hash")
    assert "name" not in payload and "out_dir" not in payload and "plugins" not in payload  # never / when-set at its default
    assert "log_every" not in payload["train"] and "threads" in payload["train"]
    assert "root" not in identity_payload(base, "study_key")["data"] and "root" in payload["data"]
    unmarked = [name for name, info in RunConfig.model_fields["train"].annotation.model_fields.items()
                if not (info.json_schema_extra or {}).get("identity")]
    assert "epochs" in unmarked and "log_every" not in unmarked


def test_run_is_a_config_section():
    cfg = build_config(overrides={"student": {"name": "resnet8"}, "run": {"name": "r1", "out_dir": "elsewhere"}})
    assert (cfg.name, cfg.out_dir) == ("r1", "elsewhere") and (cfg.run.name, cfg.run.out_dir) == ("r1", "elsewhere")
    assert cfg.hparams_hash() == build_config(overrides={"student": {"name": "resnet8"}}).hparams_hash()
    assert build_config(overrides=["student.name=resnet8", "run.name=r2"]).name == "r2"
    # a later layer wins, whichever spelling each layer uses
    assert build_config({"name": "a"}, None, ["student.name=resnet8", "run.name=b"]).name == "b"
    with pytest.raises(ConfigError, match="run.name"):
        build_config(overrides={"student": {"name": "resnet8"}, "run": {"name": "a"}, "name": "b"})
    with pytest.raises(ConfigError, match="run.nmae: unknown key"):
        build_config(overrides=["student.name=resnet8", "run.nmae=x"])
