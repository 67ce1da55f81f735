"""Studies that answer a question: hyper-parameters chosen with a tuning seed of their own, gates before the
main grid, Holm-adjusted comparisons and the gain-against-gap trend."""
from __future__ import annotations

import copy
import json
import math

import pytest

from gapkd.errors import ConfigError
from gapkd.study import StudyRunner, expand, resolve_study, write_report
from gapkd.study.report import gap_trends, holm, summarize
from gapkd.study.runner import StudyGateError

#: digits in about a second per run: one teacher, scratch, kd with two configurations
TUNED = {
    "name": "tuned",
    "base": {
        "data": {"name": "digits", "train_subset": 120, "test_subset": 60, "batch_size": 32,
                 "augment": {"crop_padding": 1, "flip": False}},
        "optim": {"lr": 0.05}, "schedule": {"name": "cosine"},
        "train": {"device": "cpu", "log_every": 1000, "amp": "off"},
    },
    "teacher_config": {"train": {"epochs": 1}},
    "student_config": {"train": {"epochs": 1}},
    "pairs": [{"teacher": "resnet14", "student": "resnet8"}],
    "methods": {"scratch": {"name": "ce"},
                "kd": {"points": [{"temperature": 2.0, "ce_weight": 0.5}, {"temperature": 4.0, "ce_weight": 0.1}]}},
    "seeds": [0, 1],
    "tuning": {"seed": 100},
}


def spec(**changes):
    return resolve_study({**copy.deepcopy(TUNED), **changes})


def test_points_are_configurations_combined_with_the_grid():
    runs = expand(spec(tuning=None, baseline="kd", methods={"kd": {"points": [{"temperature": 2.0}, {"temperature": 4.0}],
                                                    "grid": {"ce_weight": [0.1, 0.5]}}}))
    students = [r for r in runs if r.role == "student"]
    assert [(r.hparams["temperature"], r.hparams["ce_weight"]) for r in students[::2]] == [(2.0, 0.1), (2.0, 0.5), (4.0, 0.1), (4.0, 0.5)]
    assert len(students) == 8 and all(r.phase == "eval" for r in runs)


def test_tuning_plans_each_configuration_once_then_only_the_chosen_one():
    runs = expand(spec())
    tune = [r for r in runs if r.phase == "tune"]
    assert [(r.method, r.seed, r.choice[3]) for r in tune] == [("kd", 100, 0), ("kd", 100, 1)]
    evaluation = [r for r in runs if r.role == "student" and r.phase == "eval"]
    assert {r.method for r in evaluation} == {"scratch"}  # kd's evaluation runs wait for its choice
    chosen = expand(spec(), choose=lambda key, candidates: 1)
    kd = [r for r in chosen if r.method == "kd" and r.phase == "eval"]
    assert [(r.seed, r.hparams["temperature"]) for r in kd] == [(0, 4.0), (1, 4.0)]


def test_bad_tuning_settings_say_what_to_change():
    with pytest.raises(ConfigError, match="tuning.seed 0 is also an evaluation seed"):
        spec(tuning={"seed": 0})
    with pytest.raises(ConfigError, match="tuning.teachers names"):
        spec(tuning={"seed": 100, "teachers": ["resnet56"]})
    with pytest.raises(ConfigError, match="gates name method labels"):
        spec(gates={"method": "dkd", "min_gain": 1.0})


def test_runner_tunes_on_validation_then_runs_the_chosen_configuration(tmp_path, monkeypatch):
    runner = StudyRunner(spec(), tmp_path / "study", echo=False)
    result = runner.run()
    assert not result.failed
    tune = [r for r in runner.plan if r.phase == "tune"]
    vals = [runner.summary(r)["best_val_acc"] for r in tune]
    kd = [r for r in runner.plan if r.method == "kd" and r.phase == "eval"]
    best = max(range(2), key=lambda i: (vals[i], -i))
    assert len(kd) == 2 and {r.hparams["temperature"] for r in kd} == {[2.0, 4.0][best]}
    assert all(runner.summary(r) is not None for r in runner.plan)  # the whole grid, tuning and evaluation, finished
    # the choice never reads test accuracy: make the other configuration's test accuracy far better, same choice
    other = tune[1 - best]
    path = runner.run_dir(other) / "summary.json"
    summary = json.loads(path.read_text())
    path.write_text(json.dumps({**summary, "test_acc_at_best_val": 100.0, "last_test_acc": 100.0}))
    assert runner.choose(other.choice[:3], tune) == best
    report = write_report(spec(), tmp_path / "study")
    text = report["md"].read_text()
    assert "Tuning (seed 100" in text and "p (Holm)" in text
    assert "## Results" in text
    assert text.count("✓") >= 1


def test_teacher_gate_names_the_weak_rung_and_keeps_finished_runs(tmp_path):
    study = spec(pairs=[{"teacher": "resnet14", "student": "resnet8"}, {"teacher": "resnet20", "student": "resnet8"}],
                 methods={"kd": {}}, baseline="kd", tuning=None, gates={"teacher_gap": 90.0})
    runner = StudyRunner(study, tmp_path / "study", echo=False)
    with pytest.raises(StudyGateError, match=r"teacher gate: on digits, teacher resnet20 .* less than 90 points above resnet14"):
        runner.run()
    teachers = [r for r in runner.plan if r.role == "teacher"]
    assert all(runner.summary(r) is not None for r in teachers)  # both teachers trained and kept
    assert all(runner.summary(r) is None for r in runner.plan if r.role == "student")  # no student trained


def test_student_gate_stops_before_the_other_methods(tmp_path):
    study = spec(methods={"scratch": {"name": "ce"}, "kd": {}, "dkd": {}}, tuning=None,
                 gates={"method": "kd", "over": "scratch", "min_gain": 90.0})
    runner = StudyRunner(study, tmp_path / "study", echo=False)
    with pytest.raises(StudyGateError, match="student gate: on digits, kd .* Lengthen the student budget"):
        runner.run()
    done = {r.method for r in runner.plan if r.role == "student" and runner.summary(r) is not None}
    assert done == {"scratch", "kd"}  # the gate's own runs first; dkd never trained


def test_holm_matches_its_definition():
    p = [0.01, 0.04, 0.03, 0.2]
    # sorted: 0.01*4 = 0.04, 0.03*3 = 0.09, 0.04*2 = 0.08 -> monotone 0.09, 0.2*1 = 0.2
    assert holm(p) == pytest.approx([0.04, 0.09, 0.09, 0.2])
    assert holm([0.5, 0.9]) == [1.0, 1.0] and holm([]) == []


def _row(pair, teacher, method, seed, test, val=50.0, role="student"):
    return {"role": role, "dataset": "d", "pair": pair, "model": "s" if role == "student" else teacher, "teacher": teacher,
            "method": method, "hparams": {}, "seed": seed, "config_hash": f"{pair}{method}{seed}{role}",
            "best_val_acc": val, "test_acc_at_best_val": test, "last_test_acc": test}


def test_gap_trend_is_the_slope_of_the_gains_over_the_baseline():
    rows = []
    for teacher, teacher_val, gain in (("t1", 60.0, 0.0), ("t2", 70.0, 1.0), ("t3", 80.0, 2.0)):
        pair = f"{teacher}→s"
        rows.append(_row("", teacher, "teacher", 0, teacher_val, val=teacher_val, role="teacher"))
        for seed, noise in enumerate((-0.1, 0.1, 0.0)):
            rows.append(_row(pair, teacher, "kd", seed, 50.0 + noise))
            rows.append(_row(pair, teacher, "new", seed, 50.0 + gain + noise))
    summary = summarize(rows, baseline="kd")
    [trend] = gap_trends(summary, "kd")
    assert trend["method"] == "new" and trend["slope"] == pytest.approx(0.1, abs=1e-9) and trend["trend"] == "grows"
    assert [round(delta, 6) for _, _, delta in trend["gains"]] == [0.0, 1.0, 2.0]
    comparison = summary.comparisons[("d", "t3→s", "new")]
    assert comparison.p_holm >= comparison.p and not math.isnan(comparison.p_holm)


def test_builtin_capacity_ladder_plan_and_pinned_teacher_keys():
    """The CPU capacity ladder's plan; its teachers' keys are pinned because trained teachers are found by them
    (a change to the base config or to run identity would silently retrain 3 teachers: change them on purpose)."""
    from collections import Counter

    study = resolve_study("capacity-ladder-cpu")
    overrides = {"data": {"path": "/anywhere/cifar10-jpg-q75.tar.gz"}}
    runs = expand(study, overrides)
    assert {r.model: r.key for r in runs if r.role == "teacher"} == {
        "resnet20": "4488d0815ff9", "resnet56": "1d70b2e196f4", "wrn_40_2": "7f78efee70a6"}
    assert Counter(r.method for r in runs if r.phase == "tune") == {
        **{m: 3 for m in ("kd", "dkd", "dist", "ctkd", "simkd", "dfpt-kd", "dfpt-kd+", "kd-ls", "nkd", "wttm", "sdd")}, "mlkd": 2}
    assert {r.teacher for r in runs if r.phase == "tune"} == {"resnet56"}
    chosen = expand(study, overrides, choose=lambda key, candidates: 0)
    evaluation = Counter(r.method for r in chosen if r.role == "student" and r.phase == "eval")
    assert evaluation == {"scratch": 5, "takd": 5, "dgkd": 5, **{m: 15 for m in (
        "kd", "dkd", "dist", "ctkd", "simkd", "aid", "dfpt-kd", "dfpt-kd+", "kd-ls", "nkd", "wttm", "sdd", "mlkd")}}
    assert {r.seed for r in chosen if r.phase == "eval" and r.role == "student"} == {0, 1, 2, 3, 4}
    # where the data lies is not part of a run's identity
    moved = expand(study, {"data": {"path": "/elsewhere/cifar10-jpg-q75.tar.gz"}})
    assert [r.key for r in moved] == [r.key for r in runs]
