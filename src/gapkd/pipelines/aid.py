"""The AID pipeline: reference student -> adapted teacher -> distillation.

This is OUR READING of the published abstract of "A Good Teacher Adapts Their Knowledge for
Distillation" (Qian, Le, Harandi, ICCV 2025), not the paper's method: its formulas and code are
not public. See docs/aid.md.

A pipeline is described by an ordinary distillation config (student, teacher with its
checkpoint T0, method kd | dkd | dist | ..., optim, schedule, train) plus an ``aid:`` section:
the pipeline's own keys (:class:`AIDOptions`) and the ``aid-adapt`` method's hyper-parameters
(temperature, beta, gamma, ce_weight, temperature_scaling, class_means, running_decay,
reference_checkpoint, reference_model).

Stages, each one ordinary run (``gapkd.api.run``) in its own folder of the pipeline folder, so
a finished stage is skipped and an interrupted one resumes:
  1-reference  the reference student S_ref: the student's architecture trained with CE for
               ``ref_epochs`` (skipped when ``aid.reference_checkpoint`` is given);
  2-adapt      the teacher fine-tuned with method aid-adapt from T0 for ``adapt_epochs`` at
               ``adapt_lr``; its best-validation checkpoint is the adapted teacher, and
               adapted_teacher_report.json / .md compare it with T0; the pipeline prints how
               L_inner and the teacher's validation accuracy moved, and stops (or warns, with
               ``on_teacher_drop=warn``) when that accuracy fell by more than ``max_teacher_drop``;
  3-distill    the configured method, distilling the student from the adapted teacher.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..api import run
from ..build import build_model, load_model
from ..config import RunConfig, _format_errors, build_config, lift_run_section, merge, parse_overrides, read_yaml, validate_hparams
from ..core.errors import ConfigError, GapkdError, suggest
from ..core.io import atomic_write_text
from ..core.rundir import RunDir
from ..data import ImageData, build_data, load_dataset
from ..engine.runtime import Runtime
from ..methods import METHODS
from .base import start

NOTE = ("AID here is our reading of the published abstract of Qian, Le & Harandi, 'A Good Teacher Adapts Their Knowledge "
        "for Distillation' (ICCV 2025); the paper's formulas and code are not public.")

STAGES = ("1-reference", "2-adapt", "3-distill")
REPORT = "adapted_teacher_report"
#: options that only judge a finished adaptation: changing them keeps the pipeline's folder and its finished stages
CHECK_OPTIONS = {"max_teacher_drop", "on_teacher_drop"}


class AdaptationError(GapkdError):
    """The adapted teacher lost more validation accuracy than ``aid.max_teacher_drop`` allows."""


class AIDOptions(BaseModel):
    """The pipeline's own keys under ``aid:`` (all other keys there go to the aid-adapt method)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    adapt_epochs: Optional[int] = Field(None, ge=1, description="epochs of teacher adaptation; default 10% of train.epochs, at least 1")
    adapt_lr: Optional[float] = Field(None, gt=0, description="learning rate of teacher adaptation; default optim.lr / 10")
    adapt_schedule: Literal["cosine", "constant"] = Field("cosine", description="lr schedule of teacher adaptation (no warm-up)")
    ref_epochs: Optional[int] = Field(None, ge=1, description="epochs of the CE reference student; default train.epochs")
    max_teacher_drop: float = Field(1.0, ge=0, description="tolerated fall of the teacher's validation accuracy (points) "
                                    "from T0 to the adapted teacher")
    on_teacher_drop: Literal["error", "warn"] = Field("error", description="when the fall exceeds max_teacher_drop: stop "
                                                      "before distilling (error) or go on with a warning (warn)")


def parse_aid_config(config: str | os.PathLike | None = None, overrides: list[str] | dict | None = None) -> tuple[RunConfig, AIDOptions, dict]:
    """defaults <- YAML <- overrides, split into the distillation config, the pipeline options and
    the aid-adapt hyper-parameters (all validated before anything runs)."""
    tree: dict[str, Any] = {"method": {"name": "kd"}}
    if config is not None:
        tree = merge(tree, lift_run_section(read_yaml(config)))
    if overrides:
        tree = merge(tree, lift_run_section(parse_overrides(overrides) if isinstance(overrides, list) else overrides))
    section = tree.pop("aid", None) or {}
    if not isinstance(section, dict):
        raise ConfigError("aid: must be a mapping of AID options (for example aid.beta=1).")
    try:
        options = AIDOptions.model_validate(section)
    except ValidationError as error:
        raise ConfigError(_format_errors(error, prefix="aid.")) from None
    adapt_method = METHODS.get("aid-adapt")
    known = [*AIDOptions.model_fields, *(f.name for f in dataclasses.fields(adapt_method.Hparams))]
    for key in options.model_extra or {}:
        if key not in known:
            raise ConfigError(f"aid.{key}: unknown AID option.{suggest(key, known)} AID options: {', '.join(known)}.")
    try:
        hyper = validate_hparams(adapt_method, dict(options.model_extra or {}))
    except ConfigError as error:  # name the key as the user wrote it
        raise ConfigError(str(error).replace("method.", "aid.")) from None
    cfg = build_config(tree)
    if not METHODS.get(cfg.method.name).needs_teacher:
        raise ConfigError(f"the AID pipeline distils in its last stage; method {cfg.method.name!r} takes no teacher. Use kd, dkd, dist, ...")
    return cfg, options, hyper


def pipeline_dir_for(cfg: RunConfig, options: AIDOptions, hyper: dict) -> Path:
    own = options.model_dump(mode="json", exclude=set(options.model_extra or {}) | CHECK_OPTIONS)
    digest = json.dumps([cfg.hparams_hash(), own, hyper], sort_keys=True)
    name = cfg.name or (f"aid_{cfg.data.name}_{cfg.teacher.name}-{cfg.student.name}_{cfg.method.name}_s{cfg.seed}_"
                        f"{hashlib.sha256(digest.encode()).hexdigest()[:8]}")
    return Path(cfg.out_dir) / name


def _scaled_schedule(schedule: dict, factor: float) -> dict:
    """The same schedule stretched to a different number of epochs (step milestones, warm-up)."""
    out = dict(schedule)
    out["milestones"] = [m * factor for m in schedule["milestones"]]
    out["warmup_epochs"] = schedule["warmup_epochs"] * factor
    return out


def stage_configs(cfg: RunConfig, options: AIDOptions, hyper: dict, pipeline_dir: Path) -> dict[str, RunConfig | None]:
    """The three runs' configs (``1-reference`` is None when a reference checkpoint is given)."""
    base = cfg.model_dump(mode="json")
    base["out_dir"] = str(pipeline_dir)
    epochs = cfg.train.epochs

    reference = None
    hyper = dict(hyper)
    if not hyper.get("reference_checkpoint"):
        ref_epochs = options.ref_epochs or epochs
        tree = copy.deepcopy(base)
        tree.update(name=STAGES[0], teacher=None, method={"name": "ce"}, schedule=_scaled_schedule(base["schedule"], ref_epochs / epochs))
        tree["train"]["epochs"] = ref_epochs
        reference = build_config(tree)
        hyper["reference_checkpoint"] = str(RunDir(pipeline_dir / STAGES[0]).best)
    hyper["reference_model"] = hyper.get("reference_model") or cfg.student.name  # S_ref has the student's architecture

    adapt_epochs = options.adapt_epochs or max(1, round(0.1 * epochs))
    tree = copy.deepcopy(base)
    tree.update(name=STAGES[1], student=copy.deepcopy(base["teacher"]), method={"name": "aid-adapt", **hyper},
                schedule={"name": options.adapt_schedule})
    tree["optim"]["lr"] = options.adapt_lr or cfg.optim.lr / 10
    tree["train"]["epochs"] = adapt_epochs
    adapt = build_config(tree)

    tree = copy.deepcopy(base)
    tree["name"] = STAGES[2]
    tree["teacher"]["checkpoint"] = str(RunDir(pipeline_dir / STAGES[1]).best)
    return {"reference": reference, "adapt": adapt, "distill": build_config(tree)}


def aid(config: str | os.PathLike | None = None, overrides: list[str] | dict | None = None, *, echo: bool = True,
        overwrite: bool = False, data: ImageData | None = None) -> dict:
    """Run (or resume) the whole AID pipeline; returns aid_summary.json's content."""
    cfg, options, hyper = parse_aid_config(config, overrides)
    for key, path in (("teacher.checkpoint", cfg.teacher.checkpoint), ("aid.reference_checkpoint", hyper.get("reference_checkpoint"))):
        if path and not Path(path).is_file():  # fail now, not after training the reference student
            raise ConfigError(f"{key}={path} does not exist.")
    pipeline_dir = pipeline_dir_for(cfg, options, hyper)
    stages = stage_configs(cfg, options, hyper, pipeline_dir)
    start(pipeline_dir, overwrite)
    tree = cfg.model_dump(mode="json")
    tree["aid"] = {**options.model_dump(mode="json", exclude=set(options.model_extra or {})), **hyper}
    atomic_write_text(pipeline_dir / "aid_config.json", json.dumps(tree, indent=2) + "\n")
    data = data if data is not None else load_dataset(cfg.data)
    say = print if echo else (lambda *_: None)
    say(f"AID pipeline in {pipeline_dir}\n{NOTE}")

    summaries: dict[str, Any] = {}
    if stages["reference"] is not None:
        say(f"[1/3] reference student {cfg.student.name}: CE for {stages['reference'].train.epochs} epochs")
        summaries["reference"] = run(stages["reference"], echo=echo, data=data)
    else:
        say(f"[1/3] reference student: given, {hyper['reference_checkpoint']}")
        summaries["reference"] = {"checkpoint": hyper["reference_checkpoint"]}
    adapt = stages["adapt"]
    say(f"[2/3] adapting teacher {cfg.teacher.name}: aid-adapt for {adapt.train.epochs} epochs at lr {adapt.optim.lr:g}")
    summaries["adapt"] = run(adapt, echo=echo, data=data)
    report = adapted_teacher_report(adapt, pipeline_dir, data)
    say(report_markdown(report))
    check = adaptation_check(report, options)
    print(check["message"], file=sys.stdout if echo else sys.stderr)  # shown even when quiet: the stage's one verdict
    if not check["within_tolerance"]:
        if options.on_teacher_drop == "error":
            raise AdaptationError(check["message"])
        warnings.warn(check["message"], stacklevel=2)
    say(f"[3/3] distilling {cfg.student.name} from the adapted teacher with {cfg.method.name}")
    summaries["distill"] = run(stages["distill"], echo=echo, data=data)

    distilled = summaries["distill"]
    summary = {
        "pipeline": "aid", "note": NOTE, "dir": str(pipeline_dir), "stages": summaries, "adapted_teacher": report,
        "adaptation": check,
        "student_best_val_acc": distilled["best_val_acc"], "student_test_acc_at_best_val": distilled["test_acc_at_best_val"],
        "student_checkpoint": str(RunDir(pipeline_dir / STAGES[2]).best),
        "student": distilled,  # the final stage's summary, as every pipeline returns it (studies read this)
    }
    atomic_write_text(pipeline_dir / "aid_summary.json", json.dumps(summary, indent=2) + "\n")
    say(f"student {cfg.student.name} ({cfg.method.name} from the adapted teacher): best val {distilled['best_val_acc']}, "
        f"test at best val {distilled['test_acc_at_best_val']}")
    return summary


def adaptation_check(report: dict, options: AIDOptions) -> dict:
    """What adaptation did on the validation split: L_inner(T ‖ S_ref) and the teacher's accuracy before (T0) and
    after, and whether the accuracy fell by more than ``options.max_teacher_drop`` points."""
    if "val" not in report:
        return {"within_tolerance": True, "max_teacher_drop": options.max_teacher_drop,
                "message": "adaptation: no validation split (data.val_fraction=0), so the teacher's accuracy drop is not checked"}
    val = report["val"]
    inner, acc = val["inner"], val["teacher_acc"]
    drop = acc["before"] - acc["after"]
    change = 100 * (inner["after"] - inner["before"]) / inner["before"] if inner["before"] > 0 else 0.0
    within = drop <= options.max_teacher_drop + 1e-9
    message = (f"adaptation (validation split): L_inner(T ‖ S_ref) {inner['before']:.4f} -> {inner['after']:.4f} ({change:+.1f}%), "
               f"teacher top-1 {acc['before']:.2f}% -> {acc['after']:.2f}% ({-drop:+.2f} points; tolerated fall "
               f"{options.max_teacher_drop:g}, aid.max_teacher_drop)")
    if not within:
        message += (f". The adapted teacher lost {drop:.2f} points of validation accuracy, more than aid.max_teacher_drop="
                    f"{options.max_teacher_drop:g}: lower aid.beta or aid.adapt_lr, or raise aid.max_teacher_drop (or set "
                    "aid.on_teacher_drop=warn) to distil from it anyway; the finished stages are kept")
    return {"inner_before": inner["before"], "inner_after": inner["after"], "inner_change_percent": change,
            "teacher_acc_before": acc["before"], "teacher_acc_after": acc["after"], "teacher_drop": drop,
            "max_teacher_drop": options.max_teacher_drop, "within_tolerance": within, "message": message}


#: what the report compares before / after adaptation, per split
REPORT_KEYS = [
    ("teacher_acc", "teacher top-1 (%)"),
    ("spread_teacher", "D_T teacher inner-class spread"),
    ("class", "L_class(T ‖ S_ref)"),
    ("inner", "L_inner(T ‖ S_ref)"),
    ("kd", "L_KD(T ‖ S_ref)"),
    ("agreement", "top-1 agreement with S_ref (%)"),
    ("teacher_ece", "teacher ECE (%)"),
]


def adapted_teacher_report(adapt_cfg: RunConfig, pipeline_dir: Path, data: ImageData) -> dict:
    """T0 vs the adapted teacher, both against S_ref, on the validation and test splits; written to
    adapted_teacher_report.json / .md once per adaptation run (kept while its config is unchanged)."""
    from ..analysis import class_similarity, collect_logits, compare_logits

    path = pipeline_dir / f"{REPORT}.json"
    config_hash = adapt_cfg.hparams_hash()
    if path.exists():
        report = json.loads(path.read_text())
        if report.get("config_hash") == config_hash:
            return report
    runtime = Runtime.resolve(adapt_cfg.train.device, adapt_cfg.train.amp, channels_last=False)
    bundle = build_data(adapt_cfg.data, runtime.device, adapt_cfg.seed, data=data)
    method = adapt_cfg.method.hparams
    adapted_path = RunDir(pipeline_dir / STAGES[1]).best
    models = {
        "original": build_model(adapt_cfg.teacher, bundle.data, "teacher"),
        "adapted": load_model(adapted_path, bundle.data, adapt_cfg.teacher.name, "teacher")[0],
        "reference": load_model(method["reference_checkpoint"], bundle.data, method["reference_model"], "student")[0],
    }
    temperature = method["temperature"]
    report: dict[str, Any] = {
        "note": NOTE, "config_hash": config_hash, "temperature": temperature, "beta": method["beta"], "gamma": method["gamma"],
        "adapt_epochs": adapt_cfg.train.epochs, "adapt_lr": adapt_cfg.optim.lr,
        "teacher_checkpoint": adapt_cfg.teacher.checkpoint, "adapted_checkpoint": str(adapted_path),
        "reference_checkpoint": method["reference_checkpoint"],
        "selection": "the adapted teacher is the best-validation epoch of the adaptation run; test is reported, never selected on",
    }
    for split, loader in (("val", bundle.val), ("test", bundle.test)):
        if loader is None:
            continue
        logits = {}
        for role, model in models.items():
            logits[role], labels = collect_logits(runtime.place(model), loader, runtime.autocast)
        before = compare_logits(logits["original"], logits["reference"], labels, temperature)
        after = compare_logits(logits["adapted"], logits["reference"], labels, temperature)
        report[split] = {
            **{key: {"before": before[key], "after": after[key]} for key, _ in REPORT_KEYS},
            "reference_acc": before["student_acc"],
            "spread_reference": before["spread_student"],
            "class_to_original": float(class_similarity(logits["original"], logits["adapted"], labels, temperature)),
        }
    atomic_write_text(path, json.dumps(report, indent=2) + "\n")
    atomic_write_text(path.with_suffix(".md"), report_markdown(report) + "\n")
    return report


def report_markdown(report: dict) -> str:
    splits = [s for s in ("val", "test") if s in report]
    header = "| | " + " | ".join(f"{s} before | {s} after" for s in splits) + " |"
    lines = [
        f"## Adapted teacher (beta={report['beta']:g}, gamma={report['gamma']:g}, tau={report['temperature']:g}, "
        f"{report['adapt_epochs']} epochs at lr {report['adapt_lr']:g})", "", f"_{NOTE}_", "",
        header, "|---|" + "---:|---:|" * len(splits),
    ]
    for key, label in REPORT_KEYS:
        cells = " | ".join(f"{report[s][key]['before']:.4f} | {report[s][key]['after']:.4f}" for s in splits)
        lines.append(f"| {label} | {cells} |")
    lines.append("| L_class(T0 ‖ T) | " + " | ".join(f"0 | {report[s]['class_to_original']:.4f}" for s in splits) + " |")
    lines += ["", "S_ref (unchanged): " + "; ".join(
        f"{s} top-1 {report[s]['reference_acc']:.2f}%, D_S {report[s]['spread_reference']:.4f}" for s in splits)]
    lines += ["", f"{report['selection']}."]
    return "\n".join(lines)

