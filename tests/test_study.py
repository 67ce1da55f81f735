"""Studies: grid expansion, sharding, the runner (teachers once, skip, resume, two workers), the
SQLite store, and the report (mean ± std, Welch t-test, selection on validation, files)."""
from __future__ import annotations

import copy
import json
import math
import sqlite3
import subprocess
import sys
import threading
import types
from pathlib import Path

import pytest
import yaml

import gapkd.api
from gapkd.cli import main
from gapkd.errors import ConfigError, NonFiniteLossError
from gapkd.registry import Registry
from gapkd.study import StudyRunner, builtin_studies, expand, resolve_study, run_study, study_status, summarize, write_report
from gapkd.study.report import welch
from gapkd.study.store import ResultStore

SRC = Path(__file__).resolve().parents[1] / "src"

#: ce + kd on digits in about a second per run: 1 teacher, 2 scratch students, 2 x 2 kd students
TINY = {
    "name": "tiny",
    "base": {
        "data": {"name": "digits", "train_subset": 120, "test_subset": 60, "batch_size": 32,
                 "augment": {"crop_padding": 1, "flip": False}},
        "optim": {"lr": 0.05},
        "schedule": {"name": "cosine"},
        "train": {"device": "cpu", "log_every": 1000},
    },
    "teacher_config": {"train": {"epochs": 1}},
    "student_config": {"train": {"epochs": 1}},
    "pairs": [{"teacher": "resnet14", "student": "resnet8"}],
    "methods": {"scratch": {"name": "ce"}, "kd": {"params": {"ce_weight": 0.5}, "grid": {"temperature": [2.0, 4.0]}}},
    "seeds": [0, 1],
    "budgets": {"smoke": {"note": "digits, 1 epoch"}, "one-seed": {"seeds": [0], "methods": {"kd": {"grid": {"temperature": [4.0]}}}}},
}


def tiny(budget: str = "smoke", **changes):
    return resolve_study({**copy.deepcopy(TINY), **changes}, budget)


class CountingRun:
    """Wraps gapkd.api.run: which run directories were trained, per role (thread-safe)."""

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        self._lock = threading.Lock()
        real = gapkd.api.run

        def counted(cfg, **kwargs):
            with self._lock:
                self.calls.append(str(Path(cfg.out_dir).name + "/" + cfg.name))
            return real(cfg, **kwargs)

        monkeypatch.setattr(gapkd.api, "run", counted)

    def role(self, subdir: str) -> list[str]:
        return [c for c in self.calls if c.startswith(subdir + "/")]


def db_rows(study_dir: Path) -> list[dict]:
    with sqlite3.connect(study_dir / "results.sqlite") as db:
        db.row_factory = sqlite3.Row
        return [dict(row) for row in db.execute("SELECT * FROM runs")]


# ------------------------------------------------------------------ expansion and sharding
def test_grid_expansion_counts_and_stable_order():
    spec = resolve_study({
        "name": "grid", "base": {"data": {"name": "digits"}},
        "datasets": ["digits", {"name": "mnist"}],
        "pairs": [{"teacher": "resnet14", "student": "resnet8"}, {"teacher": "resnet20", "student": "resnet8"},
                  {"teacher": "resnet20", "student": "resnet14"}, {"student": "resnet8x4"}],
        "methods": {"scratch": {"name": "ce"}, "kd": {"grid": {"temperature": [2, 4], "ce_weight": [0.1, 0.5]}}},
        "seeds": [0, 1, 2],
    })
    plan = expand(spec)
    # per dataset: teachers resnet14, resnet20 (seed 0); scratch of resnet8, resnet14, resnet8x4 x 3 seeds (shared by
    # the pairs); kd on 3 pairs x 4 grid points x 3 seeds
    per_dataset = {"teacher": 2, "scratch": 3 * 3, "kd": 3 * 4 * 3}
    assert len(plan) == 2 * sum(per_dataset.values()) == 94
    for label, count in per_dataset.items():
        assert sum(1 for r in plan if r.method == label) == 2 * count
    assert [r.role for r in plan] == ["teacher"] * 4 + ["student"] * 90
    assert len({r.key for r in plan}) == len(plan) and [r.index for r in plan] == list(range(94))
    teachers = {r.key for r in plan if r.role == "teacher"}
    assert all(r.teacher_key in teachers for r in plan if r.method == "kd")
    assert all(r.teacher_key is None and r.teacher is None for r in plan if r.method == "scratch")
    assert [r.key for r in expand(spec)] == [r.key for r in plan]  # stable

    matched = resolve_study({**spec.model_dump(exclude={"budget", "budget_note"}), "teacher_seed": "match"})
    assert sum(1 for r in expand(matched) if r.role == "teacher") == 2 * 2 * 3  # one teacher per student seed


def test_budgets_overlay_the_study_and_keys_ignore_locations():
    assert len(expand(tiny("smoke"))) == 1 + 2 + 4
    one = expand(tiny("one-seed"))
    assert [(r.role, r.method, r.seed) for r in one] == [("teacher", "teacher", 0), ("student", "scratch", 0), ("student", "kd", 0)]
    assert one[2].hparams == {"temperature": 4.0, "ce_weight": 0.5, "kd_weight": 0.9, "logit_standardize": False}
    moved = expand(tiny("one-seed"), {"data": {"root": "/elsewhere"}, "train": {"threads": 3}})
    assert [r.key for r in moved] == [r.key for r in one]  # where data lives and thread counts do not change a run
    assert expand(tiny("one-seed"), {"optim": {"lr": 0.1}})[0].key != one[0].key
    with pytest.raises(ConfigError, match="choose one with --budget"):
        resolve_study(copy.deepcopy(TINY))
    with pytest.raises(ConfigError, match="Did you mean 'smoke'"):
        resolve_study(copy.deepcopy(TINY), "smok")


def test_sharding_partitions_the_grid_exactly(tmp_path):
    spec = tiny("smoke", seeds=[0, 1, 2], pairs=[{"teacher": "resnet14", "student": "resnet8"}, {"teacher": "resnet20", "student": "resnet8"}])
    runner = StudyRunner(spec, tmp_path, echo=False)
    everything = [r.key for r in runner.plan]
    assert len(everything) == 2 + 3 + 2 * 2 * 3
    for n in range(1, 7):
        shards = [[r.key for r in runner.selection(k, n)] for k in range(1, n + 1)]
        assert sorted(key for keys in shards for key in keys) == sorted(everything)  # union = all, no run twice
        assert all(not set(a) & set(b) for i, a in enumerate(shards) for b in shards[i + 1:])
        phases = [r.key for k in range(1, n + 1) for r in runner.selection(k, n, "teachers")]
        assert sorted(phases) == sorted(r.key for r in runner.plan if r.role == "teacher")
    with pytest.raises(ConfigError, match="out of range"):
        runner.selection(3, 2)


def test_unregistered_models_and_methods_fail_at_expansion_naming_all_of_them():
    spec = tiny("smoke", pairs=[{"teacher": "resnet999", "student": "resnet8"}],
                methods={"scratch": {"name": "ce"}, "new": {"name": "no-such-method"}, "chain": {"name": "kd", "pipeline": "no-pipe"}})
    with pytest.raises(ConfigError) as error:
        expand(spec)
    message = str(error.value)
    assert "model 'resnet999'" in message and "method 'no-such-method'" in message and "pipeline 'no-pipe'" in message


@pytest.mark.parametrize("name", ["capacity-cifar10", "gap-ladder"])
def test_builtin_studies_resolve_at_every_budget_and_state_it(name):
    assert name in builtin_studies()
    for budget in ("full", "short", "cpu", "smoke"):
        spec = resolve_study(name, budget)
        assert spec.budget == budget and spec.budget_note
    smoke = resolve_study(name, "smoke")
    assert smoke.base["data"]["name"] == "digits" and smoke.student_config["train"]["epochs"] == 1
    full = resolve_study(name, "full")
    assert full.base["optim"] == {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}
    assert full.base["train"]["grad_clip"] == 1.0 and full.base["data"]["val_fraction"] == 0.1
    assert (full.teacher_config["train"]["epochs"], full.student_config["train"]["epochs"]) == (200, 100)
    if name == "capacity-cifar10":
        assert full.methods["logit-kd"].grid == {"alpha": [0.3, 0.5, 0.7], "temperature": [2, 3, 4]}
        assert len(full.seeds) == 5


# ------------------------------------------------------------------ end to end
@pytest.fixture
def finished_smoke(tmp_path, monkeypatch):
    counter = CountingRun(monkeypatch)
    spec = tiny("smoke")
    result = run_study(spec, tmp_path / "study", echo=False, log=lambda line: None)
    return spec, tmp_path / "study", counter, result


def test_smoke_study_trains_teachers_once_and_records_every_run(finished_smoke):
    spec, study_dir, counter, result = finished_smoke
    assert len(result.trained) == 7 and not result.failed and not result.skipped
    assert len(counter.role("teachers")) == 1 and len(counter.role("students")) == 6
    rows = db_rows(study_dir)
    assert len(rows) == 7 and {r["status"] for r in rows} == {"done"}
    assert len({r["config_hash"] for r in rows}) == 7
    teacher = next(r for r in rows if r["role"] == "teacher")
    for row in rows:
        summary = json.loads((Path(row["run_dir"]) / "summary.json").read_text())
        assert row["test_acc_at_best_val"] == summary["test_acc_at_best_val"] and row["best_val_acc"] == summary["best_val_acc"]
        assert row["last_test_acc"] == summary["last_test_acc"] and json.loads(row["summary"]) == summary
        assert row["code_version"].startswith("0.") and row["budget"] == "smoke" and row["params"] > 0
        config = json.loads(row["config"])
        if row["method"] == "kd":  # students distil from the one teacher run's best checkpoint
            assert config["teacher"]["checkpoint"] == str(Path(teacher["run_dir"]) / "checkpoints" / "best.pt")
            assert row["teacher_hash"] == teacher["config_hash"] and summary["teacher_test_acc"] == teacher["test_acc_at_best_val"]
    assert sorted(json.loads(r["hparams"])["temperature"] for r in rows if r["method"] == "kd") == [2.0, 2.0, 4.0, 4.0]

    counter.calls.clear()
    again = run_study(spec, study_dir, echo=False, log=lambda line: None)
    assert counter.calls == [] and len(again.skipped) == 7 and not again.trained  # finished runs are skipped
    assert len(db_rows(study_dir)) == 7
    status = study_status(spec, study_dir)
    assert status["done"] == status["total"] == 7 and status["unfinished"] == []


def test_report_tables_match_a_hand_computation_from_the_database(finished_smoke):
    spec, study_dir, _, _ = finished_smoke
    paths = write_report(spec, study_dir)
    assert paths["md"].is_file() and paths["html"].is_file()
    assert paths["plots"] and all(p.suffix == ".png" and p.stat().st_size > 1000 for p in paths["plots"])
    markdown, page = paths["md"].read_text(), paths["html"].read_text()
    assert "budget smoke" in markdown and "Budget: smoke. digits, 1 epoch" in markdown and "budget smoke" in page

    rows = [r for r in db_rows(study_dir) if r["role"] == "student"]
    scratch = [r["test_acc_at_best_val"] for r in sorted(rows, key=lambda r: r["seed"]) if r["method"] == "scratch"]
    mean = sum(scratch) / len(scratch)
    std = math.sqrt(sum((x - mean) ** 2 for x in scratch) / (len(scratch) - 1))
    line = next(l for l in markdown.splitlines() if l.startswith("| digits | resnet8 | scratch |"))
    assert f"{mean:.2f} ± {std:.2f}" in line

    def by_temperature(temperature, metric):
        return [r[metric] for r in sorted(rows, key=lambda r: r["seed"])
                if r["method"] == "kd" and json.loads(r["hparams"])["temperature"] == temperature]

    means = {t: sum(by_temperature(t, "best_val_acc")) / 2 for t in (2.0, 4.0)}
    chosen = 2.0 if means[2.0] >= means[4.0] else 4.0  # validation decides; the earlier grid point wins ties
    test = by_temperature(chosen, "test_acc_at_best_val")
    kd_line = next(l for l in markdown.splitlines() if l.startswith("| digits | resnet14→resnet8 | kd |"))
    test_mean = sum(test) / 2
    assert f"temperature={chosen}" in kd_line and f"{test_mean:.2f} ± {abs(test[0] - test[1]) / math.sqrt(2):.2f}" in kd_line
    assert f"{test_mean - mean:+.2f}" in kd_line
    assert "<table>" in page and "resnet14→resnet8" in page and 'src="curves_' in page
    other = write_report(spec, study_dir, overrides={"optim": {"lr": 0.1}}, out_dir=study_dir / "other")["md"].read_text()
    assert "Runs finished: 0 of 7" in other and "7 finished run(s) of tiny that are not in this grid" in other
    assert "Overrides applied to every run" in other and "optim.lr=0.1." in other  # a report says what it changed
    assert "Overrides applied" not in markdown


# ------------------------------------------------------------------ statistics and selection
def test_welch_t_test_equals_scipy_and_the_formula():
    from scipy.stats import ttest_ind

    a, b = [94.8, 94.9, 94.6, 95.1], [94.7, 94.95, 95.2]
    t, p = welch(a, b)
    reference = ttest_ind(a, b, equal_var=False)
    assert t == pytest.approx(reference.statistic, rel=1e-12) and p == pytest.approx(reference.pvalue, rel=1e-12)
    mean_a, mean_b = sum(a) / len(a), sum(b) / len(b)
    var_a = sum((x - mean_a) ** 2 for x in a) / (len(a) - 1)
    var_b = sum((x - mean_b) ** 2 for x in b) / (len(b) - 1)
    assert t == pytest.approx((mean_a - mean_b) / math.sqrt(var_a / len(a) + var_b / len(b)), rel=1e-12)
    assert welch([1.0], [2.0, 3.0]) == (None, None)


def _row(method, seed, val, test, hparams=None, teacher="resnet14"):
    return {"role": "student", "dataset": "digits", "model": "resnet8", "teacher": teacher if method != "scratch" else None,
            "pair": f"{teacher}→resnet8" if method != "scratch" else "resnet8", "method": method, "seed": seed,
            "hparams": hparams or {}, "config_hash": f"{method}{json.dumps(hparams)}{seed}", "best_val_acc": val,
            "test_acc_at_best_val": test, "last_test_acc": test - 1}


def test_hyper_parameters_are_chosen_on_validation_never_on_test():
    rows = [
        _row("scratch", 0, 80.0, 79.0), _row("scratch", 1, 81.0, 80.5),
        # T=2: better validation, worse test; T=4: worse validation, much better test
        _row("kd", 0, 90.0, 80.0, {"temperature": 2}), _row("kd", 1, 91.0, 81.0, {"temperature": 2}),
        _row("kd", 0, 85.0, 95.0, {"temperature": 4}), _row("kd", 1, 86.0, 96.0, {"temperature": 4}),
    ]
    summary = summarize(rows, baseline="scratch")
    chosen = summary.chosen[("digits", "resnet14→resnet8", "kd")]
    assert chosen.hparams == {"temperature": 2}
    comparison = summary.comparisons[("digits", "resnet14→resnet8", "kd")]
    assert comparison.delta == pytest.approx(80.5 - 79.75)
    t, p = welch([80.0, 81.0], [79.0, 80.5])
    assert (comparison.t, comparison.p) == (t, p)
    flipped = [dict(r, best_val_acc=200 - r["best_val_acc"]) if r["method"] == "kd" else r for r in rows]
    assert summarize(flipped, baseline="scratch").chosen[("digits", "resnet14→resnet8", "kd")].hparams == {"temperature": 4}


# ------------------------------------------------------------------ workers, resume, store
@pytest.mark.parametrize("shards", [["1/2", "2/2"], ["1/1", "1/1"]], ids=["different-shards", "same-shard"])
def test_two_workers_on_one_database_train_each_run_once(tmp_path, monkeypatch, shards):
    counter = CountingRun(monkeypatch)
    spec = tiny("smoke", methods={"scratch": {"name": "ce"}, "kd": {}})  # teacher + 2 scratch + 2 kd
    errors = []

    def worker(text):
        try:
            k, n = (int(x) for x in text.split("/"))
            run_study(spec, tmp_path, shard_index=(k, n), echo=False, log=lambda line: None)
        except BaseException as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(text,)) for text in shards]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    rows = db_rows(tmp_path)
    assert len(rows) == 5 and len({r["config_hash"] for r in rows}) == 5 and {r["status"] for r in rows} == {"done"}
    assert sorted(counter.calls) == sorted(set(counter.calls)) and len(counter.calls) == 5  # every run trained once
    assert len(counter.role("teachers")) == 1


def test_store_rows_stay_unique_under_two_writer_processes(tmp_path):
    script = (  # store.py needs only the standard library: load it alone, without torch, so both start at once
        "import importlib.util, sys\n"
        "spec = importlib.util.spec_from_file_location('store', sys.argv[2]); store_module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(store_module)\n"
        "with store_module.ResultStore(sys.argv[1]) as store:\n"
        "    for i in range(40):\n"
        "        store.mark_running({'study': 's', 'config_hash': f'k{i}', 'run_name': f'r{i}', 'role': 'student', 'seed': i})\n"
        "        store.mark_done({'study': 's', 'config_hash': f'k{i}', 'run_name': f'r{i}', 'role': 'student', 'seed': i},\n"
        "                        {'best_val_acc': float(i), 'test_acc_at_best_val': float(i)})\n"
    )
    db = tmp_path / "results.sqlite"
    module = SRC / "gapkd" / "study" / "store.py"
    workers = [subprocess.Popen([sys.executable, "-c", script, str(db), str(module)], stderr=subprocess.PIPE, text=True) for _ in range(2)]
    assert [w.wait(timeout=120) for w in workers] == [0, 0], [w.stderr.read() for w in workers]
    with ResultStore(db) as store:
        rows = store.rows("s")
    assert len(rows) == 40 and {r["status"] for r in rows} == {"done"}
    assert sorted(r["best_val_acc"] for r in rows) == [float(i) for i in range(40)]


def test_an_interrupted_study_resumes_where_it_stopped(tmp_path, monkeypatch):
    spec = tiny("one-seed")
    real, calls = gapkd.api.run, []

    def interrupt_second(cfg, **kwargs):
        calls.append(cfg.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(cfg, **kwargs)

    monkeypatch.setattr(gapkd.api, "run", interrupt_second)
    with pytest.raises(KeyboardInterrupt):
        run_study(spec, tmp_path, echo=False, log=lambda line: None)
    assert sorted(r["status"] for r in db_rows(tmp_path)) == ["done", "interrupted"]
    assert study_status(spec, tmp_path)["counts"]["student"] == {"interrupted": 1, "pending": 1}
    monkeypatch.setattr(gapkd.api, "run", real)
    counter = CountingRun(monkeypatch)
    result = run_study(spec, tmp_path, echo=False, log=lambda line: None)
    assert len(result.trained) == 2 and len(result.skipped) == 1 and len(counter.role("teachers")) == 0
    assert {r["status"] for r in db_rows(tmp_path)} == {"done"}


def test_a_failing_teacher_is_recorded_once_and_the_grid_goes_on(tmp_path, monkeypatch):
    real, teacher_calls = gapkd.api.run, []

    def teacher_explodes(cfg, **kwargs):
        if cfg.method.name == "ce" and cfg.student.name == "resnet14":
            teacher_calls.append(cfg.name)
            raise NonFiniteLossError("loss term 'ce' became NaN/Inf at step 3")
        return real(cfg, **kwargs)

    monkeypatch.setattr(gapkd.api, "run", teacher_explodes)
    result = run_study(tiny("smoke", methods={"scratch": {"name": "ce"}, "kd": {}}), tmp_path, echo=False, log=lambda line: None)
    assert len(teacher_calls) == 1 and len(result.trained) == 2  # the two scratch students still train
    rows = {(r["role"], r["method"], r["seed"]): r for r in db_rows(tmp_path)}
    assert rows[("teacher", "teacher", 0)]["status"] == "failed" and "NaN" in rows[("teacher", "teacher", 0)]["error"]
    assert all(rows[("student", "kd", seed)]["status"] == "failed" for seed in (0, 1))
    assert "did not finish" in rows[("student", "kd", 0)]["error"] and len(result.failed) == 3


def test_students_phase_refuses_to_start_without_its_teachers(tmp_path):
    with pytest.raises(ConfigError, match="--phase teachers"):
        run_study(tiny("one-seed"), tmp_path, phase="students", echo=False, log=lambda line: None)


def test_pipeline_methods_run_through_the_pipeline_registry(tmp_path, monkeypatch):
    """The extension point for TAKD/AID: a method entry naming a pipeline of gapkd.pipelines.PIPELINES."""
    seen = {}

    def two_stage(config, overrides, *, echo=True):
        tree = dict(overrides)
        seen["options"] = tree.pop("two-stage")
        final = gapkd.api.build_config({**tree, "out_dir": str(Path(tree["out_dir"]) / tree["name"]), "name": "student"})
        return {"pipeline": "two-stage", "student": gapkd.api.run(final, echo=echo)}

    registry = Registry("pipeline")
    registry.add("two-stage", two_stage)
    monkeypatch.setitem(sys.modules, "gapkd.pipelines", types.SimpleNamespace(PIPELINES=registry))
    spec = tiny("smoke", seeds=[0], methods={"scratch": {"name": "ce"}, "chain": {"name": "kd", "pipeline": "two-stage",
                                                                            "pipeline_options": {"assistant": "resnet8"}}})
    result = run_study(spec, tmp_path, echo=False, log=lambda line: None)
    assert len(result.trained) == 3 and not result.failed and seen["options"] == {"assistant": "resnet8"}
    row = next(r for r in db_rows(tmp_path) if r["method"] == "chain")
    assert row["pipeline"] == "two-stage" and row["status"] == "done" and row["test_acc_at_best_val"] is not None
    assert json.loads(row["summary"])["metrics_file"] == "student/metrics.jsonl"


# ------------------------------------------------------------------ command line
def test_study_commands_from_the_command_line(tmp_path, capsys):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    with pytest.raises(SystemExit):
        main(["study", "run", "--help"])
    assert "example" in capsys.readouterr().out
    common = [str(path), "--budget", "one-seed", "--dir", str(tmp_path / "s")]
    assert main(["study", "run", *common, "--shard", "2/2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "1 of 3 runs in shard 2/2" in out and "todo" in out
    assert main(["study", "run", *common, "--quiet", "train.log_every=7"]) == 0  # overrides may follow options
    assert "3 trained" in capsys.readouterr().out
    assert "log_every: 7" in next((tmp_path / "s" / "runs" / "teachers").iterdir()).joinpath("config.yaml").read_text()
    assert main(["study", "status", *common]) == 0
    assert "3/3 runs done" in capsys.readouterr().out
    assert main(["study", "report", *common]) == 0
    assert (tmp_path / "s" / "report" / "report.html").is_file()
    assert main(["study", "run", *common, "--shard", "3/2"]) == 2
    assert "out of range" in capsys.readouterr().err
