"""The Distiller contract: one file and one registry entry per method."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass as pydantic_dataclass
from torch import Tensor, nn

from ..core.registry import Registry

#: Decorator for a method's hyper-parameter dataclass: validated, unknown keys refused.
#: The decorator of a method's hyper-parameter dataclass. Document each field with a one-line
#: docstring under it (the one style; ``gapkd list methods -v`` prints them).
hparams = pydantic_dataclass(config=ConfigDict(extra="forbid", use_attribute_docstrings=True))


def added_later():
    """The mark (``Annotated[bool, added_later()] = False``) of a hyper-parameter added after runs of its
    method existed: part of a run's identity (run hash, study key) only when set to other than its
    default, so earlier runs keep their hashes and resume (``gapkd.config.identity``'s "when-set")."""
    return Field(json_schema_extra={"identity": {"run_hash": "when-set", "study_key": "when-set"}})


@hparams
class NoHparams:
    pass


@dataclass
class StepInfo:
    """Where training is: what schedules inside a method (warm-ups, curricula) need."""

    epoch: int  # 0-based
    step: int  # global step, 0-based
    epochs: int
    steps_per_epoch: int
    indices: Tensor | None = None  # stable sample ids of the batch (memory banks such as CRD's)
    strong_images: Tensor | None = None  # the batch's strongly augmented view when data.augment.strong is on (MLKD)
    views: Tensor | None = None  # with data.views=K: the fixed view (0..K-1) of each sample (gapkd.data.views)
    teacher_logits: Tensor | None = None  # the frozen teacher's cached logits on exactly this batch (gapkd.teacher_cache)

    @property
    def progress(self) -> float:
        """Fraction of training done, in [0, 1)."""
        return self.step / max(1, self.epochs * self.steps_per_epoch)


@dataclass
class StepOutput:
    losses: dict[str, Tensor]  # the total loss is their sum; each is logged
    logits: Tensor  # what the deployable student predicts for the batch


@dataclass
class TaskInfo:
    """Facts about the data a method may need at construction (memory bank sizes, shapes)."""

    num_classes: int
    in_channels: int
    image_size: int
    num_train: int
    train_ids: Tensor | None = None  # stable id of each training sample (what StepInfo.indices holds); None: 0..num_train-1
    train_labels: Tensor | None = None  # label of each training sample, in the order of train_ids


@torch.no_grad()
def probe_features(model: nn.Module, task: TaskInfo | None):
    """``model.forward_features`` on one blank image of the task's size, in eval mode (running
    statistics untouched): the shapes of stage outputs, for sizing projectors at construction."""
    if task is None:
        raise ValueError("this method sizes its modules from the data: pass task=TaskInfo(...) to the distiller")
    was_training = model.training
    parameter = next(model.parameters())
    blank = torch.zeros(1, task.in_channels, task.image_size, task.image_size, device=parameter.device, dtype=parameter.dtype)
    try:
        return model.eval().forward_features(blank)
    finally:
        model.train(was_training)


def freeze(module: nn.Module) -> nn.Module:
    """No gradients and eval mode for good: the teacher never changes during distillation."""
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module.eval()


class Distiller(nn.Module):
    """Base class. Subclasses set ``Hparams`` (a ``@hparams`` dataclass) and implement ``forward``."""

    Hparams: ClassVar[type] = NoHparams
    needs_teacher: ClassVar[bool] = True
    #: False for methods with per-sample state (memory banks) that DDP would not keep in step across processes
    supports_ddp: ClassVar[bool] = True
    #: the named loss terms ``forward`` returns (each logged as ``loss/<name>``); ``gapkd list methods -v`` lists them
    loss_terms: ClassVar[tuple[str, ...]] = ()
    #: trainable modules the method adds beside the student, attribute name -> what it is (listed by ``gapkd list methods -v``)
    extra_modules: ClassVar[dict[str, str]] = {}
    #: what the method needs from the teacher each step: "logits" (it calls :meth:`teacher_logits` and nothing
    #: else of the teacher, so with data.views > 0 the cached logits replace the teacher's forward), "features"
    #: (it runs the teacher), or "none" (no teacher). None: "features" when needs_teacher, else "none".
    teacher_needs: ClassVar[str | None] = None
    #: a "features" method that also reads the teacher's logits through :meth:`teacher_logits` (DFPT-KD's
    #: original path): the cache is built for it too
    reads_teacher_logits: ClassVar[bool] = False

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, *, task: TaskInfo | None = None, **hyper: Any):
        super().__init__()
        self.hparams = self.Hparams(**hyper)
        self.task = task
        self.student = student
        if self.needs_teacher and teacher is None:
            raise ValueError(f"{type(self).__name__} needs a teacher")
        self.teacher = freeze(teacher) if teacher is not None else None

    def forward(self, images: Tensor, labels: Tensor, step: StepInfo) -> StepOutput:
        raise NotImplementedError

    @torch.no_grad()
    def teacher_forward(self, images: Tensor):
        """The teacher's features and logits, without autograd: call it once per step."""
        return self.teacher.forward_features(images)

    def teacher_logits(self, images: Tensor, step: StepInfo | None = None) -> Tensor:
        """The frozen teacher's logits of ``images``: the cached ones of this batch's views when the step
        carries them (data.views > 0 with the teacher cache), else the teacher's forward, without autograd."""
        if step is not None and step.teacher_logits is not None:
            return step.teacher_logits
        return self.teacher_forward(images).logits

    @classmethod
    def teacher_need(cls) -> str:
        """"none", "logits" or "features": what a step needs from the teacher (see ``teacher_needs``)."""
        if cls.teacher_needs is not None:
            if cls.teacher_needs not in ("none", "logits", "features"):
                raise ValueError(f"{cls.__name__}.teacher_needs must be 'none', 'logits' or 'features', not {cls.teacher_needs!r}")
            return cls.teacher_needs
        return "features" if cls.needs_teacher else "none"

    @classmethod
    def uses_teacher_cache(cls) -> bool:
        """Whether the teacher cache (data.views > 0) feeds this method's steps."""
        return cls.teacher_need() == "logits" or cls.reads_teacher_logits

    def param_groups(self) -> list[dict]:
        """What the optimiser trains. ``lr_mult`` scales the base learning rate of a group."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr_mult": 1.0, "name": "student"}]

    def clip_groups(self) -> list[tuple[str, list[nn.Parameter]]]:
        """The groups ``train.grad_clip_mode=per_group`` bounds separately: each of :meth:`param_groups`,
        except that a group named ``student`` holding parameters outside the student (projectors,
        embeddings added to the default group) is split into ``student`` and ``auxiliary``."""
        student_ids = {id(p) for p in self.student.parameters()}
        groups: list[tuple[str, list[nn.Parameter]]] = []
        for index, group in enumerate(self.param_groups()):
            params = [p for p in group["params"] if p.requires_grad]
            name = group.get("name", f"group{index}")
            if not params:
                continue
            if name == "student":
                auxiliary = [p for p in params if id(p) not in student_ids]
                params = [p for p in params if id(p) in student_ids]
                groups += [(n, ps) for n, ps in (("student", params), ("auxiliary", auxiliary)) if ps]
            else:
                groups.append((name, params))
        return groups

    def deployable(self) -> nn.Module:
        """The module evaluated, exported and shipped."""
        return self.student

    def deployable_spec(self) -> dict[str, Any] | None:
        """None when the deployable is the plain student model; otherwise the options that
        :meth:`rebuild_deployable` needs to rebuild it around a fresh student (saved in checkpoints)."""
        return None

    @classmethod
    def rebuild_deployable(cls, student: nn.Module, options: dict[str, Any]) -> nn.Module:
        """The untrained deployable of this method around ``student``, from :meth:`deployable_spec`'s options."""
        raise NotImplementedError(f"{cls.__name__} deploys the plain student; there is nothing to rebuild")

    def eval_heads(self, images: Tensor) -> dict[str, Tensor]:
        """Logits of every head worth a validation accuracy; ``student`` (the deployable) first."""
        return {"student": self.deployable()(images)}

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """Everything that changes during training (the frozen teacher is left out)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("teacher.")}

    @classmethod
    def describe(cls) -> str:
        doc = (cls.__doc__ or "").strip().splitlines()
        return doc[0] if doc else ""

    @classmethod
    def hparam_defaults(cls) -> dict[str, Any]:
        return {f.name: f.default for f in dataclasses.fields(cls.Hparams)}

    @classmethod
    def hparam_docs(cls) -> dict[str, str]:
        """Each hyper-parameter's one-line docstring ('' where it has none)."""
        def doc(name: str) -> str:  # a subclass's field keeps the docstring its base class gave it
            found = (getattr(k, "__pydantic_fields__", {}).get(name) for k in cls.Hparams.__mro__)
            return next((info.description for info in found if info is not None and info.description), "")

        return {f.name: doc(f.name) for f in dataclasses.fields(cls.Hparams)}


METHODS: Registry[type[Distiller]] = Registry("method")


def register_method(name: str, *aliases: str):
    return METHODS.register(name, *aliases)
