import pytest
import torch

from gapkd.errors import CheckpointError, ConfigError
from gapkd.models import create_model, list_models, load_checkpoint

# Published parameter counts (millions) at 100 classes, ../shared/reference/published-results.md
PUBLISHED_M = {"resnet8": 0.08, "resnet14": 0.18, "resnet20": 0.28, "resnet32": 0.47, "resnet44": 0.67, "resnet56": 0.86,
               "resnet110": 1.74, "resnet8x4": 1.23, "resnet32x4": 7.43}


@pytest.mark.parametrize("name", sorted(PUBLISHED_M))
def test_parameter_counts_match_published(name):
    params = sum(p.numel() for p in create_model(name, num_classes=100).parameters()) / 1e6
    # published values are rounded to 0.01M: allow that rounding plus 0.5%
    assert abs(params - PUBLISHED_M[name]) <= 0.005 + 0.005 * PUBLISHED_M[name]


@pytest.mark.parametrize("name", sorted(PUBLISHED_M))
def test_forward_backward_and_stage_contract(name):
    model = create_model(name, num_classes=7, in_channels=3)
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    assert [f.shape[1] for f in feats.stages] == model.stage_channels
    assert feats.logits.shape == (2, 7) and feats.pooled.shape == (2, model.stage_channels[-1])
    model.eval()
    assert torch.allclose(model(x), model.forward_features(x).logits)
    model.train()
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_grey_inputs_and_case_insensitive_names():
    model = create_model("ResNet20", num_classes=10, in_channels=1)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_unknown_model_suggests():
    with pytest.raises(ConfigError, match="resnet32x4"):
        create_model("resnet32x5")


def test_checkpoint_round_trip_and_foreign_wrappers(tmp_path):
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=10).eval()
    x = torch.randn(3, 3, 32, 32)
    state = model.state_dict()
    layouts = {
        "bare": state,
        "model": {"model": state, "epoch": 240},
        "state_dict": {"state_dict": state},
        "module": {"module." + k: v for k, v in state.items()},
    }
    for name, payload in layouts.items():
        torch.save(payload, tmp_path / f"{name}.pth")
        fresh = create_model("resnet8", num_classes=10).eval()
        load_checkpoint(fresh, tmp_path / f"{name}.pth")
        assert torch.equal(fresh(x), model(x)), name


def test_incompatible_checkpoint_lists_the_problem(tmp_path):
    torch.save(create_model("resnet8", num_classes=100).state_dict(), tmp_path / "c100.pth")
    with pytest.raises(CheckpointError, match=r"fc.weight: file \(100, 64\) vs model \(10, 64\)"):
        load_checkpoint(create_model("resnet8", num_classes=10), tmp_path / "c100.pth")
    torch.save(create_model("resnet20", num_classes=10).state_dict(), tmp_path / "r20.pth")
    with pytest.raises(CheckpointError, match="unexpected keys"):
        load_checkpoint(create_model("resnet8", num_classes=10), tmp_path / "r20.pth")


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /tmp/gapkd_pwned",))


def test_malicious_checkpoint_runs_no_code(tmp_path):
    import os

    torch.save({"model": _Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="never runs code"):
        load_checkpoint(create_model("resnet8", num_classes=10), tmp_path / "evil.pth")
    assert not os.path.exists("/tmp/gapkd_pwned")


def test_list_models_includes_the_cifar_family():
    assert {"resnet8", "resnet20", "resnet56", "resnet32x4"} <= set(list_models())
