"""What every pipeline shares: the recipe and its options section, stage configs inside the
pipeline's directory, running a stage (an ordinary :func:`gapkd.api.run`, so a finished stage is
skipped and an interrupted one resumes) and the pipeline.json summary."""
from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, ValidationError

from .. import api
from ..config import RunConfig, _format_errors, build_config, lift_run_section, merge, parse_overrides, read_yaml
from ..core.errors import ConfigError
from ..core.io import atomic_write_text
from ..core.rundir import RunDir

SUMMARY_FILE = "pipeline.json"


# ---------------------------------------------------------------- generic helpers
def load_recipe(kind: str, options_model: type[BaseModel], config=None, overrides=None, **options: Any) -> tuple[dict, BaseModel]:
    """The recipe as a plain tree (YAML <- overrides) and the pipeline's validated options, taken
    from the tree's ``kind`` section with keyword ``options`` (those not None) on top."""
    tree = lift_run_section(read_yaml(config)) if config is not None else {}
    if overrides:
        tree = merge(tree, lift_run_section(parse_overrides(overrides) if isinstance(overrides, list) else overrides))
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
    if overwrite and pipeline_dir.exists():
        shutil.rmtree(pipeline_dir)
    pipeline_dir.mkdir(parents=True, exist_ok=True)


def finish(pipeline_dir: Path, kind: str, options: BaseModel, stages: dict[str, dict], **extra: Any) -> dict:
    """Write ``pipeline.json`` (options, every stage's summary, the final student's) and return it."""
    final = stages[list(stages)[-1]]
    summary = {"pipeline": kind, "dir": str(pipeline_dir), "options": options.model_dump(mode="json"), **extra,
               "stages": stages, "student": final}
    atomic_write_text(pipeline_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    return summary


def best_checkpoint(cfg: RunConfig) -> str:
    """Where a stage's validation-selected model will be (the next stage's teacher)."""
    return str(RunDir.for_config(cfg).best)


def teacher_section(tree: dict) -> dict:
    teacher = tree.get("teacher")
    if not isinstance(teacher, dict) or not teacher.get("name"):
        raise ConfigError("this pipeline needs a teacher: set teacher.name=... (and teacher.checkpoint=PATH for takd).")
    return teacher


class PipelineOptions(BaseModel):
    """Base of a pipeline's options section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


