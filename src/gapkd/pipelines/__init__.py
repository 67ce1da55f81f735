"""Multi-stage recipes built from ordinary runs, all on one base (:mod:`.base`):

- ``takd``: teacher -> assistant(s) -> student (Mirzadeh et al., AAAI 2020), :mod:`.takd`;
- ``dgkd``: teacher -> assistants -> student, each stage guided by every larger model (Son et al.,
  ICCV 2021), :mod:`.dgkd`;
- ``eskd``: distil from an early-stopped teacher (Cho & Hariharan, ICCV 2019), :mod:`.eskd`;
- ``aid``: reference student -> adapted teacher -> distillation, our reading of the abstract of
  Qian, Le & Harandi (ICCV 2025), :mod:`.aid`.

A pipeline reads the usual recipe (YAML plus dotted overrides) and its own options from a section
named after it (``takd.assistant=resnet32``, ``eskd.stop_epoch=60``). Every stage is one
:func:`gapkd.api.run` of a config derived from the recipe (:func:`stage_config`), with its run
directory inside the pipeline's directory, so a finished stage is skipped and an interrupted one
resumes exactly. All stage configs are derived and validated before the first stage trains.
A new pipeline is one function that derives its stages and runs them with :func:`run_stage`,
registered in :data:`PIPELINES`; see docs/pipelines.md. ``gapkd pipeline KIND`` runs any of them.
"""
from typing import Callable

from .. import api  # noqa: F401  (tests and pipelines reach the run function as gapkd.pipelines.api.run)
from ..core.registry import Registry
from .aid import aid
from .base import SUMMARY_FILE, PipelineOptions, finish, load_recipe, pipeline_dir_for, run_stage, stage_config, start, teacher_section
from .dgkd import DGKDOptions, dgkd
from .eskd import ESKDOptions, eskd, keep_best_within
from .takd import TAKDOptions, takd

#: name -> pipeline(config, overrides, *, echo, overwrite) -> summary dict
PIPELINES: Registry[Callable[..., dict]] = Registry("pipeline")
PIPELINES.add("takd", takd, "teacher-assistant")
PIPELINES.add("dgkd", dgkd, "densely-guided-kd")
PIPELINES.add("eskd", eskd, "early-stopped-kd")
PIPELINES.add("aid", aid, "aid-kd")

__all__ = ["PIPELINES", "SUMMARY_FILE", "DGKDOptions", "ESKDOptions", "PipelineOptions", "TAKDOptions", "aid", "dgkd", "eskd", "finish", "keep_best_within",
           "load_recipe", "pipeline_dir_for", "run_stage", "stage_config", "start", "takd", "teacher_section"]
