"""The speed benchmarks run end to end on tiny inputs and report what RESULTS.md reads from them
(their numbers are measured in benchmarks/, never asserted here)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, cwd: Path) -> None:
    subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=cwd, check=True,
                   capture_output=True, text=True, timeout=600)


def test_throughput_reports_the_three_ways(tmp_path):
    out = tmp_path / "throughput.json"
    _run("throughput.py", "--pairs", "resnet8:resnet8", "--methods", "kd", "dkd", "--images", "96", "--batch", "32",
         "--steps", "1", "--rounds", "1", "--workers", "0", "--json", str(out), "train.amp=off", cwd=REPO / "benchmarks")
    rows = json.loads(out.read_text())
    assert [r["method"] for r in rows] == ["kd", "dkd"]
    kd, dkd = rows
    for row in rows:
        assert row["gapkd_img_s"] > 0 and row["compute_bound_img_s"] > 0
        assert abs(row["a_over_c"] - row["gapkd_img_s"] / row["compute_bound_img_s"]) < 1e-9
    assert kd["conventional_img_s"] > 0 and abs(kd["a_over_b"] - kd["gapkd_img_s"] / kd["conventional_img_s"]) < 1e-9
    assert dkd["conventional_img_s"] is None  # (b) is KD's only
    assert kd["step_time_vs_kd"] == 1.0


def test_recipe_time_runs_a_recipe_with_stated_stand_ins(tmp_path):
    out = tmp_path / "recipe.json"
    recipe = REPO / "configs" / "cifar10" / "resnet56-resnet20" / "kd.yaml"
    _run("recipe_time.py", str(recipe), "--epochs", "3", "--json", str(out), "data.name=digits", "data.batch_size=64",
         "student.name=resnet8", "teacher.name=resnet8", "train.amp=off", cwd=tmp_path)
    result = json.loads(out.read_text())
    assert result["epochs_run"] == 3 and result["recipe_epochs"] == 240
    assert result["batches_per_epoch"] > 0 and result["steady_ms_per_batch"] > 0
    assert any(s.startswith("teacher: random-weight resnet8") for s in result["stand_ins"])  # no checkpoint here
    # three epochs ran, 237 are projected at the measured whole-epoch rate
    assert abs(result["projected_recipe_wall_seconds"] - (result["wall_seconds"] + 237 * result["steady_epoch_wall_seconds"])) < 1e-6
    assert not list(tmp_path.glob("runs"))  # the timed run wrote into a temporary folder


def test_teacher_cache_benchmark_times_runs_with_and_without_the_cache(tmp_path):
    out = tmp_path / "e2e.json"
    _run("teacher_cache.py", "e2e", "--pair", "resnet8:resnet8", "--images", "96", "--batch", "32", "--epochs", "1",
         "--views", "2", "--study-methods", "kd", "dkd", "--study-seeds", "1", "--data", "random", "--json", str(out), "train.amp=off",
         cwd=REPO / "benchmarks")
    result = json.loads(out.read_text())
    assert result["study_cache"] == {"built": 1, "hit": 1} and result["study_runs"] == 2
    assert abs(result["single_speedup"] - result["single_no_cache_s"] / result["single_cached_s"]) < 1e-9
    assert result["cache_bytes"] > 0


def test_study_cost_multiplies_each_kind_of_run_out(tmp_path):
    study = tmp_path / "tiny.yaml"
    study.write_text(
        "name: tiny-cost\n"
        "base: {data: {name: digits, train_subset: 200, test_subset: 60, batch_size: 32, augment: {crop_padding: 1, flip: false}},"
        " train: {device: cpu, amp: 'off'}}\n"
        "teacher_config: {train: {epochs: 2}}\nstudent_config: {train: {epochs: 1}}\n"
        "pairs: [{teacher: resnet14, student: resnet8}]\n"
        "methods: {scratch: {name: ce}, kd: {points: [{temperature: 2.0}, {temperature: 4.0}]},"
        " takd: {name: kd, pipeline: takd, pipeline_options: {assistant: resnet8}}}\n"
        "seeds: [0, 1]\ntuning: {seed: 9}\n")
    out = tmp_path / "cost.json"
    _run("study_cost.py", str(study), "--steps", "1", "--rounds", "1", "--json", str(out), cwd=REPO / "benchmarks")
    report = json.loads(out.read_text())
    kinds = {row["kind"].rsplit(" #", 1)[0]: row for row in report["kinds"]}
    # 1 teacher; scratch 2; kd: 2 tuning runs (one per point) + 2 evaluation runs at the first point; takd 2 (two stages each)
    assert report["runs"] == 1 + 2 + 4 + 2
    assert kinds["ce resnet14"]["runs"] == 1 and kinds["ce resnet8"]["runs"] == 2
    assert kinds["kd resnet14->resnet8"]["runs"] + kinds["kd resnet8->resnet8"]["runs"] >= 2
    assert sum(row["runs"] for row in report["kinds"]) == 1 + 2 + 4 + 2 * 2
    for row in report["kinds"]:
        images = row["images"]
        assert images["train"] > images["val"] > 0 and images["test"] == 60 and row["batch"] == 32
        steps = -(-images["train"] // 32)
        expected = row["epochs"] * (steps * row["step_s"] + (images["val"] + images["test"]) / 32 * row["eval_batch_s"])
        assert abs(row["run_s"] - expected) < 1e-9 and abs(row["all_s"] - row["runs"] * row["run_s"]) < 1e-9
    assert abs(report["total_hours"] * 3600 - sum(row["all_s"] for row in report["kinds"])) < 1e-6
