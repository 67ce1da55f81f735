import pytest

from gapkd.config import build_config, parse_overrides
from gapkd.errors import ConfigError


def test_overrides_parse_yaml_values():
    tree = parse_overrides(["optim.lr=0.1", "schedule.milestones=[1, 2]", "train.grad_clip=null", "student.name=resnet8"])
    assert tree == {"optim": {"lr": 0.1}, "schedule": {"milestones": [1, 2]}, "train": {"grad_clip": None}, "student": {"name": "resnet8"}}


def test_unknown_key_gets_a_suggestion():
    with pytest.raises(ConfigError, match="Did you mean 'epochs'"):
        build_config({"student": {"name": "resnet8"}}, overrides=["train.epoch=3"])


def test_impossible_values_are_named():
    with pytest.raises(ConfigError, match="optim.lr"):
        build_config({"student": {"name": "resnet8"}}, overrides=["optim.lr=-0.1"])
    with pytest.raises(ConfigError, match="method.temperature"):
        build_config({"student": {"name": "resnet8"}, "teacher": {"name": "resnet20", "checkpoint": "t.pt"}},
                     overrides=["method.name=kd", "method.temperature=0"])


def test_method_hparams_are_validated_and_filled():
    cfg = build_config({"student": {"name": "resnet8"}, "teacher": {"name": "resnet20", "checkpoint": "t.pt"}},
                       overrides=["method.name=KD", "method.temperature=2"])
    assert cfg.method.name == "kd" and cfg.method.hparams == {"temperature": 2.0, "ce_weight": 0.1, "kd_weight": 0.9,
                                                                "logit_standardize": False}
    with pytest.raises(ConfigError, match="Did you mean 'temperature'"):
        build_config({"student": {"name": "resnet8"}, "teacher": {"name": "resnet20", "checkpoint": "t.pt"}},
                     overrides=["method.name=kd", "method.temprature=2"])


def test_unknown_method_and_missing_teacher():
    with pytest.raises(ConfigError, match="Did you mean 'kd'"):
        build_config({"student": {"name": "resnet8"}}, overrides=["method.name=kdd"])
    with pytest.raises(ConfigError, match="needs a trained teacher"):
        build_config({"student": {"name": "resnet8"}}, overrides=["method.name=kd"])


def test_yaml_round_trip_and_hash_ignores_output_location(tmp_path):
    cfg = build_config({"student": {"name": "resnet8"}}, overrides=["train.epochs=3"])
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    again = build_config(path=path)
    assert again == cfg
    moved = build_config(path=path, overrides=["out_dir=/elsewhere", "name=x"])
    assert moved.hparams_hash() == cfg.hparams_hash()
    assert build_config(path=path, overrides=["seed=1"]).hparams_hash() != cfg.hparams_hash()


def test_unsafe_yaml_is_refused(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("student: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        build_config(path=path)
