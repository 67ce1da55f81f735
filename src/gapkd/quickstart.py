"""`gapkd quickstart`: the main job on real data, offline, in a few minutes on 2 CPU cores.

Trains a teacher, a from-scratch student and distilled students on scikit-learn's digits
(or Fashion-MNIST when installed), then prints validation and test accuracy per method.
"""
from __future__ import annotations

from .api import run
from .config import build_config
from .core.rundir import RunDir
from .data import load_dataset

#: dataset -> (teacher, student, teacher epochs, student epochs, batch, lr, crop padding)
PRESETS = {
    "digits": dict(teacher="resnet56", student="resnet8", teacher_epochs=30, student_epochs=30, batch=64, lr=0.05, pad=1),
    "fashion-mnist": dict(teacher="resnet32", student="resnet8", teacher_epochs=3, student_epochs=3, batch=128, lr=0.05, pad=2),
}

#: the methods the table shows, with their quickstart hyper-parameters
STUDENT_METHODS = [
    ("scratch", {"name": "ce"}),
    ("kd", {"name": "kd", "temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9}),
    ("dfpt-kd", {"name": "dfpt-kd", "temperature": 4.0, "student_ce_weight": 0.1, "student_teacher_weight": 0.45, "student_prompt_weight": 0.45}),
    ("dfpt-kd+", {"name": "dfpt-kd+", "temperature": 4.0, "student_ce_weight": 0.1, "student_teacher_weight": 0.45, "student_prompt_weight": 0.45}),
]


def quickstart(dataset: str = "digits", epochs: int | None = None, out_dir: str = "runs/quickstart", data_root: str | None = None) -> list[dict]:
    preset = PRESETS.get(dataset.lower())
    if preset is None:
        from .core.errors import ConfigError

        raise ConfigError(f"quickstart runs on {', '.join(PRESETS)}; got {dataset!r}.")
    student_epochs = epochs or preset["student_epochs"]
    base = {
        "out_dir": out_dir,
        "data": {"name": dataset, "root": data_root, "batch_size": preset["batch"], "augment": {"crop_padding": preset["pad"], "flip": False}},
        "optim": {"lr": preset["lr"]},
        "schedule": {"name": "cosine"},
        "train": {"threads": None},
    }
    data = load_dataset(build_config(base, overrides={"student": {"name": preset["student"]}}).data)
    print(f"gapkd quickstart on {dataset}: {len(data.train)} train (10% held out for validation) / {len(data.test)} test images, "
          f"{data.num_classes} classes, {data.image_size}x{data.image_size}")

    rows = []
    teacher_cfg = build_config(base, overrides={
        "name": f"teacher_{preset['teacher']}", "student": {"name": preset["teacher"]}, "method": {"name": "ce"},
        "train": {"epochs": preset["teacher_epochs"]},
    })
    print(f"\n[1/{1 + len(STUDENT_METHODS)}] teacher {preset['teacher']} ({preset['teacher_epochs']} epochs)")
    rows.append(("teacher (ce)", preset["teacher"], run(teacher_cfg, echo=False, data=data)))
    teacher_ckpt = str(RunDir.for_config(teacher_cfg).best)
    for number, (label, method) in enumerate(STUDENT_METHODS, start=2):
        overrides = {"name": f"student_{preset['student']}_{label}", "student": {"name": preset["student"]},
                     "method": method, "train": {"epochs": student_epochs}}
        if method["name"] != "ce":
            overrides["teacher"] = {"name": preset["teacher"], "checkpoint": teacher_ckpt}
        print(f"[{number}/{1 + len(STUDENT_METHODS)}] student {preset['student']}: {label} ({student_epochs} epochs)")
        rows.append((label, preset["student"], run(build_config(base, overrides=overrides), echo=False, data=data)))

    print(f"\n{'method':<14}{'model':<12}{'best val':>9}{'epoch':>7}{'test@best':>11}{'last test':>11}{'time (s)':>10}")
    for label, model, summary in rows:
        print(f"{label:<14}{model:<12}{summary['best_val_acc']:>9.2f}{summary['best_epoch']:>7}"
              f"{summary['test_acc_at_best_val']:>11.2f}{summary['last_test_acc']:>11.2f}{summary['train_seconds']:>10.1f}")
    print(f"\nRun directories (config.yaml, metrics.jsonl, checkpoints/, summary.json) are under {out_dir}/. "
          "Accuracies are %; the test column is read at the best-validation epoch (no selection on test).")
    return [summary for _, _, summary in rows]
