"""Study reports: tables (mean ± std over seeds), Welch t-tests, hyper-parameters chosen on
validation only, and matplotlib plots, as Markdown and HTML built from the same data.

Protocol: every run is read at its best-validation epoch (``test_acc_at_best_val``) and at its
last epoch. Runs are grouped by (dataset, pair, method, hyper-parameters) over seeds; for each
(dataset, pair, method) the hyper-parameters with the highest MEAN VALIDATION accuracy are
chosen (test accuracy is never looked at to choose). Each chosen method is compared with the
baseline method (the study's ``baseline``, e.g. scratch) of the same dataset and student by
Welch's two-sided t-test on the per-seed test accuracies at the best-validation epoch.
"""
from __future__ import annotations

import html
import json
import math
import re
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from ..core.rundir import RunDir
from ..engine.runlog import read_metrics
from .runner import DB_FILE, StudyRunner
from .spec import StudySpec
from .store import ResultStore

METRICS = ("best_val_acc", "test_acc_at_best_val", "last_test_acc")


@dataclass
class Stat:
    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def std(self) -> float:
        """Sample standard deviation (n - 1); NaN for fewer than two seeds."""
        return statistics.stdev(self.values) if self.n >= 2 else math.nan

    def __str__(self) -> str:
        if not self.values:
            return "n/a"
        return f"{self.mean:.2f} ± {self.std:.2f}" if self.n >= 2 else f"{self.mean:.2f}"


@dataclass
class Group:
    """The runs of one (dataset, pair, method, hyper-parameters) over seeds."""

    dataset: str
    pair: str
    model: str
    teacher: Optional[str]
    method: str
    hparams: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    order: int = 0  # grid position of its first run: ties in validation accuracy go to the earlier point

    def stat(self, metric: str) -> Stat:
        return Stat([row[metric] for row in sorted(self.rows, key=lambda r: r["seed"]) if row.get(metric) is not None])

    @property
    def seeds(self) -> list[int]:
        return sorted(row["seed"] for row in self.rows)


@dataclass
class Comparison:
    baseline: Group
    delta: float  # mean test accuracy at best validation minus the baseline's
    t: Optional[float]
    p: Optional[float]
    p_holm: Optional[float] = None  # p adjusted by Holm's step-down method over every comparison of the report


@dataclass
class Summary:
    groups: list[Group]
    chosen: dict[tuple[str, str, str], Group]  # (dataset, pair, method) -> chosen hyper-parameters
    candidates: dict[tuple[str, str, str], list[Group]]
    comparisons: dict[tuple[str, str, str], Comparison]
    teachers: dict[tuple[str, str], list[dict[str, Any]]]  # (dataset, teacher label) -> its rows


def welch(a: Sequence[float], b: Sequence[float]) -> tuple[Optional[float], Optional[float]]:
    """Welch's t statistic and two-sided p-value (scipy), or (None, None) with fewer than 2 values a side."""
    if len(a) < 2 or len(b) < 2:
        return None, None
    from scipy.stats import ttest_ind

    with warnings.catch_warnings():  # nearly equal samples: scipy warns, the NaN or value below says enough
        warnings.simplefilter("ignore", RuntimeWarning)
        result = ttest_ind(list(a), list(b), equal_var=False)
    t, p = float(result.statistic), float(result.pvalue)
    return (None, None) if math.isnan(t) else (t, p)


def summarize(rows: list[dict[str, Any]], baseline: Optional[str] = "scratch", order: Optional[dict[str, int]] = None) -> Summary:
    """Group finished rows, choose hyper-parameters on validation, compare with the baseline."""
    order = order or {}
    rows = sorted(rows, key=lambda r: (order.get(r["config_hash"], len(order)), r["seed"]))
    groups: dict[tuple, Group] = {}
    teachers: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        if row["role"] == "teacher":
            teachers.setdefault((row["dataset"], row["model"]), []).append(row)
            continue
        key = (row["dataset"], row["pair"], row["method"], json.dumps(row["hparams"], sort_keys=True))
        group = groups.get(key)
        if group is None:
            group = groups[key] = Group(row["dataset"], row["pair"], row["model"], row["teacher"], row["method"], row["hparams"],
                                        order=order.get(row["config_hash"], len(order)))
        group.rows.append(row)
        group.order = min(group.order, order.get(row["config_hash"], group.order))
    candidates: dict[tuple[str, str, str], list[Group]] = {}
    for group in sorted(groups.values(), key=lambda g: g.order):
        candidates.setdefault((group.dataset, group.pair, group.method), []).append(group)
    chosen = {key: max(options, key=_validation_rank) for key, options in candidates.items()}
    comparisons = {}
    for key, group in chosen.items():
        if baseline is None or group.method == baseline:
            continue
        reference = chosen.get((group.dataset, group.pair, baseline)) or chosen.get((group.dataset, group.model, baseline))
        if reference is None:
            continue
        a, b = group.stat("test_acc_at_best_val"), reference.stat("test_acc_at_best_val")
        t, p = welch(a.values, b.values)
        comparisons[key] = Comparison(reference, a.mean - b.mean, t, p)
    tested = [key for key, c in comparisons.items() if c.p is not None]
    for key, adjusted in zip(tested, holm([comparisons[key].p for key in tested])):
        comparisons[key].p_holm = adjusted
    return Summary(list(groups.values()), chosen, candidates, comparisons, teachers)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment (family-wise error) of ``pvalues``, in their order: the i-th smallest
    p is multiplied by (m - i), made monotone from the smallest up, and capped at 1."""
    m = len(pvalues)
    adjusted = [0.0] * m
    running = 0.0
    for rank, index in enumerate(sorted(range(m), key=lambda i: pvalues[i])):
        running = max(running, min(1.0, (m - rank) * pvalues[index]))
        adjusted[index] = running
    return adjusted


def gap_trends(summary: Summary, baseline: Optional[str]) -> list[dict[str, Any]]:
    """Whether each method's gain over the baseline grows with the teacher's accuracy, per (dataset, student)
    with two or more teachers: the least-squares slope of the per-seed gains (method's test accuracy at
    the best-validation epoch minus the baseline's mean on the same pair) against the teacher's validation
    accuracy, its two-sided p-value (scipy.stats.linregress), and the mean gain on each rung."""
    rows = []
    by_student: dict[tuple[str, str, str], list[tuple[float, Group, Comparison]]] = {}
    for key, comparison in summary.comparisons.items():
        group = summary.chosen[key]
        teacher_val = _teacher_stat(summary, group.dataset, group.teacher, "best_val_acc").mean
        if group.teacher and comparison.baseline.teacher and not math.isnan(teacher_val):
            by_student.setdefault((group.dataset, group.model, group.method), []).append((teacher_val, group, comparison))
    for (dataset, student, method), rungs in by_student.items():
        if len(rungs) < 2:
            continue
        rungs.sort(key=lambda item: item[0])
        xs, ys = [], []
        for teacher_val, group, comparison in rungs:
            reference = comparison.baseline.stat("test_acc_at_best_val").mean
            for value in group.stat("test_acc_at_best_val").values:
                xs.append(teacher_val), ys.append(value - reference)
        slope = p = None
        if len(set(xs)) >= 2 and len(xs) >= 3:
            from scipy.stats import linregress

            fit = linregress(xs, ys)
            slope, p = float(fit.slope), float(fit.pvalue)
        trend = "n/a" if p is None else ("grows" if slope > 0 and p < 0.05 else "shrinks" if slope < 0 and p < 0.05
                                         else "no clear trend")
        rows.append({"dataset": dataset, "student": student, "method": method, "baseline": baseline, "slope": slope, "p": p,
                     "trend": trend, "gains": [(group.teacher, teacher_val, comparison.delta) for teacher_val, group, comparison in rungs]})
    return rows


def _validation_rank(group: Group) -> tuple[float, int]:
    """Higher mean validation accuracy first, then the earlier grid point (never test accuracy)."""
    mean = group.stat("best_val_acc").mean
    return (-math.inf if math.isnan(mean) else mean, -group.order)


# ------------------------------------------------------------------ writing
def _dotted(tree: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """{"data": {"name": "x"}} -> [("data.name", "x")]."""
    items: list[tuple[str, Any]] = []
    for key, value in tree.items():
        if isinstance(value, dict):
            items += _dotted(value, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", value))
    return items


def write_report(spec: StudySpec, study_dir: str | Path | None = None, *, overrides: Optional[dict] = None,
                 out_dir: str | Path | None = None) -> dict[str, Any]:
    """Collect the study's results and write report.md, report.html and the plots; returns their paths."""
    runner = StudyRunner(spec, study_dir, overrides=overrides, echo=False)
    out = Path(out_dir) if out_dir else runner.study_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    with ResultStore(runner.study_dir / DB_FILE) as store:
        for run in runner.plan:  # finished run directories whose rows are missing (a crashed worker, a rebuilt database)
            if runner.finished(run):
                runner._record_finished(run, store)
        stored = store.rows(spec.name)
    all_rows = [row for row in stored if row["config_hash"] in runner.by_key]
    elsewhere = sum(1 for row in stored if row["config_hash"] not in runner.by_key and row["status"] == "done")
    done = [row for row in all_rows if row["status"] == "done"]
    order = {run.key: run.index for run in runner.plan}
    tuning = [row for row in done if row["role"] == "student" and runner.by_key[row["config_hash"]].phase == "tune"]
    done = [row for row in done if row not in tuning]  # the tuning seed's runs choose; they are never reported
    summary = summarize(done, spec.baseline, order)
    metrics = {row["config_hash"]: _metrics(runner.study_dir, row) for row in done if row["role"] == "student"}
    plots = _plot_ladders(summary, spec, out) + _plot_curves(summary, spec, metrics, out)
    blocks = _blocks(spec, runner, summary, all_rows, plots) + _tuning_blocks(spec, runner, tuning) + _trend_blocks(summary, spec)
    if elsewhere:
        blocks.insert(3, ("p", f"Note: the database holds {elsewhere} finished run(s) of {spec.name} that are not in this grid "
                               "(another budget, or other key=value overrides): pass the same budget and overrides as to "
                               "`gapkd study run` to report them."))
    paths = {"md": out / "report.md", "html": out / "report.html", "plots": [out / p for p, _ in plots]}
    paths["md"].write_text(render_markdown(blocks))
    paths["html"].write_text(render_html(blocks, f"{spec.name} ({spec.budget or 'no budget'})"))
    return paths


def _metrics(study_dir: Path, row: dict[str, Any]) -> list[dict]:
    run_dir = study_dir / "runs" / ("teachers" if row["role"] == "teacher" else "students") / row["run_name"]
    relative = (row.get("summary") or {}).get("metrics_file") or RunDir.METRICS
    return read_metrics(run_dir / relative)


def _fmt(value: Optional[float], digits: int = 2, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _params(count: Optional[int]) -> str:
    return "n/a" if not count else f"{count / 1e6:.2f}M"


def _shown_hparams(summary: Summary, key: tuple[str, str, str], group: Group) -> str:
    """The hyper-parameters that vary over the grid of this (dataset, pair, method); '—' without a grid."""
    options = summary.candidates[key]
    varying = [k for k in group.hparams if len({json.dumps(g.hparams.get(k)) for g in options}) > 1]
    return ", ".join(f"{k}={group.hparams[k]}" for k in varying) or "—"


def _teacher_stat(summary: Summary, dataset: str, teacher: Optional[str], metric: str) -> Stat:
    return Stat([r[metric] for r in summary.teachers.get((dataset, teacher or ""), []) if r.get(metric) is not None])


def _blocks(spec: StudySpec, runner: StudyRunner, summary: Summary, rows: list[dict], plots: list[tuple[str, str]]) -> list[tuple]:
    done = {row["config_hash"] for row in rows if row["status"] == "done"}
    counts = {role: (sum(1 for r in runner.plan if r.role == role and r.key in done), sum(1 for r in runner.plan if r.role == role))
              for role in ("teacher", "student")}
    versions = sorted({row["code_version"] for row in rows if row["status"] == "done" and row.get("code_version")})
    budget = spec.budget or "none (the study defines no budgets)"
    blocks: list[tuple] = [
        ("h1", f"Study {spec.name} — budget {budget}"),
        ("p", f"Budget: {budget}." + (f" {spec.budget_note}" if spec.budget_note else "")),
    ]
    if spec.description:
        blocks.append(("p", spec.description.strip()))
    if runner.overrides:
        blocks.append(("p", "Overrides applied to every run (they replace the study's own values, so the dataset "
                            "column names the study's dataset, not an override's): "
                            + ", ".join(f"{key}={value}" for key, value in _dotted(runner.overrides)) + "."))
    blocks += [
        ("p", f"Runs finished: {len(done)} of {len(runner.plan)} (teachers {counts['teacher'][0]}/{counts['teacher'][1]}, "
              f"students {counts['student'][0]}/{counts['student'][1]}). Code version(s): {', '.join(versions) or 'n/a'}. "
              f"Generated {time.strftime('%Y-%m-%d %H:%M')} from {runner.study_dir / DB_FILE}."),
        ("p", "Protocol: each run is read at its best-validation epoch (test accuracy at that epoch) and at its last epoch. "
              "Hyper-parameters are chosen per (dataset, pair, method) by the mean VALIDATION accuracy over seeds; test accuracy "
              "is never used to choose. Values are mean ± sample standard deviation over seeds (a single seed shows its value). "
              f"Welch's t-test (unequal variances, two-sided) compares each method's test accuracy at the best-validation epoch "
              f"with the baseline '{spec.baseline}' of the same dataset and student; 'p (Holm)' adjusts those p-values for "
              "the number of comparisons (Holm's step-down method). With a tuning seed, hyper-parameters are chosen on its "
              "runs' validation accuracy alone and only the evaluation seeds are reported. Accuracies are top-1 %."),
        ("h2", "Results"),
        ("table", ["dataset", "pair", "method", "chosen on validation", "seeds", "val (best)", "test @ best val",
                   "test (last epoch)", f"Δ test vs {spec.baseline}", "Welch t", "p", "p (Holm)"], _main_rows(summary)),
    ]
    if summary.teachers:
        table = []
        for (dataset, model), teacher_rows in summary.teachers.items():
            stat = lambda metric: Stat([r[metric] for r in teacher_rows if r.get(metric) is not None])  # noqa: E731
            table.append([dataset, model, _params(teacher_rows[0].get("params")), str(len(teacher_rows)),
                          str(stat("best_val_acc")), str(stat("test_acc_at_best_val")), str(stat("last_test_acc"))])
        blocks += [("h2", "Teachers"), ("table", ["dataset", "teacher", "params", "seeds", "val (best)", "test @ best val",
                                                  "test (last epoch)"], table)]
    ladders = [p for p in plots if p[0].startswith("ladder_")]
    if ladders:
        blocks += [("h2", "Student accuracy against teacher accuracy and size")] + [("img", path, caption) for path, caption in ladders]
    curves = [p for p in plots if p[0].startswith("curves_")]
    if curves:
        blocks += [("h2", "Training curves (validation accuracy per epoch, mean over seeds)")]
        blocks += [("img", path, caption) for path, caption in curves]
    grid = []
    for key, options in summary.candidates.items():
        for group in options:
            grid.append([group.dataset, group.pair, group.method, _shown_hparams(summary, key, group), str(len(group.rows)),
                         str(group.stat("best_val_acc")), str(group.stat("test_acc_at_best_val")), str(group.stat("last_test_acc")),
                         "✓" if summary.chosen[key] is group else ""])
    blocks += [("h2", "All grid points"), ("table", ["dataset", "pair", "method", "hyper-parameters", "seeds", "val (best)",
                                                      "test @ best val", "test (last epoch)", "chosen"], grid)]
    unfinished = [row for row in rows if row["status"] != "done"]
    if unfinished:
        blocks += [("h2", "Unfinished runs"), ("table", ["run", "status", "error"],
                                               [[r["run_name"], r["status"], r.get("error") or ""] for r in unfinished])]
    return blocks


def _main_rows(summary: Summary) -> list[list[str]]:
    table = []
    for key, group in sorted(summary.chosen.items(), key=lambda item: item[1].order):
        comparison = summary.comparisons.get(key)
        table.append([
            group.dataset, group.pair, group.method, _shown_hparams(summary, key, group), str(len(group.rows)),
            str(group.stat("best_val_acc")), str(group.stat("test_acc_at_best_val")), str(group.stat("last_test_acc")),
            _fmt(comparison.delta, signed=True) if comparison else "—",
            _fmt(comparison.t) if comparison else "—",
            _fmt(comparison.p, 3) if comparison else "—",
            _fmt(comparison.p_holm, 3) if comparison else "—",
        ])
    return table


def _tuning_blocks(spec: StudySpec, runner: StudyRunner, rows: list[dict]) -> list[tuple]:
    """The tuning seed's runs: validation accuracy of every configuration, and which one was chosen."""
    if spec.tuning is None:
        return []
    table = []
    for row in sorted(rows, key=lambda r: runner.by_key[r["config_hash"]].index):
        run = runner.by_key[row["config_hash"]]
        dataset, scope, label, index = run.choice
        chosen = runner.choose((dataset, scope, label), [r for r in runner.plan if r.phase == "tune" and r.choice[:3] == run.choice[:3]])
        varying = {k: v for k, v in row["hparams"].items()
                   if len({json.dumps(r.hparams.get(k)) for r in runner.plan if r.choice and r.choice[:3] == run.choice[:3]}) > 1}
        table.append([dataset, row["pair"], label, scope, ", ".join(f"{k}={v}" for k, v in varying.items()) or "—",
                      _fmt(row.get("best_val_acc")), "✓" if chosen == index else ""])
    return [("h2", f"Tuning (seed {spec.tuning.seed}, validation accuracy only; never reported as a result)"),
            ("table", ["dataset", "pair", "method", "choice covers", "configuration", "val (best)", "chosen"], table)]


def _trend_blocks(summary: Summary, spec: StudySpec) -> list[tuple]:
    trends = gap_trends(summary, spec.baseline)
    if not trends:
        return []
    table = [[t["dataset"], t["student"], t["method"],
              "; ".join(f"{teacher} ({val:.1f}%): {delta:+.2f}" for teacher, val, delta in t["gains"]),
              _fmt(t["slope"], 3, signed=True), _fmt(t["p"], 3), t["trend"]] for t in trends]
    return [("h2", f"Does the gain over {spec.baseline} grow with the teacher?"),
            ("p", f"Per method: the gain over {spec.baseline} on each rung (mean test accuracy at the best-validation epoch; "
                  "rungs labelled by the teacher's validation accuracy), and the least-squares slope of the per-seed gains "
                  "against the teacher's validation accuracy (points of gain per point of teacher accuracy) with its p-value."),
            ("table", ["dataset", "student", "method", f"gain over {spec.baseline} per rung", "slope", "p", "trend"], table)]


# ------------------------------------------------------------------ plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _slug(*parts: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", "_".join(parts)).strip("-")


def _plot_ladders(summary: Summary, spec: StudySpec, out: Path) -> list[tuple[str, str]]:
    """For every (dataset, student) with two or more teachers: student accuracy against teacher
    accuracy and teacher size, one line per method, the baseline as a horizontal band."""
    plots = []
    students = {}
    for group in summary.chosen.values():
        students.setdefault((group.dataset, group.model), []).append(group)
    for (dataset, student), groups in students.items():
        teachers = sorted({g.teacher for g in groups if g.teacher})
        if len(teachers) < 2:
            continue
        plt = _pyplot()
        figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
        for axis, (label, metric) in zip(axes, [("teacher test accuracy (%)", "acc"), ("teacher parameters", "params")]):
            methods = {}
            for group in groups:
                if group.teacher:
                    methods.setdefault(group.method, []).append(group)
            for method, points in methods.items():
                xs, ys, errs = [], [], []
                for group in points:
                    teacher_rows = summary.teachers.get((dataset, group.teacher), [])
                    x = (_teacher_stat(summary, dataset, group.teacher, "test_acc_at_best_val").mean if metric == "acc"
                         else (teacher_rows[0].get("params") if teacher_rows else None))
                    if x is None or (isinstance(x, float) and math.isnan(x)):
                        continue
                    stat = group.stat("test_acc_at_best_val")
                    xs.append(x), ys.append(stat.mean), errs.append(0.0 if math.isnan(stat.std) else stat.std)
                if xs:
                    ordered = sorted(zip(xs, ys, errs))
                    axis.errorbar([p[0] for p in ordered], [p[1] for p in ordered], yerr=[p[2] for p in ordered],
                                  marker="o", capsize=3, label=method)
            baseline = next((g for g in groups if g.method == spec.baseline and not g.teacher), None)
            if baseline is not None:
                stat = baseline.stat("test_acc_at_best_val")
                axis.axhline(stat.mean, color="black", linestyle="--", label=f"{spec.baseline} (student alone)")
                if stat.n >= 2:
                    axis.axhspan(stat.mean - stat.std, stat.mean + stat.std, color="black", alpha=0.08)
            if metric == "params":
                from matplotlib.ticker import NullFormatter

                axis.set_xscale("log")
                axis.xaxis.set_minor_formatter(NullFormatter())  # minor labels of a narrow log range overlap
            axis.set_xlabel(label)
            axis.grid(alpha=0.3)
        axes[0].set_ylabel(f"{student} test accuracy @ best val (%)")
        axes[1].legend(fontsize=8, loc="best")
        figure.suptitle(f"{spec.name} [{spec.budget}] — {dataset}, student {student}: mean ± std over seeds")
        figure.tight_layout()
        name = _slug("ladder", dataset, student) + ".png"
        figure.savefig(out / name, dpi=120)
        plt.close(figure)
        plots.append((name, f"{dataset}: {student} against its teachers (one line per method)"))
    return plots


def _plot_curves(summary: Summary, spec: StudySpec, metrics: dict[str, list[dict]], out: Path) -> list[tuple[str, str]]:
    """For every pair: validation accuracy per epoch of each method (chosen hyper-parameters) and of the baseline."""
    plots = []
    pairs: dict[tuple[str, str], list[Group]] = {}
    for group in summary.chosen.values():
        pairs.setdefault((group.dataset, group.pair), []).append(group)
    covered = {(d, g.model) for (d, _), groups in pairs.items() for g in groups if g.teacher}
    for (dataset, pair), groups in pairs.items():
        if not any(g.teacher for g in groups):
            if (dataset, groups[0].model) in covered:
                continue  # the student's baseline is drawn on each of its pairs' plots
        else:
            groups = groups + [g for g in pairs.get((dataset, groups[0].model), []) if not g.teacher]
        plt = _pyplot()
        figure, axis = plt.subplots(figsize=(6.5, 4.2))
        for group in groups:
            curves = [{r["epoch"]: r["val_acc"] for r in metrics.get(row["config_hash"], []) if r.get("val_acc") is not None}
                      for row in group.rows]
            epochs = sorted(set.intersection(*(set(c) for c in curves))) if curves and all(curves) else []
            if epochs:
                axis.plot(epochs, [statistics.fmean(c[e] for c in curves) for e in epochs], marker="." if len(epochs) < 30 else None,
                          label=group.method, linestyle="--" if group.method == spec.baseline else "-")
        axis.set_xlabel("epoch")
        axis.set_ylabel("validation accuracy (%)")
        axis.set_title(f"{dataset}: {pair} [{spec.budget}]")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
        figure.tight_layout()
        name = _slug("curves", dataset, pair.replace("→", "-to-")) + ".png"
        figure.savefig(out / name, dpi=120)
        plt.close(figure)
        plots.append((name, f"{dataset}: {pair}, validation accuracy per epoch"))
    return plots


# ------------------------------------------------------------------ rendering
def render_markdown(blocks: list[tuple]) -> str:
    lines = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2"):
            lines += [("#" if kind == "h1" else "##") + " " + block[1], ""]
        elif kind == "p":
            lines += [block[1], ""]
        elif kind == "table":
            headers, rows = block[1], block[2]
            cell = lambda text: str(text).replace("|", "\\|")  # noqa: E731
            lines.append("| " + " | ".join(cell(h) for h in headers) + " |")
            lines.append("|" + "|".join("---" for _ in headers) + "|")
            lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
            lines.append("")
        elif kind == "img":
            lines += [f"![{block[2]}]({block[1]})", ""]
    return "\n".join(lines)


def render_html(blocks: list[tuple], title: str) -> str:
    body = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2"):
            body.append(f"<{kind}>{html.escape(block[1])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{html.escape(block[1])}</p>")
        elif kind == "table":
            head = "".join(f"<th>{html.escape(str(h))}</th>" for h in block[1])
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in block[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "img":
            body.append(f'<figure><img src="{html.escape(block[1])}" alt="{html.escape(block[2])}">'
                        f"<figcaption>{html.escape(block[2])}</figcaption></figure>")
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #bbb;padding:3px 8px}"
             "th{background:#eee}td{font-variant-numeric:tabular-nums}img{max-width:100%}")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
