"""Issue 21's adversarial findings, each reproduced and now handled (see docs/reliability.md)."""
from __future__ import annotations

import pytest
import torch

from gapkd.config import build_config
from gapkd.engine.precision import stride_exceeds_input
from gapkd.engine.trainer import autocast_context


def _conv_weight_grad(conv: torch.nn.Conv2d, x: torch.Tensor, ctx) -> torch.Tensor:
    conv.zero_grad(set_to_none=True)
    junk = torch.full((conv.weight.numel() * 8,), 3e38)  # what a buggy kernel would read back from freed memory
    del junk
    with ctx():
        out = conv(x)
    out.float().sum().backward()
    return conv.weight.grad.clone()


@pytest.mark.parametrize("size, kernel, stride, padding", [(1, 3, 2, 1), (1, 7, 2, 3), (2, 3, 3, 1), (4, 3, 2, 1)])
def test_cpu_bf16_conv_weight_grad_guard(size, kernel, stride, padding):
    """Finding 7: under CPU bf16 autocast, a conv whose stride exceeds its input (resnet18's ImageNet stem on
    digits: 3x3 stride-2 on 1x1 maps) got weight gradients of 1e19..1e26 from uninitialised memory (oneDNN);
    train.amp's autocast runs those in fp32, so the gradient matches fp32's every time."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(64, 64, kernel, stride, padding, bias=False).to(memory_format=torch.channels_last)
    x = torch.randn(8, 64, size, size).contiguous(memory_format=torch.channels_last)
    reference = _conv_weight_grad(conv, x, autocast_context(torch.device("cpu"), "off")[0])
    ctx, dtype = autocast_context(torch.device("cpu"), "bf16")
    assert dtype is torch.bfloat16
    for _ in range(4):
        grad = _conv_weight_grad(conv, x, ctx)
        assert torch.isfinite(grad).all()
        assert (grad - reference).abs().max() <= 0.02 * reference.abs().max() + 1e-3
    with ctx():
        assert conv(x).dtype is torch.bfloat16  # what autocast hands on, whichever precision computed it


def test_guard_touches_only_convs_whose_stride_exceeds_the_input():
    weight3, weight1 = torch.empty(4, 4, 3, 3), torch.empty(4, 4, 1, 1)
    assert stride_exceeds_input(torch.empty(2, 4, 1, 1), weight3, 2)
    assert stride_exceeds_input(torch.empty(2, 4, 2, 8), weight3, (3, 1))
    assert not stride_exceeds_input(torch.empty(2, 4, 2, 2), weight3, 2)
    assert not stride_exceeds_input(torch.empty(2, 4, 1, 1), weight1, 2)  # 1x1 kernels are computed right
    assert not stride_exceeds_input(torch.empty(2, 4, 1, 1), weight3, 1)


@pytest.mark.parametrize("seed", [0, 2])
def test_resnet18_imagenet_stem_trains_on_digits_in_bf16(seed, tiny_overrides):
    """The capacity study's smoke stem ablation, which stopped with a NaN gradient norm at step 0-3 in bf16."""
    from gapkd.api import run

    tiny_overrides["train"].update(amp="bf16", epochs=1, grad_clip=1.0)
    tiny_overrides["data"].update(train_subset=128, test_subset=64, batch_size=32, drop_last=True)
    tiny_overrides.update(seed=seed, student={"name": "resnet18", "options": {"stem": "imagenet"}})
    summary = run(build_config({"method": {"name": "ce"}}, None, tiny_overrides), echo=False)
    assert summary["skipped_steps"] == 0 and summary["last_test_acc"] is not None


# ---------------------------------------------------------------- finding 4: files never run code unasked

@pytest.fixture
def canary_plugin(tmp_path):
    """A plugin whose import leaves a mark on disk: proof that its code ran."""
    mark = tmp_path / "EXECUTED"
    path = tmp_path / "evil.py"
    path.write_text(f"open({str(mark)!r}, 'w').write('ran')\n")
    return path, mark


def _recipe(tmp_path, plugins, **extra):
    import yaml

    tree = {"plugins": plugins, "student": {"name": "resnet8"}, "data": {"name": "digits"}, "train": {"epochs": 1, "amp": "off"},
            "out_dir": str(tmp_path / "runs"), **extra}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_a_recipe_listing_a_plugin_is_refused_without_opt_in(tmp_path, canary_plugin, capsys):
    from gapkd.cli import main

    evil, mark = canary_plugin
    recipe = _recipe(tmp_path, [str(evil)])
    for argv in (["train", "-c", str(recipe)], ["study", "status", str(tmp_path / "study.yaml")],
                 ["export", str(tmp_path / "runs" / "victim")]):
        if argv[0] == "study":
            import yaml

            (tmp_path / "study.yaml").write_text(yaml.safe_dump({"name": "s", "base": {"plugins": [str(evil)]},
                                                                  "pairs": [{"student": "resnet8"}], "methods": {"ce": {"name": "ce"}}}))
        if argv[0] == "export":
            run_dir = tmp_path / "runs" / "victim"
            (run_dir / "checkpoints").mkdir(parents=True)
            (run_dir / "checkpoints" / "best.pt").write_bytes(b"")
            (run_dir / "config.yaml").write_text(recipe.read_text())
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "runs their Python code" in err and f"--plugin {evil}" in err and "--trust-plugins" in err, err
        assert len(err.strip().splitlines()) == 1
        assert not mark.exists(), argv  # nothing ran


def test_opting_in_imports_the_plugin_with_a_warning_naming_the_file(tmp_path, canary_plugin):
    from gapkd.config import build_config
    from gapkd.plugins import PluginWarning, command_line_plugins, trust_plugins

    evil, mark = canary_plugin
    recipe = _recipe(tmp_path, [str(evil)])
    with trust_plugins(), pytest.warns(PluginWarning, match=f"{evil}.*{recipe}.*code runs"):
        build_config({"method": {"name": "ce"}}, recipe)
    assert mark.exists()
    mark.unlink()
    import sys

    from gapkd.plugins import module_name_for

    sys.modules.pop(module_name_for(evil))
    with command_line_plugins([str(evil)]), pytest.warns(PluginWarning, match=str(recipe)):  # --plugin names it: opted in
        cfg = build_config({"method": {"name": "ce"}}, recipe)
    assert mark.exists() and cfg.plugins == [str(evil)]
    # a plugin given in Python (or on the command line) is the caller's own choice: no opt-in needed
    assert build_config({"method": {"name": "ce"}, "plugins": [str(evil)], "student": {"name": "resnet8"}}).plugins == [str(evil)]


def test_a_folder_given_as_config_is_named_as_a_folder(tmp_path):
    from gapkd.config import build_config
    from gapkd.errors import ConfigError

    (tmp_path / "config.yaml").write_text("student: {name: resnet8}\n")
    with pytest.raises(ConfigError, match=f"{tmp_path} is a folder.*{tmp_path / 'config.yaml'}"):
        build_config(None, tmp_path)
