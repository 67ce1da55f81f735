"""Run a study's grid: teachers once, then students; skip finished runs, resume interrupted ones.

Layout of a study directory::

    <dir>/results.sqlite            one row per run (store.py)
    <dir>/runs/teachers/<run>/      ordinary run directories (config.yaml, metrics.jsonl, summary.json, ...)
    <dir>/runs/students/<run>/
    <dir>/locks/<key>.lock          one advisory lock per run: two workers never train the same run
    <dir>/report/                   report.md, report.html and the plots (report.py)

Sharding: ``--shard k/n`` takes the teachers at positions k-1, k-1+n, ... of the stable teacher
order and the students likewise. Phases: ``teachers`` trains this shard's teachers; ``students``
trains this shard's students and refuses to start if a teacher they need is not finished;
``all`` (the default) does both, training a missing teacher on demand (under its lock, so another
worker that needs it waits and then reuses it).
"""
from __future__ import annotations

import contextlib
import copy
import json
import subprocess
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional

from ..config import RunConfig, build_config
from ..core.errors import ConfigError, GapkdError
from ..core.rundir import RunDir, is_model_payload
from ..core.version import __version__
from .spec import PlannedRun, StudySpec, _pipeline, expand, shard
from .store import ResultStore, worker_alive, worker_id

Phase = Literal["all", "teachers", "students"]
DB_FILE = "results.sqlite"


def default_study_dir(spec: StudySpec) -> Path:
    return Path("studies") / (f"{spec.name}-{spec.budget}" if spec.budget else spec.name)


def code_version() -> str:
    """gapkd's version plus the git commit of its source when it is a checkout (``.dirty`` if modified)."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "--short=12", "HEAD"],
                                capture_output=True, text=True, timeout=5).stdout.strip()
        if not commit:
            return __version__
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no", "--", "."],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return f"{__version__}+g{commit}" + (".dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return __version__


@contextlib.contextmanager
def run_lock(path: Path):
    """An exclusive advisory lock (flock) held while a run trains; waits for the holder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            import fcntl
        except ImportError:  # no flock on this platform: a single worker is safe
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def model_params(run_dir: Path) -> Optional[int]:
    """Parameter count of the model in a run's best checkpoint (built on the meta device: no memory)."""
    import torch

    from ..models import create_model

    path = RunDir(run_dir).best
    if not path.is_file():
        return None
    payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not is_model_payload(payload):
        return None

    def build():
        return create_model(payload["model"], num_classes=payload["num_classes"], in_channels=payload["in_channels"],
                            **payload.get("options", {}))

    try:
        with torch.device("meta"):
            model = build()
    except RuntimeError:  # a model wrapped with gapkd.wrap_model checks real outputs when it is built
        model = build()
    return sum(p.numel() for p in model.parameters())


@dataclass
class StudyRunResult:
    total: int  # runs in the whole grid
    selected: int  # runs this invocation was asked for (its shard and phase)
    trained: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


class StudyRunner:
    """Executes planned runs of one study in one study directory (one instance per worker)."""

    def __init__(self, spec: StudySpec, study_dir: str | Path | None = None, *, overrides: Optional[dict] = None,
                 echo: bool = True, log: Callable[[str], None] = print):
        self.spec = spec
        self.overrides = dict(overrides or {})  # applied to every run (reports state them)
        self.study_dir = Path(study_dir or default_study_dir(spec)).expanduser().resolve()
        self.replan()
        self.echo = echo
        self.log = log
        self._data: dict[str, Any] = {}
        self._failed: set[str] = set()
        self._code_version: Optional[str] = None

    def replan(self) -> list[PlannedRun]:
        """Expand the study again: evaluation runs of a tuned method appear once its tuning runs have finished.
        Returns the runs that are new since the last plan."""
        known = set(getattr(self, "by_key", {}))
        self.plan = expand(self.spec, self.overrides, choose=self.choose)
        self.by_key = {run.key: run for run in self.plan}
        return [run for run in self.plan if run.key not in known]

    def summary(self, run: PlannedRun) -> Optional[dict[str, Any]]:
        return RunDir(self.run_dir(run)).read_summary()

    def choose(self, key: tuple, runs: list[PlannedRun]) -> Optional[int]:
        """The configuration with the best validation accuracy (mean over the tuning pairs; ties go to the earlier
        configuration) once every tuning run of ``key`` has finished; None before. Test accuracy is never read."""
        values: dict[int, list[float]] = {}
        for run in runs:
            summary = self.summary(run)
            if summary is None:
                return None
            values.setdefault(run.choice[3], []).append(summary.get("best_val_acc") or float("-inf"))
        return max(sorted(values), key=lambda index: sum(values[index]) / len(values[index])) if values else None

    # ------------------------------------------------------------ places
    def run_dir(self, run: PlannedRun) -> Path:
        return self.study_dir / "runs" / run.subdir / run.name

    def finished(self, run: PlannedRun) -> bool:
        return RunDir(self.run_dir(run)).summary.is_file()

    def config(self, run: PlannedRun) -> RunConfig:
        """The run's concrete config: its directory, and the teacher checkpoint it distils from."""
        tree = copy.deepcopy(run.tree)
        tree.update(out_dir=str(self.run_dir(run).parent), name=run.name)
        if run.teacher_key:
            tree["teacher"]["checkpoint"] = str(RunDir(self.run_dir(self.by_key[run.teacher_key])).best)
        return build_config(tree)

    def row(self, run: PlannedRun) -> dict[str, Any]:
        """The store row's identity columns (metrics and status are added when they are known)."""
        if self._code_version is None:
            self._code_version = code_version()
        return {
            "study": self.spec.name, "config_hash": run.key, "run_name": run.name, "role": run.role, "dataset": run.dataset,
            "model": run.model, "teacher": run.teacher, "pair": run.pair, "method": run.method, "method_name": run.method_name,
            "pipeline": run.pipeline, "seed": run.seed, "hparams": run.hparams, "budget": self.spec.budget,
            "teacher_hash": run.teacher_key, "config": self.config(run).model_dump(mode="json"),
            "code_version": self._code_version, "run_dir": str(self.run_dir(run)),
        }

    def selection(self, k: int = 1, n: int = 1, phase: Phase = "all") -> list[PlannedRun]:
        """This shard's runs of this phase, teachers first, in the stable grid order."""
        teachers = shard([r for r in self.plan if r.role == "teacher"], k, n)
        students = shard([r for r in self.plan if r.role == "student"], k, n)
        return {"teachers": teachers, "students": students, "all": teachers + students}[phase]

    # ------------------------------------------------------------ running
    def run(self, k: int = 1, n: int = 1, phase: Phase = "all") -> StudyRunResult:
        if phase not in ("all", "teachers", "students"):
            raise ConfigError(f"phase {phase!r} is not one of all, teachers, students.")
        selected = self.selection(k, n, phase)
        if phase == "students":
            missing = {r.teacher_key for r in selected if r.teacher_key and not self.finished(self.by_key[r.teacher_key])}
            if missing:
                names = ", ".join(sorted(self.by_key[key].name for key in missing))
                raise ConfigError(f"the students of shard {k}/{n} need teachers that are not finished: {names}. "
                                  "Run the teacher phase first (gapkd study run ... --phase teachers, every shard), "
                                  "or use --phase all to train missing teachers on demand.")
        result = StudyRunResult(total=len(self.plan), selected=len(selected))
        self._started, self._walls = time.perf_counter(), []
        with ResultStore(self.study_dir / DB_FILE) as store:
            while selected:
                for position, run in enumerate(self._gate_order(selected)):
                    self.check_gates(before=run)
                    self._execute(run, store, result, on_demand=phase == "all")
                    self._progress(store, result, k, n, remaining=len(selected) - position - 1)
                new = {run.key for run in self.replan()}  # tuned methods' evaluation runs, once their choice is known
                selected = [run for run in self.selection(k, n, phase) if run.key in new]
                result.total, result.selected = len(self.plan), result.selected + len(selected)
            self.check_gates()
        if result.failed:
            self.log(f"{len(result.failed)} run(s) failed: " + "; ".join(f"{name}: {error}" for name, error in result.failed))
        return result

    def _execute(self, run: PlannedRun, store: ResultStore, result: StudyRunResult, on_demand: bool) -> str:
        """Train ``run`` unless it is finished; returns done | failed."""
        if self.finished(run):
            self._record_finished(run, store)
            result.skipped.append(run.name)
            return "done"
        if run.key in self._failed:
            return "failed"
        if run.teacher_key:
            teacher = self.by_key[run.teacher_key]
            if not self.finished(teacher) and (not on_demand or self._execute(teacher, store, result, on_demand) != "done"):
                error = f"its teacher {teacher.name} did not finish"
                store.mark_failed(self.row(run), error)
                result.failed.append((run.name, error))
                return "failed"
        with run_lock(self.study_dir / "locks" / f"{run.key}.lock"):
            if self.finished(run):  # another worker finished it while we waited for the lock
                self._record_finished(run, store)
                result.skipped.append(run.name)
                return "done"
            row = {**self.row(run), "worker": worker_id(), "started_at": time.time()}
            store.mark_running(row)
            started = time.perf_counter()
            try:
                summary = self._train(run)
            except KeyboardInterrupt:
                store.mark_failed(row, "interrupted; run the study again to resume", status="interrupted")
                raise
            except Exception as error:  # one bad run must not stop the grid; its row says why
                message = f"{type(error).__name__}: {error}"
                self._failed.add(run.key)  # not retried by this worker (its students fail at once)
                store.mark_failed(row, message)
                result.failed.append((run.name, message))
                if not isinstance(error, GapkdError):  # a bug, not a user error: keep its traceback
                    traceback.print_exc()
                self.log(f"FAILED {run.name}: {message}")
                return "failed"
            wall = time.perf_counter() - started
            store.mark_done({**row, "params": model_params(self.run_dir(run))}, summary, wall)
        self._walls.append(wall)
        result.trained.append(run.name)
        return "done"

    def _record_finished(self, run: PlannedRun, store: ResultStore) -> None:
        """A finished run directory whose row is missing or stale (another worker's crash, a deleted database)."""
        if store.statuses(self.spec.name, [run.key]).get(run.key) != "done":
            summary = RunDir(self.run_dir(run)).read_summary()
            store.mark_done({**self.row(run), "params": model_params(self.run_dir(run))}, summary)

    def _train(self, run: PlannedRun) -> dict[str, Any]:
        from .. import api

        cfg = self.config(run)
        if self.echo:
            self.log(f"== {run.role} {run.pair} {run.method if run.role == 'student' else ''} seed {run.seed}: {run.name}")
        if run.pipeline is None:
            return api.run(cfg, echo=self.echo, data=self._dataset(cfg))
        return self._run_pipeline(run, cfg)

    def _run_pipeline(self, run: PlannedRun, cfg: RunConfig) -> dict[str, Any]:
        """The extension point for multi-stage methods (TAKD, AID): a pipeline registered in
        gapkd.pipelines.PIPELINES, called as ``pipeline(None, tree, echo=...)`` with ``tree`` the run's
        config plus the pipeline's options under its own name; it writes its stages inside the run
        directory (``out_dir/name``) and returns a summary whose ``student`` entry is the final stage's."""
        pipeline = _pipeline(run.pipeline, run.method, f"study {self.spec.name}")
        tree = cfg.model_dump(mode="json")
        tree[run.pipeline] = copy.deepcopy(run.pipeline_options)
        outcome = pipeline(None, tree, echo=self.echo)
        summary = dict(outcome.get("student", outcome))
        run_dir = self.run_dir(run)
        final = RunDir(run_dir / str(summary.get("run", ""))).metrics
        summary.update(pipeline=run.pipeline, metrics_file=str(final.relative_to(run_dir)) if final.is_file() else None)
        from ..core.io import atomic_write_text

        atomic_write_text(RunDir(run_dir).summary, json.dumps(summary, indent=2) + "\n")
        return summary

    def _dataset(self, cfg: RunConfig):
        """Each dataset is read once per worker and shared by its runs (splits are made per run)."""
        from ..data import load_dataset

        key = json.dumps([cfg.data.name, cfg.data.root, cfg.data.path, cfg.data.verify, cfg.data.download])
        if key not in self._data:
            self._data[key] = load_dataset(cfg.data)
        return self._data[key]

    def _progress(self, store: ResultStore, result: StudyRunResult, k: int, n: int, remaining: int) -> None:
        statuses = store.statuses(self.spec.name, self.by_key)
        done = sum(1 for status in statuses.values() if status == "done")
        eta = _duration(remaining * sum(self._walls) / len(self._walls)) if self._walls else "--"
        last = f"last {self._walls[-1]:.0f}s, " if result.trained and self._walls else ""
        label = f"{self.spec.name}/{self.spec.budget}" if self.spec.budget else self.spec.name
        self.log(f"[{label}] grid {done}/{result.total} done | shard {k}/{n}: {result.selected - remaining}/{result.selected} "
                 f"({len(result.trained)} trained, {len(result.skipped)} skipped, {len(result.failed)} failed) | {last}ETA {eta}")


    # ------------------------------------------------------------ gates
    def _gate_order(self, runs: list[PlannedRun]) -> list[PlannedRun]:
        """Teachers, then tuning runs, then the evaluation runs a student gate needs, then the rest (stable)."""
        gates = self.spec.gates
        gated = {gates.method, gates.over} if gates is not None and gates.min_gain is not None else set()

        def rank(run: PlannedRun) -> int:
            if run.role == "teacher":
                return 0
            return 1 if run.phase == "tune" else 2 if run.method in gated else 3
        return sorted(runs, key=rank)

    def check_gates(self, before: Optional[PlannedRun] = None) -> None:
        """Raise a StudyGateError when a gate whose runs have all finished fails (``before``: only the gates that
        must hold before that run trains). A gate with unfinished runs (another shard's) is not judged yet."""
        gates = self.spec.gates
        if gates is None or (before is not None and before.role == "teacher"):
            return
        if gates.teacher_gap is not None:
            self._check_teacher_gap(gates.teacher_gap)
        gated = (gates.method, gates.over)
        if gates.min_gain is not None and (before is None or (before.phase == "eval" and before.method not in gated)):
            self._check_student_gain(gates)

    def _finished_values(self, runs: list[PlannedRun], metric: str = "best_val_acc") -> Optional[list[float]]:
        summaries = [self.summary(run) for run in runs]
        if not runs or any(s is None for s in summaries):
            return None
        return [s[metric] for s in summaries if s.get(metric) is not None]

    def _check_teacher_gap(self, gap: float) -> None:
        ladders: dict[tuple[str, str], list[str]] = {}
        for run in self.plan:
            if run.role == "student" and run.teacher_key and run.teacher_key not in ladders.setdefault((run.dataset, run.model), []):
                ladders[(run.dataset, run.model)].append(run.teacher_key)
        order = {pair.teacher: index for index, pair in enumerate(self.spec.pairs)}
        for (dataset, student), keys in ladders.items():
            rungs = sorted((self.by_key[key] for key in keys), key=lambda run: order.get(run.model, len(order)))
            accuracies = [self._finished_values([run]) for run in rungs]
            for lower, upper, low, high in zip(rungs, rungs[1:], accuracies, accuracies[1:]):
                if low and high and high[0] - low[0] < gap:
                    raise StudyGateError(
                        f"teacher gate: on {dataset}, teacher {upper.model} reaches {high[0]:.2f}% validation accuracy, "
                        f"less than {gap:g} points above {lower.model} ({low[0]:.2f}%), so the ladder has no clear rung "
                        f"there. Train the teachers longer (teacher_config train.epochs) or replace {upper.model} with a "
                        "larger model; every finished run is kept.")

    def _check_student_gain(self, gates) -> None:
        groups: dict[tuple[str, str], dict[str, list[PlannedRun]]] = {}
        for run in self.plan:
            if run.role == "student" and run.phase == "eval" and run.method in (gates.method, gates.over):
                groups.setdefault((run.dataset, run.model), {}).setdefault(run.method, []).append(run)
        for (dataset, student), by_method in groups.items():
            pairs = sorted({run.pair for run in by_method.get(gates.method, [])})
            for pair in pairs:
                mine = self._finished_values([r for r in by_method.get(gates.method, []) if r.pair == pair])
                theirs = self._finished_values(by_method.get(gates.over, []))
                if not mine or not theirs:
                    continue
                gain = sum(mine) / len(mine) - sum(theirs) / len(theirs)
                if gain < gates.min_gain:
                    raise StudyGateError(
                        f"student gate: on {dataset}, {gates.method} ({pair}) beats {gates.over} by {gain:+.2f} points of mean "
                        f"validation accuracy, less than the {gates.min_gain:g} the study asks for: at this student budget "
                        "distillation does not yet help, so no method comparison would mean anything. Lengthen the student "
                        "budget (student_config train.epochs) and run the study again; every finished run is kept.")


class StudyGateError(GapkdError):
    """A study gate failed (see GateSpec): the message says which and what to change."""


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def run_study(spec: StudySpec, study_dir: str | Path | None = None, *, overrides: Optional[dict] = None,
              shard_index: tuple[int, int] = (1, 1), phase: Phase = "all", echo: bool = True,
              log: Callable[[str], None] = print) -> StudyRunResult:
    """Run (or resume) shard ``k/n`` of a study's ``phase``; see the module docstring."""
    runner = StudyRunner(spec, study_dir, overrides=overrides, echo=echo, log=log)
    return runner.run(*shard_index, phase=phase)


def study_status(spec: StudySpec, study_dir: str | Path | None = None, *, overrides: Optional[dict] = None) -> dict[str, Any]:
    """Where the grid stands: counts by role and state, unfinished rows, and an estimate of the time left."""
    runner = StudyRunner(spec, study_dir, overrides=overrides, echo=False)
    rows: dict[str, dict] = {}
    if (runner.study_dir / DB_FILE).is_file():
        with ResultStore(runner.study_dir / DB_FILE) as store:
            rows = {row["config_hash"]: row for row in store.rows(spec.name)}
    counts: dict[str, dict[str, int]] = {"teacher": {}, "student": {}}
    walls: dict[str, list[float]] = {"teacher": [], "student": []}
    unfinished = []
    cache: dict[str, int] = {}  # finished runs by how they got their teacher's logits (data.views > 0): hit, built, ...
    for run in runner.plan:
        row = rows.get(run.key, {})
        state = "done" if runner.finished(run) else row.get("status") or "pending"
        if state == "running" and worker_alive(row.get("worker")) is False:
            state = "stale"  # its worker was killed: nobody runs it; the next `gapkd study run` resumes it
        counts[run.role][state] = counts[run.role].get(state, 0) + 1
        if state == "done" and (row.get("summary") or {}).get("teacher_cache"):
            cache[row["summary"]["teacher_cache"]] = cache.get(row["summary"]["teacher_cache"], 0) + 1
        if state == "done" and row.get("wall_seconds"):
            walls[run.role].append(row["wall_seconds"])
        elif state != "done":
            unfinished.append({"run": run.name, "state": state, "worker": row.get("worker"), "error": row.get("error")})
    left, every = 0.0, walls["teacher"] + walls["student"]
    for role in ("teacher", "student"):  # each role at its own mean wall time, else at the mean of all finished runs
        pending = sum(v for state, v in counts[role].items() if state != "done")
        known = walls[role] or every
        if pending and known:
            left += pending * sum(known) / len(known)
    done = sum(c.get("done", 0) for c in counts.values())
    return {"study": spec.name, "budget": spec.budget, "dir": str(runner.study_dir), "total": len(runner.plan), "done": done,
            "counts": counts, "unfinished": unfinished, "eta": _duration(left) if left else None, "teacher_cache": cache}
