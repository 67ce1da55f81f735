"""Capacity-gap studies: grids over datasets x pairs x methods x hyper-parameters x seeds,
an SQLite result store, and Markdown/HTML reports with plots (see docs/studies.md)."""
from .report import summarize, write_report
from .runner import StudyRunner, run_study, study_status
from .spec import PlannedRun, StudySpec, builtin_studies, expand, resolve_study, run_key, shard
from .store import ResultStore
from .study import Study

__all__ = ["Study", "StudySpec", "PlannedRun", "StudyRunner", "ResultStore", "builtin_studies", "resolve_study", "expand", "run_key",
           "shard", "run_study", "study_status", "summarize", "write_report"]
