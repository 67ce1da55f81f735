"""Plugins: methods and models registered by the user's own modules, used from the `gapkd` command and
YAML (`plugins:` / `--plugin`), from installed packages' entry points, and passed through pipelines,
studies and saved run configs. Every test writes its own plugin file with names of its own, so the
names are not registered before the test asks for them (the import order is really exercised)."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
import uuid
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest
import yaml

from gapkd import pipelines, plugins
from gapkd.cli import main
from gapkd.config import build_config
from gapkd.errors import ConfigError
from gapkd.methods import METHODS
from gapkd.models import MODELS

SRC = Path(__file__).resolve().parents[1] / "src"

#: a tiny plugin: Ba & Caruana's logit regression (as tests/test_method_template.py) and a one-block model
PLUGIN = '''
"""A test plugin registering the method METHOD and the model MODEL."""
from __future__ import annotations

from typing import Annotated

from pydantic import Field
from torch import nn

from gapkd.methods import Distiller, StepOutput, hparams, register_method
from gapkd.models import register_model, wrap_model


@hparams
class L2Hparams:
    weight: Annotated[float, Field(gt=0)] = 1.0
    """weight of half the squared L2 distance between student and teacher logits"""


@register_method("METHOD")
class LogitL2(Distiller):
    """Logit regression to the teacher (a test plugin)."""

    Hparams = L2Hparams

    def forward(self, images, labels, step):
        teacher_logits = self.teacher_forward(images).logits
        logits = self.student(images)
        return StepOutput({"l2": self.hparams.weight * 0.5 * (logits - teacher_logits).pow(2).sum(dim=1).mean()}, logits)


class TinyNet(nn.Module):
    def __init__(self, num_classes, in_channels, width=16):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(self.block(x).mean(dim=(2, 3)))


def tinynet(num_classes, in_channels, width=16):
    return wrap_model(TinyNet(num_classes, in_channels, width), stages=["block"], classifier="fc", input_size=8,
                      in_channels=in_channels)


register_model("MODEL", tinynet, input_size=8)
'''


@dataclass
class Plugin:
    path: Path
    method: str
    model: str


def write_plugin(folder: Path, filename: str = "my_method.py") -> Plugin:
    """A plugin file with fresh names (never registered in this process before)."""
    tag = uuid.uuid4().hex[:8]
    folder.mkdir(parents=True, exist_ok=True)
    plugin = Plugin(folder / filename, f"l2-{tag}", f"tinynet-{tag}")
    plugin.path.write_text(PLUGIN.replace("METHOD", plugin.method).replace("MODEL", plugin.model))
    return plugin


@pytest.fixture
def plugin(tmp_path) -> Plugin:
    return write_plugin(tmp_path)


@pytest.fixture
def recipe(tiny_overrides) -> dict:
    """tests/conftest.py's tiny digits config as a YAML tree (one epoch)."""
    tree = copy.deepcopy(tiny_overrides)
    tree["train"]["epochs"] = 1
    return tree


def test_the_hash_of_configs_without_plugins_is_unchanged(plugin):
    tree = {"student": {"name": "resnet8"}, "teacher": {"name": "resnet14", "checkpoint": "t.pt"},
            "method": {"name": "kd", "temperature": 2.0}, "data": {"name": "digits", "batch_size": 64}, "train": {"epochs": 2}}
    cfg = build_config(tree)
    # computed on branch main (849e0c3) before `plugins` existed: existing runs keep their names and resume
    assert cfg.hparams_hash() == "48f82f2f" and cfg.default_name() == "digits_resnet14-resnet8_kd_s0_48f82f2f"
    assert build_config({**tree, "plugins": []}).hparams_hash() == "48f82f2f"
    with_plugin = build_config({**tree, "plugins": [str(plugin.path)]})
    assert with_plugin.plugins == [str(plugin.path)] and with_plugin.hparams_hash() != "48f82f2f"  # code that changes the result


def test_plugins_are_imported_before_the_method_is_validated(plugin, monkeypatch, tmp_path):
    assert plugin.method not in METHODS
    with pytest.raises(ConfigError, match="Unknown method"):
        build_config({"student": {"name": "resnet8"}}, overrides=[f"method.name={plugin.method}"])
    teacher = ["teacher.name=resnet8", "teacher.checkpoint=t.pt", "student.name=resnet8"]
    monkeypatch.chdir(plugin.path.parent)
    cfg = build_config(overrides=["plugins=[./my_method.py]", f"method.name={plugin.method}", "method.weight=2", *teacher])
    assert cfg.plugins == ["./my_method.py"] and cfg.method.hparams == {"weight": 2.0}
    with pytest.raises(ConfigError, match="method.weight"):  # validated against the plugin's own Hparams
        build_config(overrides=["plugins=[./my_method.py]", f"method.name={plugin.method}", "method.weight=-1", *teacher])
    # the same file by another path is the same module (imported once, registered once)
    assert plugins.module_name_for("./my_method.py") == plugins.module_name_for(plugin.path)
    assert plugins.import_plugin(str(plugin.path)) is plugins.import_plugin("./my_method.py")

    # an importable module name, one string as a list of one, and a dict config
    other = write_plugin(tmp_path / "modules", "gapkd_test_plugin_mod.py")
    monkeypatch.syspath_prepend(str(other.path.parent))
    cfg = build_config({"plugins": "gapkd_test_plugin_mod", "student": {"name": other.model, "options": {"width": 4}}})
    assert cfg.plugins == ["gapkd_test_plugin_mod"] and other.model in MODELS
    with pytest.raises(ConfigError, match="plugins must be a list"):
        build_config({"plugins": [3], "student": {"name": "resnet8"}})


def test_a_plugin_that_cannot_be_imported_is_one_clear_error_and_nothing_is_written(tmp_path, recipe, capsys):
    out_dir = Path(recipe["out_dir"])
    assert main(["train", "--plugin", "gapkd_no_such_plugin.kd", f"out_dir={out_dir}", "student.name=resnet8"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("gapkd train: error: cannot import the plugin 'gapkd_no_such_plugin.kd'")
    assert "No module named 'gapkd_no_such_plugin'" in err and "PYTHONPATH" in err and "--plugin ./my_method.py" in err

    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({**recipe, "plugins": ["./missing_method.py"]}))
    assert main(["train", "-c", str(tmp_path / "cfg.yaml"), "--trust-plugins"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "plugin file ./missing_method.py does not exist" in err
    assert not out_dir.exists()

    # a plugin whose own import fails names the module it lacks
    (tmp_path / "needs_more.py").write_text("import gapkd_missing_dependency\n")
    assert main(["list", "methods", "--plugin", str(tmp_path / "needs_more.py")]) == 2
    assert "No module named 'gapkd_missing_dependency'" in capsys.readouterr().err
    assert not any(name.startswith("gapkd_plugin_needs_more") for name in sys.modules)  # a failed import leaves nothing behind


def test_list_shows_what_plugins_register(plugin, capsys):
    assert main(["list", "methods"]) == 0
    assert plugin.method not in capsys.readouterr().out.split()
    assert main(["list", "methods", "--plugin", str(plugin.path)]) == 0
    assert plugin.method in capsys.readouterr().out.split()
    assert main(["--plugin", str(plugin.path), "list", "models", "-v"]) == 0  # the global form, before the command
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(plugin.model))
    assert "stages [16]" in line


def test_train_and_distill_from_the_command_line_with_yaml_plugins_and_with_plugin_option(plugin, recipe, monkeypatch, capsys):
    monkeypatch.chdir(plugin.path.parent)
    (plugin.path.parent / "teacher.yaml").write_text(yaml.safe_dump({**recipe, "name": "teacher", "student": {"name": plugin.model}}))
    assert main(["train", "-c", "teacher.yaml", "--plugin", "./my_method.py", "--quiet"]) == 0
    teacher = json.loads(capsys.readouterr().out)
    assert teacher["student"] == plugin.model

    recipe.update(teacher={"name": plugin.model, "checkpoint": str(Path(recipe["out_dir"]) / "teacher" / "checkpoints" / "best.pt")},
                  method={"name": plugin.method, "weight": 0.5})
    (plugin.path.parent / "distill.yaml").write_text(yaml.safe_dump({**recipe, "plugins": ["./my_method.py"]}))
    assert main(["distill", "-c", "distill.yaml", "run.name=from-yaml", "--quiet", "--trust-plugins"]) == 0
    from_yaml = json.loads(capsys.readouterr().out)
    run_dir = Path(recipe["out_dir"]) / "from-yaml"
    assert from_yaml["method"] == plugin.method and from_yaml["teacher"] == plugin.model
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("loss/l2" in record for record in records)  # the plugin's loss term trained the student
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["plugins"] == ["./my_method.py"] and saved["method"] == {"name": plugin.method, "weight": 0.5}

    # the saved config re-runs as it is: same config, same hash, so the finished run is recognised
    assert main(["distill", "-c", str(run_dir / "config.yaml"), "--plugin", "./my_method.py"]) == 0
    assert "already finished" in capsys.readouterr().out

    # --plugin is the same as listing the module in `plugins`: the same config and hash
    (plugin.path.parent / "no-plugins.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["distill", "-c", "no-plugins.yaml", "--plugin", "./my_method.py", "run.name=from-option", "--quiet"]) == 0
    from_option = json.loads(capsys.readouterr().out)
    assert from_option["config_hash"] == from_yaml["config_hash"]
    assert yaml.safe_load((Path(recipe["out_dir"]) / "from-option" / "config.yaml").read_text())["plugins"] == ["./my_method.py"]


def test_plugin_option_adds_to_the_configs_plugins(plugin, tmp_path, recipe, monkeypatch):
    other = write_plugin(tmp_path / "other", "other.py")
    seen = []
    monkeypatch.setattr(pipelines.api, "run", lambda cfg, **kwargs: seen.append(cfg) or {"run": cfg.name})
    recipe.update(plugins=[str(plugin.path)], teacher={"name": "resnet14", "checkpoint": "t.pt"}, method={"name": plugin.method})
    (tmp_path / "takd.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["pipeline", "takd", "-c", str(tmp_path / "takd.yaml"), f"takd.assistant={other.model}", "--plugin", str(other.path),
                 "--quiet", "--trust-plugins"]) == 0
    assert [cfg.name for cfg in seen] == [f"assistant-{other.model}", "student"]
    assert all(cfg.plugins == [str(plugin.path), str(other.path)] and cfg.method.name == plugin.method for cfg in seen)
    assert seen[0].student.name == other.model and seen[1].teacher.name == other.model


def test_a_study_imports_the_plugins_its_base_names(plugin, tmp_path, recipe, capsys):
    """The study checks every method and model name up front: its plugins must be imported first."""
    base = {key: recipe[key] for key in ("data", "optim", "schedule", "train")}
    base["data"].update(train_subset=120, test_subset=60)
    base["plugins"] = [str(plugin.path)]
    study = {"name": "plugin-study", "base": base, "pairs": [{"teacher": plugin.model, "student": "resnet8"}],
             "methods": {"scratch": {"name": "ce"}, "l2": {"name": plugin.method}}, "seeds": [0]}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    assert plugin.method not in METHODS
    assert main(["study", "run", str(tmp_path / "study.yaml"), "--dir", str(tmp_path / "study"), "--quiet", "--trust-plugins"]) == 0
    assert "3 trained, 0 already finished, 0 failed" in capsys.readouterr().out
    configs = [yaml.safe_load(path.read_text()) for path in (tmp_path / "study" / "runs").rglob("config.yaml")]
    assert len(configs) == 3 and all(cfg["plugins"] == [str(plugin.path)] for cfg in configs)
    assert {cfg["method"]["name"] for cfg in configs} == {"ce", plugin.method}


def test_entry_points_load_on_a_registry_miss_and_a_broken_one_warns_once(tmp_path, monkeypatch):
    plugin = write_plugin(tmp_path, "gapkd_entry_point_plugin.py")
    monkeypatch.syspath_prepend(str(tmp_path))
    entry_points = [metadata.EntryPoint("tiny", "gapkd_entry_point_plugin", plugins.ENTRY_POINT_GROUP),
                    metadata.EntryPoint("broken", "gapkd_entry_point_missing:register", plugins.ENTRY_POINT_GROUP)]
    groups = []
    monkeypatch.setattr(metadata, "entry_points", lambda group: groups.append(group) or entry_points)
    monkeypatch.setattr(plugins, "_entry_points_loaded", False)

    assert METHODS.get("kd") is not None and groups == []  # a name that is there loads nothing
    with pytest.warns(plugins.PluginWarning, match=r"'broken' \(gapkd_entry_point_missing:register") as caught:
        cfg = build_config(overrides=[f"method.name={plugin.method}", "student.name=resnet8", "teacher.name=resnet8",
                                      "teacher.checkpoint=t.pt"])
    assert len(caught) == 1 and "No module named 'gapkd_entry_point_missing'" in str(caught[0].message)
    assert cfg.method.name == plugin.method and cfg.plugins == []  # installed plugins need no `plugins:` entry
    assert plugin.model in MODELS.names() and groups == [plugins.ENTRY_POINT_GROUP]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither a second load nor a second warning
        assert "no-such-method" not in METHODS and groups == [plugins.ENTRY_POINT_GROUP]
        with pytest.raises(ConfigError, match="Unknown method"):
            METHODS.get("no-such-method")


def test_import_gapkd_loads_no_plugin_and_list_finds_an_installed_one(tmp_path):
    """A package installed with a gapkd.plugins entry point (a real dist-info folder on sys.path)."""
    plugin = write_plugin(tmp_path, "gapkd_installed_plugin.py")
    info = tmp_path / "gapkd_installed_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: gapkd-installed-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[gapkd.plugins]\ntiny = gapkd_installed_plugin\n")
    code = ("import sys, gapkd, gapkd.plugins; from gapkd.config import build_config; "
            "build_config({'student': {'name': 'resnet8'}, 'method': {'name': 'kd'}, 'teacher': {'name': 'resnet8', 'checkpoint': 't'}}); "
            "print(gapkd.plugins._entry_points_loaded, 'gapkd_installed_plugin' in sys.modules); "
            "from gapkd.cli import main; main(['list', 'methods'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": f"{SRC}:{tmp_path}"}).stdout.splitlines()
    assert out[0] == "False False"  # neither `import gapkd` nor a config of built-in names imports plugins
    assert plugin.method in out[1:] and "kd" in out[1:]
