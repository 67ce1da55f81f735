"""ESKD: distil from an early-stopped teacher (Cho & Hariharan, "On the Efficacy of Knowledge
Distillation", ICCV 2019)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

from pydantic import Field

from ..config import RunConfig
from ..core.errors import ConfigError
from ..core.io import atomic_save, safe_load
from ..core.rundir import RunDir, model_payload
from .base import PipelineOptions, finish, load_recipe, pipeline_dir_for, run_stage, stage_config, start, teacher_section


class ESKDOptions(PipelineOptions):
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
    section = teacher_section(tree)
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
    early = RunDir.for_config(teacher_cfg).checkpoint(f"best_within_e{options.stop_epoch}")
    student_cfg = stage_config(tree, pipeline_dir, "student", replace={"teacher": {**teacher, "checkpoint": str(early)}})

    start(pipeline_dir, overwrite)
    teacher_summary = run_stage(teacher_cfg, echo=echo, on_epoch=keep_best_within(early, options.stop_epoch, teacher_cfg))
    if not early.is_file():
        raise ConfigError(f"{RunDir.for_config(teacher_cfg)} finished without {early.name}; delete that folder (or pass "
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
            atomic_save(model_payload(distiller, cfg, epoch + 1, val_acc), path)
        return None

    return hook
