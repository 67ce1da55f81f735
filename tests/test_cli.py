import json

import pytest

from gapkd.cli import main


def test_list_prints_one_name_per_line(capsys):
    assert main(["list", "models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "resnet20" in lines and all(" " not in line for line in lines)
    assert main(["list", "methods"]) == 0
    assert {"ce", "kd"} <= set(capsys.readouterr().out.split())
    assert main(["list", "datasets"]) == 0
    assert "cifar10-jpg" in capsys.readouterr().out.split()


@pytest.mark.parametrize("command", ["train", "distill", "eval", "list", "quickstart"])
def test_help_shows_an_example(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "example" in capsys.readouterr().out


def test_train_distill_eval_from_the_command_line(tmp_path, capsys):
    common = [f"out_dir={tmp_path}", "data.name=digits", "train.epochs=1", "train.device=cpu", "data.augment.flip=false", "--quiet"]
    assert main(["train", "student.name=resnet14", "run.name=t", *common]) == 0
    capsys.readouterr()
    ckpt = tmp_path / "t" / "checkpoints" / "best.pt"
    assert main(["distill", "student.name=resnet8", "teacher.name=resnet14", f"teacher.checkpoint={ckpt}", "run.name=s", *common]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"] == "kd" and summary["epochs"] == 1
    assert main(["eval", str(ckpt), "data.name=digits", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == "resnet14" and 0 <= result["test_acc"] <= 100


def test_user_errors_exit_2_with_one_message(capsys):
    assert main(["train", "student.name=resnet2O"]) == 2
    err = capsys.readouterr().err
    assert "Unknown model 'resnet2O'" in err and "Did you mean" in err and "Traceback" not in err
