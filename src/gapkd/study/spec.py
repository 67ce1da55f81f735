"""The study schema (a YAML file or a built-in name) and its expansion into planned runs.

A study is a base run config plus axes: datasets x teacher->student pairs x methods (each with
a hyper-parameter grid) x seeds, a training config for teachers and one for students, and named
budgets (overlays on the study itself: fewer epochs, subsets, seeds or grid points). Expanding a
study gives one :class:`PlannedRun` per distinct run, teachers first; each run is identified by
:func:`run_key`, a hash of its validated RunConfig that does not depend on where files live.
Registries are consulted only at expansion, so a study may name models or methods that a given
install lacks; expanding it then fails with one message naming them.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..config import RunConfig, _format_errors, build_config, identity_payload, merge, read_yaml
from ..core.errors import ConfigError, suggest
from ..core.plugins import import_plugins, plugin_list

#: The stand-in for a teacher checkpoint inside a planned student config; the runner replaces
#: it with the path of that teacher run's best checkpoint (so the run key is location-free).
TEACHER_CHECKPOINT_PREFIX = "study-teacher:"
#: Run-config sections the axes own; a study's base/teacher_config/student_config may not set them.
AXIS_KEYS = ("student", "teacher", "method", "seed", "name", "out_dir", "run")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Strict):
    name: str = Field(..., description="registered model name (gapkd list models)")
    options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the model factory, e.g. stem: cifar")


class PairSpec(_Strict):
    teacher: Optional[str] = Field(None, description="model label (a key of `models`, or a model name); none = baselines only")
    student: str = Field(..., description="model label (a key of `models`, or a model name)")
    methods: dict[str, Optional[dict[str, Any]]] = Field(
        default_factory=dict, description="per-pair overlays on method entries (e.g. a pair's own grid); null drops the method here"
    )


class MethodSpec(_Strict):
    name: Optional[str] = Field(None, description="registered method; default: the entry's label")
    params: dict[str, Any] = Field(default_factory=dict, description="fixed hyper-parameters")
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="hyper-parameter values to try (cartesian product)")
    points: list[dict[str, Any]] = Field(
        default_factory=list, description="hyper-parameter configurations to try, each a mapping (combined with every grid "
        "point); for settings that go together, e.g. a set of loss weights")
    config: dict[str, Any] = Field(default_factory=dict, description="extra run-config keys for this method's runs")
    pipeline: Optional[str] = Field(None, description="a multi-stage pipeline (gapkd.pipelines.PIPELINES) run instead of one run")
    pipeline_options: dict[str, Any] = Field(default_factory=dict, description="the pipeline's own options (its config section)")

    @field_validator("grid")
    @classmethod
    def _non_empty(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        empty = [key for key, values in grid.items() if not values]
        if empty:
            raise ValueError(f"grid values must be non-empty lists; {empty} are empty")
        return grid


class TuningSpec(_Strict):
    """Hyper-parameters chosen on validation with a seed of their own: every configuration of a method (its
    grid and points) trains once with ``seed``; the configuration with the best validation accuracy then
    trains with every evaluation seed. The tuning seed's runs are never reported as results."""

    seed: int = Field(..., description="the tuning seed (not one of the study's seeds)")
    teachers: Optional[list[str]] = Field(
        None, description="teacher labels of the pairs to tune on; the choice then applies to every pair of the "
        "dataset and student (default, and for a method on none of these pairs: each pair is tuned on its own)")


class GateSpec(_Strict):
    """Checks that make a study's answer mean something, run as soon as their runs are finished; a failed gate
    stops the study with a message naming what to change, keeping every finished run."""

    teacher_gap: Optional[float] = Field(
        None, ge=0, description="each teacher (in the order of `pairs`, per dataset and student) must beat the one "
        "before it by at least this many points of validation accuracy")
    method: str = Field("kd", description="method label whose gain the student gate checks")
    over: str = Field("scratch", description="method label it must beat")
    min_gain: Optional[float] = Field(
        None, description="points of mean validation accuracy (evaluation seeds) by which `method` must beat `over` on "
        "every pair before the other methods train; if it does not, the student budget is too short")


class StudySpec(_Strict):
    name: str
    description: str = ""
    base: dict[str, Any] = Field(default_factory=dict, description="run-config keys shared by every run (data, optim, schedule, train)")
    teacher_config: dict[str, Any] = Field(default_factory=dict, description="run-config keys for teacher runs (e.g. train.epochs)")
    student_config: dict[str, Any] = Field(default_factory=dict, description="run-config keys for student runs")
    datasets: list[Union[str, dict[str, Any]]] = Field(default_factory=list, description="data.name values or data sections; empty = base's")
    models: dict[str, ModelSpec] = Field(default_factory=dict, description="model labels used by pairs")
    pairs: list[PairSpec] = Field(..., min_length=1)
    methods: dict[str, Optional[MethodSpec]] = Field(..., min_length=1, description="label -> method entry (null drops it)")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    teacher_seed: Union[int, Literal["match"]] = Field(0, description="seed of every teacher, or `match`: one teacher per student seed")
    baseline: Optional[str] = Field("scratch", description="method label the Welch t-test compares against (same dataset and student)")
    tuning: Optional[TuningSpec] = Field(None, description="choose hyper-parameters with a seed of their own (see TuningSpec)")
    gates: Optional[GateSpec] = Field(None, description="checks before the main grid (see GateSpec)")
    budgets: dict[str, dict[str, Any]] = Field(default_factory=dict, description="name -> overlay on this study (plus an optional `note`)")
    budget: Optional[str] = Field(None, description="the budget this spec was resolved at (set by resolve_study)")
    budget_note: str = ""

    @model_validator(mode="after")
    def _check(self) -> "StudySpec":
        self.methods = {label: entry for label, entry in self.methods.items() if entry is not None}
        if not self.methods:
            raise ValueError("no methods left (every entry is null)")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds repeat: {self.seeds}")
        if self.baseline is not None and self.baseline not in self.methods:
            raise ValueError(f"baseline {self.baseline!r} is not a method label; labels: {', '.join(self.methods)}")
        if self.tuning is not None and self.tuning.seed in self.seeds:
            raise ValueError(f"tuning.seed {self.tuning.seed} is also an evaluation seed; choose a seed outside {self.seeds}")
        if self.tuning is not None and self.tuning.teachers is not None:
            teachers = {pair.teacher for pair in self.pairs}
            unknown = [label for label in self.tuning.teachers if label not in teachers]
            if unknown:
                raise ValueError(f"tuning.teachers names {unknown}, which are not teachers of any pair ({sorted(map(str, teachers))})")
        if self.gates is not None and self.gates.min_gain is not None:
            missing = [label for label in (self.gates.method, self.gates.over) if label not in self.methods]
            if missing:
                raise ValueError(f"gates name method labels {missing} the study does not list ({', '.join(self.methods)})")
        for section in ("base", "teacher_config", "student_config"):
            taken = [key for key in AXIS_KEYS if key in getattr(self, section) and not (section == "teacher_config" and key == "method")]
            if taken:
                raise ValueError(f"{section} may not set {taken}: the study's axes (pairs, methods, seeds) set them")
        return self


@dataclass(frozen=True)
class PlannedRun:
    """One run of the grid: a validated config tree plus what the report groups by."""

    key: str
    role: Literal["teacher", "student"]
    dataset: str
    model: str  # label of the model this run trains
    teacher: Optional[str]  # label of the teacher it distils from (student runs)
    method: str  # method label in the study ("teacher" for teacher runs)
    method_name: str  # the registered method of the (last) run
    seed: int
    hparams: dict[str, Any]
    tree: dict[str, Any] = field(repr=False)
    teacher_key: Optional[str] = None
    pipeline: Optional[str] = None
    pipeline_options: dict[str, Any] = field(default_factory=dict, repr=False)
    index: int = 0  # position in the stable grid order (teachers first)
    phase: Literal["tune", "eval"] = "eval"  # tune: a configuration tried with the tuning seed (never reported)
    choice: Optional[tuple] = None  # tune runs: (dataset, scope, method label, point index) they compete in

    @property
    def pair(self) -> str:
        return f"{self.teacher}→{self.model}" if self.teacher else self.model

    @property
    def name(self) -> str:
        """The run directory's name: readable, and unique through the key."""
        parts = [self.dataset, f"{self.teacher}-{self.model}" if self.teacher else self.model]
        if self.role == "student":
            parts.append(self.method)
        parts += [f"s{self.seed}", self.key]
        return re.sub(r"[^A-Za-z0-9._+-]", "-", "_".join(parts))

    @property
    def subdir(self) -> str:
        return "teachers" if self.role == "teacher" else "students"


# ------------------------------------------------------------------ loading and budgets
def builtin_studies() -> list[str]:
    folder = resources.files("gapkd") / "recipes" / "studies"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml")) if folder.is_dir() else []


def read_study(source: str | Path) -> dict[str, Any]:
    """A study's raw mapping from a YAML path or a built-in name (capacity-ladder-cpu, capacity-cifar10, gap-ladder)."""
    path = Path(source).expanduser()
    if path.is_file():
        return read_yaml(path)
    builtin = resources.files("gapkd") / "recipes" / "studies" / f"{source}.yaml"
    if builtin.is_file():
        with resources.as_file(builtin) as real:
            return read_yaml(real)
    names = builtin_studies()
    raise ConfigError(f"study {source!r} is neither a YAML file nor a built-in study.{suggest(str(source), names)} "
                      f"Built-in studies: {', '.join(names) or 'none'}.")


def resolve_study(source: str | Path | dict[str, Any], budget: Optional[str] = None) -> StudySpec:
    """The study at ``budget``: the budget's overlay merged into the study (dicts merge, lists replace)."""
    raw = copy.deepcopy(source) if isinstance(source, dict) else read_study(source)
    budgets = raw.get("budgets") or {}
    label = raw.get("name", str(source))
    if budgets and budget is None:
        raise ConfigError(f"study {label} has budgets {', '.join(budgets)}; choose one with --budget (smoke runs in seconds).")
    if budget is not None:
        if budget not in budgets:
            raise ConfigError(f"study {label} has no budget {budget!r}.{suggest(budget, budgets)} Budgets: {', '.join(budgets) or 'none'}.")
        overlay = copy.deepcopy(budgets[budget] or {})
        if "budgets" in overlay:
            raise ConfigError(f"budget {budget} of study {label} may not define budgets itself.")
        note = overlay.pop("note", "")
        raw = merge(raw, overlay)
        raw.update(budget=budget, budget_note=str(note).strip())
    try:
        return StudySpec.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(f"study {label}" + (f" (budget {budget})" if budget else "") + ": "
                          + _format_errors(error, root=StudySpec)) from None


# ------------------------------------------------------------------ expansion
def run_key(cfg: RunConfig, role: str, pipeline: Optional[dict[str, Any]] = None) -> str:
    """What identifies a run across machines: its role and config, without where files are written or
    read from. (The role keeps a teacher apart from a from-scratch student that happens to share its config.)"""
    payload = identity_payload(cfg, "study_key")  # the fields' own marks (gapkd.config.identity)
    payload["role"] = role
    if pipeline:
        payload["pipeline"] = pipeline
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def _student_jobs(spec: StudySpec, datasets: list[dict], where: str) -> list[tuple]:
    """(base tree, dataset, pair, method label, method entry, uses a teacher) for every student cell of the grid."""
    from ..methods import METHODS

    jobs = []
    for data_section in datasets:
        base = merge(spec.base, {"data": data_section})
        dataset = str(base.get("data", {}).get("name", "digits"))
        for pair in spec.pairs:
            for label, entry in _pair_methods(spec, pair, where):
                uses_teacher = METHODS.get(entry.name or label).needs_teacher or entry.pipeline is not None
                if uses_teacher and pair.teacher is None:
                    continue  # a baselines-only pair (e.g. a stem ablation) runs teacher-free methods alone
                jobs.append((base, dataset, pair, label, entry, uses_teacher))
    return jobs


def _plan_tuning_runs(jobs: list[tuple], tuning, shared: set, scope, student_run, students: dict) -> dict[tuple, list["PlannedRun"]]:
    """The tuning runs, planned first: every configuration of a tuned method once, with the tuning seed;
    grouped by the choice they compete in, (dataset, scope, method label)."""
    tune_runs: dict[tuple, list[PlannedRun]] = {}
    for job in jobs:
        _, dataset, pair, label, entry, _ = job
        points = _grid_points(entry.grid, entry.points)
        if tuning is None or len(points) < 2:
            continue
        if (dataset, pair.student, label) in shared and pair.teacher not in tuning.teachers:
            continue  # chosen on the tuning pairs
        scope_ = scope(dataset, pair, label)
        for index, point in enumerate(points):
            before = len(students)
            student_run(job, point, tuning.seed, "tune", (dataset, scope_, label, index))
            if len(students) > before:
                tune_runs.setdefault((dataset, scope_, label), []).append(list(students.values())[-1])
    return tune_runs


#: ``choose(key, runs)``: the index of the configuration chosen for ``key`` = (dataset, scope, method label) from
#: its finished tuning runs, or None while they are not all finished (see StudyRunner.choose)
Chooser = Callable[[tuple, list["PlannedRun"]], Optional[int]]


def expand(spec: StudySpec, overrides: Optional[dict[str, Any]] = None, choose: Optional[Chooser] = None) -> list[PlannedRun]:
    """Every distinct run of the study, teachers first, in a stable order; validates all of them.

    With ``spec.tuning``, a method with several configurations first trains each of them with the tuning
    seed (phase ``tune``); its evaluation runs are planned only once ``choose`` names the configuration
    chosen on validation (without ``choose``, or before the tuning runs finish, they are left out)."""
    where = f"study {spec.name}" + (f" (budget {spec.budget})" if spec.budget else "")
    overrides = overrides or {}

    # the plugins a run config names register what the study names: imported before the names are checked
    import_plugins(plugin for tree in (spec.base, spec.teacher_config, spec.student_config, overrides,
                                       *(entry.config for entry in spec.methods.values()))
                   for plugin in plugin_list(tree.get("plugins")))
    _check_registered(spec, where)

    def model_section(label: str) -> dict[str, Any]:
        return (spec.models.get(label) or ModelSpec(name=label)).model_dump(mode="json")

    def build(tree: dict[str, Any], what: str) -> RunConfig:
        try:
            return build_config(tree)
        except ConfigError as error:
            raise ConfigError(f"{where}, {what}: {error}") from None

    datasets = [d if isinstance(d, dict) else {"name": d} for d in spec.datasets] or [dict(spec.base.get("data", {}))]
    teachers: dict[str, PlannedRun] = {}
    students: dict[str, PlannedRun] = {}

    def student_run(job, point: dict[str, Any], seed: int, phase: str = "eval", choice: Optional[tuple] = None) -> None:
        base, dataset, pair, label, entry, uses_teacher = job
        tree = merge(merge(merge(merge(base, spec.student_config), entry.config), overrides), {
            "student": model_section(pair.student), "seed": seed,
            "method": {"name": entry.name or label, **entry.params, **point},
        })
        teacher_key = None
        if uses_teacher:
            teacher_seed = seed if spec.teacher_seed == "match" else spec.teacher_seed
            teacher = _teacher_run(spec, base, overrides, pair.teacher, dataset, teacher_seed, model_section, build)
            teachers.setdefault(teacher.key, teacher)
            teacher_key = teacher.key
            tree["teacher"] = {**model_section(pair.teacher), "checkpoint": TEACHER_CHECKPOINT_PREFIX + teacher_key}
        cfg = build(tree, f"methods.{label} on {pair.teacher or '-'}->{pair.student}")
        pipeline = {"name": entry.pipeline, "options": entry.pipeline_options} if entry.pipeline else None
        key = run_key(cfg, "student", pipeline)
        students.setdefault(key, PlannedRun(
            key=key, role="student", dataset=dataset, model=pair.student,
            teacher=pair.teacher if uses_teacher else None, method=label, method_name=cfg.method.name,
            seed=seed, hparams=cfg.method.hparams, tree=cfg.model_dump(mode="json"), teacher_key=teacher_key,
            pipeline=entry.pipeline, pipeline_options=dict(entry.pipeline_options), phase=phase, choice=choice,
        ))

    jobs = _student_jobs(spec, datasets, where)
    tuning = spec.tuning
    # methods with a pair among tuning.teachers share one choice per student; the others are tuned on each of their pairs
    shared = {(job[1], job[2].student, job[3]) for job in jobs if tuning is not None and tuning.teachers and job[2].teacher in tuning.teachers}

    def scope(dataset: str, pair: PairSpec, label: str) -> str:
        return f"*→{pair.student}" if (dataset, pair.student, label) in shared else f"{pair.teacher}→{pair.student}"

    tune_runs = _plan_tuning_runs(jobs, tuning, shared, scope, student_run, students)
    for job in jobs:
        _, dataset, pair, label, entry, _ = job
        points = _grid_points(entry.grid, entry.points)
        if tuning is not None and len(points) > 1:
            key = (dataset, scope(dataset, pair, label), label)
            index = choose(key, tune_runs.get(key, [])) if choose is not None and tune_runs.get(key) else None
            if index is None:
                continue  # planned once its tuning runs have finished
            points = [points[index]]
        for point in points:
            for seed in spec.seeds:
                student_run(job, point, seed)
    ordered = list(teachers.values()) + list(students.values())
    return [replace(run, index=i) for i, run in enumerate(ordered)]


def _check_registered(spec: StudySpec, where: str) -> None:
    """Every dataset, model, method and pipeline the study names, checked at once: one message lists all
    that this install lacks (models and methods may come with a newer gapkd)."""
    from ..data import DATASETS
    from ..methods import METHODS
    from ..models import MODELS

    datasets = [d if isinstance(d, str) else d.get("name", "digits") for d in spec.datasets] or [spec.base.get("data", {}).get("name", "digits")]
    labels = {label for pair in spec.pairs for label in (pair.teacher, pair.student) if label}
    models = {(spec.models[label].name if label in spec.models else label) for label in labels}
    methods = {label: entry.name or label for label, entry in spec.methods.items()}
    problems = [f"dataset {name!r}" for name in datasets if name not in DATASETS]
    problems += [f"model {name!r}" for name in sorted(models) if name not in MODELS]
    problems += [f"method {name!r} (methods.{label})" for label, name in methods.items() if name not in METHODS]
    for label, entry in spec.methods.items():
        if entry.pipeline:
            try:
                _pipeline(entry.pipeline, label, where)
            except ConfigError:
                problems.append(f"pipeline {entry.pipeline!r} (methods.{label})")
    if problems:
        raise ConfigError(f"{where} names what this gapkd does not have: {'; '.join(problems)}. They may come with a newer "
                          "gapkd (see `gapkd list models` / `gapkd list methods`); otherwise fix the names, or drop them "
                          "in a study file of your own.")


def _pair_methods(spec: StudySpec, pair: PairSpec, where: str):
    unknown = [label for label in pair.methods if label not in spec.methods]
    if unknown:
        raise ConfigError(f"{where}: pair {pair.teacher}->{pair.student} overlays methods {unknown} the study does not list "
                          f"({', '.join(spec.methods)}).")
    for label, entry in spec.methods.items():
        if label in pair.methods:
            overlay = pair.methods[label]
            if overlay is None:
                continue
            try:
                entry = MethodSpec.model_validate(merge(entry.model_dump(), overlay))
            except ValidationError as error:
                raise ConfigError(f"{where}: pair {pair.teacher}->{pair.student}, methods.{label}: "
                                  + _format_errors(error, root=MethodSpec)) from None
        yield label, entry


def _grid_points(grid: dict[str, list[Any]], points: Optional[list[dict[str, Any]]] = None) -> list[dict[str, Any]]:
    """Every configuration of a method: each of ``points`` (default: one empty) with each grid point."""
    keys = list(grid)
    product = [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]
    return [{**point, **values} for point in (points or [{}]) for values in product]


def _teacher_run(spec, base, overrides, label, dataset, seed, model_section, build) -> PlannedRun:
    teacher_config = copy.deepcopy(spec.teacher_config)
    method = merge({"name": "ce"}, teacher_config.pop("method", {}) or {})
    tree = merge(merge(merge(base, teacher_config), overrides), {"student": model_section(label), "seed": seed, "method": method})
    cfg = build(tree, f"teacher {label}")
    key = run_key(cfg, "teacher")
    return PlannedRun(key=key, role="teacher", dataset=dataset, model=label, teacher=None, method="teacher",
                      method_name=cfg.method.name, seed=seed, hparams=cfg.method.hparams, tree=cfg.model_dump(mode="json"))


def _pipeline(name: str, label: str, where: str):
    """The pipeline registered as ``name`` in gapkd.pipelines (TAKD, AID, ...): the extension point."""
    try:
        from ..pipelines import PIPELINES  # type: ignore[import-not-found]
    except ImportError:
        raise ConfigError(f"{where}: methods.{label} is the pipeline {name!r}, but this gapkd has no pipelines module "
                          f"(gapkd.pipelines); drop the method from the study or use a budget without it.") from None
    try:
        return PIPELINES.get(name)
    except ConfigError as error:
        raise ConfigError(f"{where}: methods.{label}: {error}") from None


def shard(runs: list[PlannedRun], k: int, n: int) -> list[PlannedRun]:
    """Shard ``k`` of ``n`` (1-based): every run whose position in ``runs`` is k-1 modulo n."""
    if not 1 <= k <= n:
        raise ConfigError(f"shard {k}/{n} is out of range; use K/N with 1 <= K <= N (for example --shard 2/8).")
    return [run for position, run in enumerate(runs) if position % n == k - 1]


def parse_shard(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not match:
        raise ConfigError(f"--shard {text!r} is not K/N (for example --shard 2/8; with Slurm: "
                          "--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT).")
    k, n = int(match.group(1)), int(match.group(2))
    shard([], k, n)  # range check
    return k, n
