"""End to end on the real CIFAR-10 JPEG copy (skipped when ../shared/data is absent)."""
import torch

from gapkd.api import run, run_dir_for
from gapkd.config import DataConfig, build_config
from gapkd.data import load_dataset


def test_cifar10_jpg_decodes_with_the_documented_layout(cifar10_jpg_path):
    data = load_dataset(DataConfig(name="cifar10-jpg", path=str(cifar10_jpg_path)))
    assert data.train.images.shape == (50000, 3, 32, 32) and data.test.images.shape == (10000, 3, 32, 32)
    assert torch.bincount(data.train.labels).tolist() == [5000] * 10
    assert data.classes[0] == "airplane" and data.classes[-1] == "truck"
    assert abs(data.mean[0] - 0.4913) < 1e-3 and abs(data.std[2] - 0.2606) < 1e-3  # as the data README reports


def test_teacher_then_kd_student_on_a_subset(cifar10_jpg_path, tmp_path):
    base = {
        "out_dir": str(tmp_path),
        "data": {"name": "cifar10-jpg", "path": str(cifar10_jpg_path), "train_subset": 256, "test_subset": 200, "batch_size": 64},
        "train": {"epochs": 1, "device": "cpu"},
    }
    teacher = build_config(base, overrides=["name=t", "student.name=resnet14"])
    assert run(teacher, echo=False)["epochs"] == 1
    student = build_config(base, overrides=["name=s", "student.name=resnet8", "method.name=kd", "teacher.name=resnet14",
                                            f"teacher.checkpoint={run_dir_for(teacher) / 'checkpoints' / 'best.pt'}"])
    summary = run(student, echo=False)
    assert summary["test_acc_at_best_val"] is not None and (run_dir_for(student) / "summary.json").is_file()
