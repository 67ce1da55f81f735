"""TAKD: teacher -> assistant(s) -> student (Mirzadeh et al., "Improved Knowledge Distillation via
Teacher Assistant", AAAI 2020)."""
from __future__ import annotations

import os
from typing import Any, Union

from pydantic import Field, field_validator

from .base import PipelineOptions, best_checkpoint, finish, load_recipe, pipeline_dir_for, run_stage, stage_config, start, teacher_section


class TAKDOptions(PipelineOptions):
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
    teacher = teacher_section(tree)
    student = (tree.get("student") or {}).get("name", "student")
    label = "-".join([str(tree.get("data", {}).get("name", "digits")), teacher["name"], *options.assistant, student])
    pipeline_dir = pipeline_dir_for("takd", tree, options, label)

    configs, previous = [], teacher
    for index, name in enumerate(options.assistant):
        stage = f"assistant{index + 1}-{name}" if len(options.assistant) > 1 else f"assistant-{name}"
        cfg = stage_config(tree, pipeline_dir, stage,
                           replace={"teacher": previous, "student": {"name": name, "options": options.assistant_options}})
        configs.append(cfg)
        previous = {"name": name, "options": options.assistant_options, "checkpoint": best_checkpoint(cfg)}
    configs.append(stage_config(tree, pipeline_dir, "student", replace={"teacher": previous}))

    start(pipeline_dir, overwrite)
    stages = {cfg.name: run_stage(cfg, echo=echo) for cfg in configs}
    return finish(pipeline_dir, "takd", options, stages)
