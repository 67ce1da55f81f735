import math

import numpy as np
import pytest
import torch

from gapkd.methods.losses import kd_kl


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def test_kd_kl_matches_hand_computation():
    s = np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = np.array([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    tau = 2.0
    expected = 0.0
    for si, ti in zip(s, t):
        p, q = _softmax(ti / tau), _softmax(si / tau)
        expected += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    expected = expected / len(s) * tau**2
    got = kd_kl(torch.tensor(s), torch.tensor(t), tau)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_kd_kl_zero_for_identical_logits_and_positive_otherwise():
    x = torch.randn(5, 10)
    assert kd_kl(x, x, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_kl(x, torch.randn(5, 10), 4.0).item() > 0


def test_kd_method_combines_weighted_terms():
    from gapkd.methods import METHODS, StepInfo
    from gapkd.models import create_model

    torch.manual_seed(0)
    student, teacher = create_model("resnet8", num_classes=10), create_model("resnet14", num_classes=10)
    kd = METHODS.get("kd")(student, teacher, temperature=3.0, ce_weight=0.2, kd_weight=0.7)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    kd.train()
    out = kd(x, y, StepInfo(0, 0, 1, 1))
    with torch.no_grad():
        s_logits, t_logits = out.logits, teacher(x)
    assert out.losses["ce"].item() == pytest.approx(0.2 * torch.nn.functional.cross_entropy(s_logits, y).item(), rel=1e-5)
    assert out.losses["kd"].item() == pytest.approx(0.7 * kd_kl(s_logits, t_logits, 3.0).item(), rel=1e-5)
    assert not teacher.training  # the frozen teacher stays in eval mode
