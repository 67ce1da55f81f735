"""Multi-stage recipes built from ordinary runs.

- ``takd``: teacher -> assistant(s) -> student (Mirzadeh et al., "Improved Knowledge Distillation
  via Teacher Assistant", AAAI 2020).
- ``eskd``: distil from an early-stopped teacher (Cho & Hariharan, "On the Efficacy of Knowledge
  Distillation", ICCV 2019).

A pipeline reads the usual recipe (YAML plus dotted overrides) and its own options from a section
named after it (``takd.assistant=resnet32``, ``eskd.stop_epoch=60``). Every stage is one
:func:`gapkd.api.run` of a config derived from the recipe (:func:`stage_config`), with its run
directory inside the pipeline's directory, so a finished stage is skipped and an interrupted one
resumes exactly. All stage configs are derived and validated before the first stage trains.
A new pipeline is one function that derives its stages and runs them with :func:`run_stage`,
registered in :data:`PIPELINES`; see docs/pipelines.md.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from . import api
from .config import RunConfig, _format_errors, build_config, merge, parse_overrides, read_yaml
from .engine.checkpoint import atomic_save, atomic_write_text, safe_load
from .engine.runguard import remove_for_overwrite
from .engine.trainer import deployable_payload
from .errors import ConfigError
from .registry import Registry

#: name -> pipeline(config, overrides, *, echo, overwrite) -> summary dict
PIPELINES: Registry[Callable[..., dict]] = Registry("pipeline")
SUMMARY_FILE = "pipeline.json"


# ---------------------------------------------------------------- generic helpers
def load_recipe(kind: str, options_model: type[BaseModel], config=None, overrides=None, **options: Any) -> tuple[dict, BaseModel]:
    """The recipe as a plain tree (YAML <- overrides) and the pipeline's validated options, taken
    from the tree's ``kind`` section with keyword ``options`` (those not None) on top."""
    tree = read_yaml(config) if config is not None else {}
    if overrides:
        tree = merge(tree, parse_overrides(overrides) if isinstance(overrides, list) else overrides)
    section = tree.pop(kind, None) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"{kind} must be a mapping of {kind} options ({', '.join(options_model.model_fields)}).")
    section = merge(section, {k: v for k, v in options.items() if v is not None})
    try:
        return tree, options_model.model_validate(section)
    except ValidationError as error:
        raise ConfigError(_format_errors(error, prefix=f"{kind}.", root=options_model)) from None


def stage_config(tree: dict, pipeline_dir: Path, stage: str, *, replace: Optional[dict] = None, update: Optional[dict] = None) -> RunConfig:
    """The recipe as the run ``stage`` inside ``pipeline_dir``: top-level sections in ``replace`` are
    swapped whole (None removes one), keys in ``update`` are merged in, and the result is validated."""
    derived = copy.deepcopy(tree)
    for key, value in (replace or {}).items():
        if value is None:
            derived.pop(key, None)
        else:
            derived[key] = copy.deepcopy(value)
    derived = merge(derived, update or {})
    derived.update(out_dir=str(pipeline_dir), name=stage)
    try:
        return build_config(derived)
    except ConfigError as error:
        raise ConfigError(f"pipeline stage '{stage}': {error}") from None


def pipeline_dir_for(kind: str, tree: dict, options: BaseModel, label: str) -> Path:
    """``out_dir/name``, or ``out_dir/<kind>_<label>_s<seed>_<hash of recipe and options>`` without a name."""
    out_dir = Path(tree.get("out_dir", "runs"))
    if tree.get("name"):
        return out_dir / str(tree["name"])
    recipe = {k: v for k, v in tree.items() if k not in ("name", "out_dir")}
    payload = json.dumps({"recipe": recipe, "options": options.model_dump(mode="json")}, sort_keys=True, default=str)
    return out_dir / f"{kind}_{label}_s{tree.get('seed', 0)}_{hashlib.sha256(payload.encode()).hexdigest()[:8]}"


def run_stage(cfg: RunConfig, *, echo: bool = True, on_epoch=None) -> dict:
    """Run (or skip, or resume) one stage; its run directory is ``cfg.out_dir/cfg.name``."""
    if echo:
        print(f"== stage {cfg.name}: {cfg.method.name} {cfg.teacher.name + ' -> ' if cfg.teacher else ''}{cfg.student.name}")
    return api.run(cfg, echo=echo, on_epoch=on_epoch)


def start(pipeline_dir: Path, overwrite: bool) -> None:
    if overwrite:
        remove_for_overwrite(pipeline_dir, "pipeline")  # only a gapkd pipeline folder of run folders
    pipeline_dir.mkdir(parents=True, exist_ok=True)


def finish(pipeline_dir: Path, kind: str, options: BaseModel, stages: dict[str, dict], **extra: Any) -> dict:
    """Write ``pipeline.json`` (options, every stage's summary, the final student's) and return it."""
    final = stages[list(stages)[-1]]
    summary = {"pipeline": kind, "dir": str(pipeline_dir), "options": options.model_dump(mode="json"), **extra,
               "stages": stages, "student": final}
    atomic_write_text(pipeline_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    return summary


def _best_checkpoint(cfg: RunConfig) -> str:
    return str(api.run_dir_for(cfg) / "checkpoints" / "best.pt")


def _teacher_section(tree: dict) -> dict:
    teacher = tree.get("teacher")
    if not isinstance(teacher, dict) or not teacher.get("name"):
        raise ConfigError("this pipeline needs a teacher: set teacher.name=... (and teacher.checkpoint=PATH for takd).")
    return teacher


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------- TAKD
class TAKDOptions(_Options):
    assistant: list[str] = Field(..., min_length=1, description="assistant model(s), largest first: teacher -> a1 -> a2 -> ... -> student")
    assistant_options: dict[str, Any] = Field(default_factory=dict, description="model options of the assistant(s)")

    @field_validator("assistant", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return [value] if isinstance(value, str) else value


def takd(config: Union[str, os.PathLike, None] = None, overrides=None, *, assistant: Union[str, list[str], None] = None,
         echo: bool = True, overwrite: bool = False) -> dict:
    """Teacher-assistant KD: teacher -> assistant(s) -> student, each stage distilled with the recipe's method.

    Every stage uses the recipe's method and training settings; each stage's teacher is the previous
    stage's validation-selected checkpoint (best.pt)."""
    tree, options = load_recipe("takd", TAKDOptions, config, overrides, assistant=assistant)
    teacher = _teacher_section(tree)
    student = (tree.get("student") or {}).get("name", "student")
    label = "-".join([str(tree.get("data", {}).get("name", "digits")), teacher["name"], *options.assistant, student])
    pipeline_dir = pipeline_dir_for("takd", tree, options, label)

    configs, previous = [], teacher
    for index, name in enumerate(options.assistant):
        stage = f"assistant{index + 1}-{name}" if len(options.assistant) > 1 else f"assistant-{name}"
        cfg = stage_config(tree, pipeline_dir, stage,
                           replace={"teacher": previous, "student": {"name": name, "options": options.assistant_options}})
        configs.append(cfg)
        previous = {"name": name, "options": options.assistant_options, "checkpoint": _best_checkpoint(cfg)}
    configs.append(stage_config(tree, pipeline_dir, "student", replace={"teacher": previous}))

    start(pipeline_dir, overwrite)
    stages = {cfg.name: run_stage(cfg, echo=echo) for cfg in configs}
    return finish(pipeline_dir, "takd", options, stages)


# ---------------------------------------------------------------- ESKD
class ESKDOptions(_Options):
    stop_epoch: int = Field(..., ge=1, description="the teacher checkpoint is the best on validation within its first stop_epoch epochs")
    teacher_epochs: Optional[int] = Field(None, ge=1, description="length of the teacher's training schedule (default: train.epochs)")


def eskd(config: Union[str, os.PathLike, None] = None, overrides=None, *, stop_epoch: Optional[int] = None,
         teacher_epochs: Optional[int] = None, echo: bool = True, overwrite: bool = False) -> dict:
    """Early-stopped KD: distil from the teacher's best-validation checkpoint within its first stop_epoch epochs.

    The teacher is trained with labels on its full schedule (``teacher_epochs``, default the recipe's
    train.epochs): from scratch, or, with ``teacher.init_head=reset``, from teacher.checkpoint's
    weights with a fresh classifier (weights trained on another label set, e.g. ImageNet's). The
    student is distilled from the early checkpoint with the recipe's method."""
    tree, options = load_recipe("eskd", ESKDOptions, config, overrides, stop_epoch=stop_epoch, teacher_epochs=teacher_epochs)
    section = _teacher_section(tree)
    start_from = {k: section[k] for k in ("checkpoint", "init_head") if k in section} if section.get("init_head") == "reset" else {}
    teacher = {k: v for k, v in section.items() if k not in ("checkpoint", "init_head")}
    if echo and section.get("checkpoint") and not start_from:
        print(f"eskd trains its own teacher from scratch; teacher.checkpoint={section['checkpoint']} is not used "
              "(with teacher.init_head=reset the teacher starts from its weights).")
    tree["teacher"] = {**teacher, **start_from}  # the pipeline's name hashes where the teacher starts from
    student = (tree.get("student") or {}).get("name", "student")
    label = "-".join([str(tree.get("data", {}).get("name", "digits")), teacher["name"], student])
    pipeline_dir = pipeline_dir_for("eskd", tree, options, label)

    teacher_cfg = stage_config(tree, pipeline_dir, "teacher", replace={"teacher": None, "method": {"name": "ce"}, "student": tree["teacher"]},
                               update={"train": {"epochs": options.teacher_epochs} if options.teacher_epochs else {}})
    if options.stop_epoch > teacher_cfg.train.epochs:
        raise ConfigError(f"eskd.stop_epoch={options.stop_epoch} is beyond the teacher's {teacher_cfg.train.epochs} epochs; "
                          "lower it or raise eskd.teacher_epochs.")
    if teacher_cfg.data.val_fraction <= 0:
        raise ConfigError("eskd chooses the teacher's epoch on validation; set data.val_fraction > 0.")
    early = api.run_dir_for(teacher_cfg) / "checkpoints" / f"best_within_e{options.stop_epoch}.pt"
    student_cfg = stage_config(tree, pipeline_dir, "student", replace={"teacher": {**teacher, "checkpoint": str(early)}})

    start(pipeline_dir, overwrite)
    teacher_summary = run_stage(teacher_cfg, echo=echo, on_epoch=keep_best_within(early, options.stop_epoch, teacher_cfg))
    if not early.is_file():
        raise ConfigError(f"{api.run_dir_for(teacher_cfg)} finished without {early.name}; delete that folder (or pass "
                          "--overwrite) so the teacher is trained again with this eskd.stop_epoch.")
    chosen = safe_load(early)
    student_summary = run_stage(student_cfg, echo=echo)
    return finish(pipeline_dir, "eskd", options, {"teacher": teacher_summary, "student": student_summary},
                  early_teacher={"checkpoint": str(early), "epoch": chosen["epoch"], "val_acc": chosen["val_acc"]})


def keep_best_within(path: Path, stop_epoch: int, cfg: RunConfig):
    """An ``on_epoch`` hook saving the deployable model to ``path`` whenever validation accuracy
    improves during the first ``stop_epoch`` epochs (ties keep the earlier epoch, as best.pt does)."""

    def hook(distiller, epoch: int, record: dict):
        val_acc = record.get("val_acc")
        if epoch + 1 > stop_epoch or val_acc is None:
            return None
        if not path.is_file() or val_acc > safe_load(path)["val_acc"]:
            atomic_save(deployable_payload(distiller, cfg, epoch + 1, val_acc), path)
        return None

    return hook


PIPELINES.add("takd", takd, "teacher-assistant")
PIPELINES.add("eskd", eskd, "early-stopped-kd")

# AID lives in its own module (teacher adaptation, our reading of the ICCV 2025 abstract);
# registered here so `gapkd pipeline aid` works like the others.
from .pipeline_aid import aid as _aid  # noqa: E402

PIPELINES.add("aid", _aid, "aid-kd")
