"""`gapkd.Study`: the Python face of `gapkd study run|status|report` (the CLI calls it too)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

from .runner import Phase, StudyRunner, StudyRunResult, study_status
from .spec import PlannedRun, StudySpec, builtin_studies, parse_shard, resolve_study
from .spec import shard as shard_runs


class Study:
    """A study at one budget, in one study directory, with the run-config overrides every run gets.

    Example:
        ```python
        import gapkd

        study = gapkd.Study.builtin("capacity-cifar10", budget="smoke", directory="studies/smoke")
        study.run()                      # 25 runs on digits, about 4 CPU-minutes; finished runs are skipped
        print(study.status()["done"])    # runs finished so far
        study.report()                   # report.md, report.html and plots under studies/smoke/report
        ```

    The budget is chosen when the study is loaded because it changes the grid itself (epochs,
    seeds, grid points). ``overrides`` (``["data.root=/data", "train.device=cuda"]`` or the same as a
    nested dict) apply to every run; pass the same ones to every worker, `status` and `report`:
    they are part of each run's identity, except where files live and thread counts.
    """

    def __init__(self, spec: StudySpec, directory: str | Path | None = None, overrides: list[str] | dict | None = None):
        """Wrap a resolved :class:`~gapkd.study.spec.StudySpec` (see :meth:`load` for names, files and dicts).

        Args:
            spec: the validated study at its budget.
            directory: the study directory; default ``studies/<study>-<budget>``.
            overrides: run-config overrides for every run, as ``key=value`` strings or a nested dict.
        """
        from ..config import parse_overrides

        self.spec = spec
        self.overrides: dict[str, Any] = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
        self._directory = directory
        self._planner = self._runner()  # expands the grid now: unregistered models or methods fail here
        self.dir: Path = self._planner.study_dir

    @classmethod
    def load(cls, source: str | Path | dict, budget: Optional[str] = None, *, directory: str | Path | None = None,
             overrides: list[str] | dict | None = None) -> "Study":
        """A study from a built-in name, a YAML file or a mapping, at ``budget`` (required when the study defines budgets)."""
        return cls(resolve_study(source, budget), directory, overrides)

    @classmethod
    def from_file(cls, path: str | Path, budget: Optional[str] = None, **kwargs) -> "Study":
        """A study from a YAML file (see docs/studies.md for the schema); keyword arguments as :meth:`load`."""
        return cls.load(Path(path), budget, **kwargs)

    @classmethod
    def builtin(cls, name: str, budget: Optional[str] = None, **kwargs) -> "Study":
        """A study shipped with gapkd (:meth:`names` lists them); keyword arguments as :meth:`load`."""
        return cls.load(name, budget, **kwargs)

    @staticmethod
    def names() -> list[str]:
        """The built-in studies' names (``capacity-cifar10``, ``gap-ladder``)."""
        return builtin_studies()

    def _runner(self, echo: bool = False, log: Callable[[str], None] = print) -> StudyRunner:
        return StudyRunner(self.spec, self._directory, overrides=self.overrides, echo=echo, log=log)

    @property
    def name(self) -> str:
        """The study's name."""
        return self.spec.name

    @property
    def budget(self) -> Optional[str]:
        """The budget the study was loaded at (None for a study without budgets)."""
        return self.spec.budget

    def plan(self, shard: str | tuple[int, int] = "1/1", phase: Phase = "all") -> list[PlannedRun]:
        """The runs of one shard and phase, teachers first, in the stable grid order (what ``--dry-run`` lists)."""
        k, n = _shard(shard)
        return self._planner.selection(k, n, phase)

    def finished(self, run: PlannedRun) -> bool:
        """Whether ``run`` has finished (its run directory holds a summary.json)."""
        return self._planner.finished(run)

    def run_dir(self, run: PlannedRun) -> Path:
        """The run directory of a planned run inside the study directory."""
        return self._planner.run_dir(run)

    def run(self, shard: str | tuple[int, int] = "1/1", phase: Phase = "all", *, echo: bool = True,
            log: Callable[[str], None] = print) -> StudyRunResult:
        """Run (or resume) shard ``K/N`` of ``phase``: finished runs are skipped, interrupted ones resume.

        Args:
            shard: this worker's share of the grid, ``"K/N"`` or ``(K, N)``.
            phase: ``"teachers"``, ``"students"`` (their teachers must be finished) or ``"all"``
                (missing teachers are trained on demand).
            echo: print each run's per-epoch lines.
            log: where progress lines go.

        Returns:
            Which runs were trained, skipped (already finished) and failed (with their errors).
        """
        k, n = _shard(shard)
        return self._runner(echo, log).run(k, n, phase=phase)

    def status(self) -> dict[str, Any]:
        """Where the grid stands: ``total``, ``done``, ``counts`` by role and state, ``unfinished`` runs and ``eta``."""
        return study_status(self.spec, self._directory, overrides=self.overrides)

    def report(self, out: str | Path | None = None) -> dict[str, Any]:
        """Write report.md, report.html and plots (default folder: ``<dir>/report``); returns their paths.

        Needs matplotlib and SciPy: ``pip install "gapkd[study]"``.
        """
        from .report import write_report

        return write_report(self.spec, self._directory, overrides=self.overrides, out_dir=out)

    def __repr__(self) -> str:
        return f"Study({self.name!r}, budget={self.budget!r}, dir={str(self.dir)!r})"


def _shard(value: str | tuple[int, int]) -> tuple[int, int]:
    if isinstance(value, str):
        return parse_shard(value)
    k, n = value
    shard_runs([], k, n)  # range check, one message for both spellings
    return k, n
