"""The DGKD pipeline (Son et al., ICCV 2021): teacher -> assistant 1 -> ... -> assistant n -> student,
where every stage is distilled with method ``dgkd`` from the teacher *and every assistant trained
before it* (dense guidance), dropping guides at random per step.

It reuses TAKD's stage machinery (:mod:`.base`, :class:`.takd.TAKDOptions`): the recipe plus a ``dgkd:`` section
(``dgkd.assistant=[resnet56, resnet32]``, largest first); every stage is one ordinary run in
the pipeline's folder, so a finished stage is skipped and an interrupted one resumes; all stage
configs are derived and validated before the first stage trains. The recipe's ``method`` section
holds dgkd's hyper-parameters (temperature, ce_weight, kd_weight, drop_probability), used by every
stage; the pipeline sets ``method.guides`` itself."""
from __future__ import annotations

import os
from typing import Union

from ..core.errors import ConfigError
from .base import best_checkpoint, finish, load_recipe, pipeline_dir_for, run_stage, stage_config, start, teacher_section
from .takd import TAKDOptions


class DGKDOptions(TAKDOptions):
    """TAKD's options: the assistant model(s), largest first, and their model options."""


def dgkd(config: Union[str, os.PathLike, None] = None, overrides=None, *, assistant: Union[str, list[str], None] = None,
         echo: bool = True, overwrite: bool = False) -> dict:
    """Densely guided KD: each assistant, then the student, distilled from the teacher and all earlier assistants.

    Stage k trains assistant k with method dgkd, guided by the teacher and assistants 1..k-1 (their
    validation-selected best.pt); the student is guided by the teacher and every assistant."""
    tree, options = load_recipe("dgkd", DGKDOptions, config, overrides, assistant=assistant)
    teacher = teacher_section(tree)
    method = dict(tree.get("method") or {})
    if method.get("name", "dgkd").lower() not in ("dgkd", "densely-guided-kd"):
        raise ConfigError(f"pipeline dgkd distils every stage with method dgkd, but the recipe sets method.name={method['name']}: "
                          "set method.name=dgkd (its temperature, weights and drop_probability apply to every stage).")
    if method.get("guides"):
        raise ConfigError("pipeline dgkd sets method.guides itself (the assistants it trains); remove method.guides from the recipe.")
    student = (tree.get("student") or {}).get("name", "student")
    label = "-".join([str(tree.get("data", {}).get("name", "digits")), teacher["name"], *options.assistant, student])
    pipeline_dir = pipeline_dir_for("dgkd", tree, options, label)

    configs, guides = [], []
    for index, name in enumerate(options.assistant):
        stage = f"assistant{index + 1}-{name}" if len(options.assistant) > 1 else f"assistant-{name}"
        cfg = stage_config(tree, pipeline_dir, stage, replace={
            "teacher": teacher, "student": {"name": name, "options": options.assistant_options},
            "method": {**method, "name": "dgkd", "guides": list(guides)},
        })
        configs.append(cfg)
        guides.append({"name": name, "checkpoint": best_checkpoint(cfg), "options": options.assistant_options})
    configs.append(stage_config(tree, pipeline_dir, "student", replace={
        "teacher": teacher, "method": {**method, "name": "dgkd", "guides": list(guides)}}))

    start(pipeline_dir, overwrite)
    stages = {cfg.name: run_stage(cfg, echo=echo) for cfg in configs}
    return finish(pipeline_dir, "dgkd", options, stages)
