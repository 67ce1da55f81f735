"""Fold a frozen model's BatchNorm layers into the convolutions that feed them.

A teacher in distillation is frozen and in eval mode for good, so ``bn(conv(x))`` is one
affine map per channel after the convolution: scaling the conv's weights and giving it a bias
computes the same thing without the BatchNorm pass (and, on DFPT-KD's prompt path, without
its backward). Which conv feeds which BatchNorm is read off a traced forward pass, so any
architecture works; the folded model is then checked against the original on a random batch,
and left as it was if any output differs — so a model whose conv output is also used
elsewhere is never changed.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

#: folded outputs may differ from the original by rounding: this much, relative to their scale
FOLD_TOLERANCE = 1e-3


def _conv_bn_pairs(model: nn.Module, example: Tensor) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """(conv, bn) pairs where bn's input is exactly conv's output tensor in a forward pass."""
    made_by: dict[int, tuple[nn.Conv2d, Tensor]] = {}  # holding each output keeps its id from being reused
    pairs: list[tuple[nn.Conv2d, nn.BatchNorm2d]] = []

    def after_conv(module, inputs, output):
        made_by[id(output)] = (module, output)

    def after_bn(module, inputs, output):
        conv, _ = made_by.get(id(inputs[0]), (None, None))
        if conv is not None and (conv, module) not in pairs:
            pairs.append((conv, module))

    handles = [
        m.register_forward_hook(after_conv if isinstance(m, nn.Conv2d) else after_bn)
        for m in model.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))
    ]
    try:
        with torch.no_grad():
            _outputs(model, example)
    finally:
        for handle in handles:
            handle.remove()
    used = [bn for _, bn in pairs]
    convs = [conv for conv, _ in pairs]
    # a BN fed by two convs, or a conv feeding two BNs, cannot be folded
    return [(c, b) for c, b in pairs if used.count(b) == 1 and convs.count(c) == 1 and b.track_running_stats]


def _outputs(model: nn.Module, x: Tensor) -> list[Tensor]:
    """Every tensor the model exposes: stage features, pooled features and logits where it has them."""
    if hasattr(model, "forward_features"):
        features = model.forward_features(x)
        return [*features.stages, *features.preact, features.pooled, features.logits]
    return [model(x)]


def _containers(model: nn.Module) -> list[nn.Module]:
    """Every module that may hold a child by reference, including StagedNet's unregistered stage chains."""
    chains = [m for chain in model.__dict__.get("_stage_list", []) for m in chain.modules()]
    return [*model.modules(), *chains]


@torch.no_grad()
def _fold_into(model: nn.Module, pairs: list[tuple[nn.Conv2d, nn.BatchNorm2d]]) -> None:
    for conv, bn in pairs:
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1 / torch.sqrt(bn.running_var + bn.eps)
        shift = (bn.bias if bn.affine else 0) - bn.running_mean * scale
        bias = shift + (conv.bias * scale if conv.bias is not None else 0)
        conv.weight.mul_(scale.view(-1, 1, 1, 1))
        conv.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        for container in _containers(model):
            for name, child in list(container._modules.items()):
                if child is bn:
                    container._modules[name] = nn.Identity()


def fold_batchnorm(model: nn.Module, example: Tensor) -> int:
    """Fold, in place, every BatchNorm2d of an eval-mode ``model`` into the conv that feeds it.
    ``example``: one input batch of the right shape (values do not matter). Returns the number
    of layers folded, or 0 (model unchanged) when the folded model's outputs differ from the
    original's by more than rounding."""
    if model.training:
        raise ValueError("fold_batchnorm needs a model in eval mode (BatchNorm must use running statistics)")
    pairs = _conv_bn_pairs(model, example)
    if not pairs:
        return 0
    folded = copy.deepcopy(model)
    index = {id(m): name for name, m in model.named_modules()}
    lookup = dict(folded.named_modules())
    _fold_into(folded, [(lookup[index[id(c)]], lookup[index[id(b)]]) for c, b in pairs])
    with torch.no_grad():
        reference, candidate = _outputs(model, example), _outputs(folded, example)
    for ref, out in zip(reference, candidate):
        scale = max(1.0, float(ref.abs().max()))
        if ref.shape != out.shape or float((ref - out).abs().max()) > FOLD_TOLERANCE * scale:
            return 0
    _fold_into(model, pairs)
    return len(pairs)
