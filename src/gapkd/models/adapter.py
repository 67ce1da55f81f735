"""Any ``nn.Module`` as a teacher or student: name its stage modules and its classifier.

``wrap_model(module, stages=[...], classifier='fc')`` returns a :class:`WrappedModel`, a
:class:`StagedNet` built on forward hooks:

- ``forward(x)`` is the module's own forward (its logits);
- ``forward_features(x)`` runs the module once and returns the hooked stage outputs (a stage
  may be one module or a list of consecutive modules), the input
  of the classifier (``pooled``) and the logits;
- ``stage_channels`` and ``num_classes`` come from one dummy forward pass at wrap time.

Running stage by stage (``forward_stem``, ``stages``, ``forward_head``, as DFPT-KD does) is
possible when the module is *sequential through the named stages*: each named stage takes the
previous stage's output as its only input, and the logits are ``classifier(pool(last stage
output))`` with ``pool`` global average pooling (or the ``pool`` you pass). The wrap-time dummy
forward checks this numerically; when it does not hold (for example a stage that runs twice,
a skip connection across stages, or a norm layer between the last stage and the classifier),
those three raise a ConfigError that says why, while ``forward`` and ``forward_features`` still
work. ``forward_stem`` runs the module until the first stage starts, then stops it.

The wrapper's state dict has the wrapped module's own parameter names (no prefix), so its
checkpoints load back into the plain module and the module's checkpoints load into the wrapper.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.errors import ConfigError, suggest
from .base import Features, StagedNet


class _StemReached(Exception):
    """Raised inside the module's forward when the first stage is about to run."""

    def __init__(self, value: Tensor):
        super().__init__()
        self.value = value


class _Recorder:
    """What the hooks write into during one forward pass. Owned by the wrapper; the hooks hold it
    (not the wrapper), so copying one stage module copies only this small object."""

    def __init__(self, count: int):
        self.count = count
        self.active = False
        self.stop_at_stem = False
        self.reset()

    def reset(self) -> None:
        self.outputs: list[Tensor | None] = [None] * self.count
        self.inputs: list[tuple | None] = [None] * self.count
        self.calls = [0] * self.count
        self.order: list[int] = []
        self.pooled: Tensor | None = None


def _on_stage_input(recorder: _Recorder, index: int, module: nn.Module, args: tuple) -> None:
    if index == 0 and recorder.stop_at_stem:
        raise _StemReached(args[0] if args else None)
    if recorder.active:
        recorder.inputs[index] = args


def _on_stage_output(recorder: _Recorder, index: int, module: nn.Module, args: tuple, output) -> None:
    if recorder.active:
        recorder.outputs[index] = output
        recorder.calls[index] += 1
        recorder.order.append(index)


def _on_classifier_input(recorder: _Recorder, module: nn.Module, args: tuple) -> None:
    if recorder.active:
        recorder.pooled = args[0] if args else None


def global_average_pool(x: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, C); (N, C) passes unchanged."""
    if x.dim() == 4:
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
    if x.dim() == 2:
        return x
    raise ConfigError(f"no default pooling for stage outputs of shape {tuple(x.shape)}; pass pool=... to wrap_model.")


def _submodule(model: nn.Module, name: str, role: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        raise ConfigError(f"{type(model).__name__} has no module {name!r} (named as {role}).{suggest(name, names)} "
                          f"Its top-level modules: {', '.join(n for n, _ in model.named_children())}.") from None


class WrappedModel(StagedNet):
    """A user's module seen as a StagedNet through forward hooks (see the module docstring)."""

    def __init__(self, model: nn.Module, stages: list[str | list[str]], classifier: str, input_size: int = 224, in_channels: int = 3,
                 pool: Callable[[Tensor], Tensor] | None = None):
        if not stages:
            raise ConfigError("wrap_model needs at least one stage name.")
        super().__init__(0, in_channels, [])
        self.model = model
        groups = [[stage] if isinstance(stage, str) else list(stage) for stage in stages]
        if not all(groups):
            raise ConfigError("a stage given as a list of module names needs at least one name.")
        self.stage_names = [names[0] if len(names) == 1 else f"{names[0]}..{names[-1]}" for names in groups]
        self.classifier_name = classifier
        parts = [[_submodule(model, name, "a stage") for name in names] for names in groups]
        # plain lists, so nothing is registered twice; a multi-module stage runs its modules in order
        self.stage_modules = [group[0] if len(group) == 1 else nn.Sequential(*group) for group in parts]
        self.__dict__["_classifier"] = _submodule(model, classifier, "the classifier")
        self.pool = pool or global_average_pool
        self._recorder = _Recorder(len(groups))
        for index, group in enumerate(parts):
            group[0].register_forward_pre_hook(partial(_on_stage_input, self._recorder, index))
            group[-1].register_forward_hook(partial(_on_stage_output, self._recorder, index))
        self._classifier.register_forward_pre_hook(partial(_on_classifier_input, self._recorder))
        self._hooked = [module for group in parts for module in (group[0], group[-1])] + [self._classifier]
        self.register_state_dict_post_hook(_strip_prefix)
        self.register_load_state_dict_pre_hook(_add_prefix)
        self._staged_error = self._probe(input_size)

    # --- wrap-time checks ---------------------------------------------------------------
    def _probe(self, input_size: int) -> str | None:
        """One dummy forward: infer stage channels and classes; return why stage-by-stage running
        is impossible, or None when it reproduces the module's forward."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                x = torch.randn(2, self.in_channels, input_size, input_size, generator=torch.Generator().manual_seed(0))
                x = x.to(next(self.model.parameters(), torch.empty(0)).device)
                logits, run = self._run_recorded(x)
                if not isinstance(logits, Tensor) or logits.dim() != 2:
                    raise ConfigError(f"the wrapped module must return logits of shape (N, classes); it returned {_describe(logits)}.")
                for name, calls in zip(self.stage_names, run.calls):
                    if calls == 0:
                        raise ConfigError(f"stage {name!r} did not run in the module's forward pass; name modules the forward uses.")
                features = self._features(logits, run)
                self.num_classes = int(logits.shape[1])
                self.stage_channels = [int(out.shape[1] if out.dim() in (2, 4) else out.shape[-1]) for out in features.stages]
                return self._sequential_problem(x, features, run)
        finally:
            self.model.train(was_training)

    def _sequential_problem(self, x: Tensor, features: Features, run: "_Recorder") -> str | None:
        repeated = [n for n, c in zip(self.stage_names, run.calls) if c != 1]
        if repeated:
            return f"stages {repeated} run more than once per forward pass"
        if run.order != list(range(len(self.stage_names))):
            return f"the stages run in the order {[self.stage_names[i] for i in run.order]}, not as listed"
        for index in range(1, len(self.stage_names)):
            args, previous = run.inputs[index], run.outputs[index - 1]
            if not (len(args) == 1 and isinstance(args[0], Tensor) and args[0].shape == previous.shape and torch.equal(args[0], previous)):
                return f"stage {self.stage_names[index]!r} does not take the output of {self.stage_names[index - 1]!r} as its only input"
        for name, stage, args, out in zip(self.stage_names, self.stage_modules, run.inputs, run.outputs):
            if len(args) != 1 or not torch.allclose(stage(*args), out, rtol=1e-4, atol=1e-5):
                return f"running stage {name!r} on its own input does not give its output (its modules do not simply run in order)"
        try:
            _, logits = self._head(features.stages[-1])
        except (ConfigError, RuntimeError) as error:
            return f"classifier(pool(last stage output)) fails: {error}"
        if logits.shape != features.logits.shape or not torch.allclose(logits, features.logits, rtol=1e-4, atol=1e-5):
            return (f"classifier(pool(output of {self.stage_names[-1]!r})) differs from the module's logits "
                    "(something runs between the last stage and the classifier)")
        return None

    def _run_recorded(self, x: Tensor):
        """The module's output and what the hooks saw during that forward pass."""
        recorder = self._recorder
        recorder.reset()
        recorder.active = True
        try:
            logits = self.model(x)
        finally:
            recorder.active = False
        run = _Recorder(recorder.count)
        run.outputs, run.inputs, run.calls, run.order, run.pooled = recorder.outputs, recorder.inputs, recorder.calls, recorder.order, recorder.pooled
        recorder.reset()  # the wrapper keeps no reference to this batch's activations
        return logits, run

    def _features(self, logits, run: "_Recorder") -> Features:
        for name, out in zip(self.stage_names, run.outputs):
            if not isinstance(out, Tensor):
                raise ConfigError(f"stage {name!r} returned {_describe(out)}; name modules whose output is one tensor.")
        return Features(stages=list(run.outputs), pooled=run.pooled, logits=logits)

    # --- StagedNet ------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def forward_features(self, x: Tensor) -> Features:
        return self._features(*self._run_recorded(x))

    def _require_sequential(self) -> None:
        if self._staged_error is not None:
            raise ConfigError(
                f"{type(self.model).__name__} cannot be run stage by stage through {self.stage_names}: {self._staged_error}. "
                "Name stages that follow one another directly (a stage may be a list of consecutive module names) and "
                "end where only pooling and the classifier remain (or pass pool=...); forward and forward_features work regardless."
            )

    def forward_stem(self, x: Tensor) -> Tensor:
        self._require_sequential()
        self._recorder.stop_at_stem = True
        try:
            self.model(x)
        except _StemReached as reached:
            return reached.value
        finally:
            self._recorder.stop_at_stem = False
        raise ConfigError(f"stage {self.stage_names[0]!r} never ran")

    @property
    def stages(self) -> list[nn.Module]:
        self._require_sequential()
        return list(self.stage_modules)

    def _head(self, x: Tensor) -> tuple[Tensor, Tensor]:
        pooled = self.pool(x)
        return pooled, self._classifier(pooled)

    def forward_head(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._require_sequential()
        return self._head(x)

    def forward_pool(self, x: Tensor) -> Tensor:
        return self.pool(x)

    @property
    def classifier(self) -> nn.Module:
        return self._classifier

    @property
    def sequential(self) -> bool:
        """Whether stage-by-stage running reproduces the module's forward (checked at wrap time)."""
        return self._staged_error is None

    def remove_hooks(self) -> nn.Module:
        """Detach this wrapper's hooks from the wrapped module and return the module (the wrapper
        is unusable afterwards)."""
        for module in self._hooked:
            for hooks in (module._forward_pre_hooks, module._forward_hooks):
                for key in [k for k, hook in hooks.items() if isinstance(hook, partial) and self._recorder in hook.args]:
                    del hooks[key]
        return self.model


def _describe(value) -> str:
    return f"a tensor of shape {tuple(value.shape)}" if isinstance(value, Tensor) else f"a {type(value).__name__}"


def _strip_prefix(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    inner = prefix + "model."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)


def _add_prefix(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    inner = prefix + "model."
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
        state_dict[inner + key[len(prefix):]] = state_dict.pop(key)


def wrap_model(model: nn.Module, stages: list[str | list[str]], classifier: str, *, input_size: int = 224, in_channels: int = 3,
               pool: Callable[[Tensor], Tensor] | None = None) -> WrappedModel:
    """Use any module as a teacher or student: ``stages`` are the names (as in
    ``model.named_modules()``) of the modules whose outputs are the stage features, in the order
    they run; a stage may also be a list of names of modules that run one after the other (e.g.
    ``['features.1', 'features.2', 'features.3']``). ``classifier`` is the final layer (its input is
    the pooled feature). A dummy forward at ``input_size`` infers ``stage_channels`` and
    ``num_classes``."""
    return WrappedModel(model, stages, classifier, input_size=input_size, in_channels=in_channels, pool=pool)
