"""Issue 21's adversarial findings, each reproduced and now handled (see docs/reliability.md)."""
from __future__ import annotations

import pytest
import torch

from gapkd.config import build_config
from gapkd.engine.precision import stride_exceeds_input
from gapkd.engine.trainer import autocast_context


def _conv_weight_grad(conv: torch.nn.Conv2d, x: torch.Tensor, ctx) -> torch.Tensor:
    conv.zero_grad(set_to_none=True)
    junk = torch.full((conv.weight.numel() * 8,), 3e38)  # what a buggy kernel would read back from freed memory
    del junk
    with ctx():
        out = conv(x)
    out.float().sum().backward()
    return conv.weight.grad.clone()


@pytest.mark.parametrize("size, kernel, stride, padding", [(1, 3, 2, 1), (1, 7, 2, 3), (2, 3, 3, 1), (4, 3, 2, 1)])
def test_cpu_bf16_conv_weight_grad_guard(size, kernel, stride, padding):
    """Finding 7: under CPU bf16 autocast, a conv whose stride exceeds its input (resnet18's ImageNet stem on
    digits: 3x3 stride-2 on 1x1 maps) got weight gradients of 1e19..1e26 from uninitialised memory (oneDNN);
    train.amp's autocast runs those in fp32, so the gradient matches fp32's every time."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(64, 64, kernel, stride, padding, bias=False).to(memory_format=torch.channels_last)
    x = torch.randn(8, 64, size, size).contiguous(memory_format=torch.channels_last)
    reference = _conv_weight_grad(conv, x, autocast_context(torch.device("cpu"), "off")[0])
    ctx, dtype = autocast_context(torch.device("cpu"), "bf16")
    assert dtype is torch.bfloat16
    for _ in range(4):
        grad = _conv_weight_grad(conv, x, ctx)
        assert torch.isfinite(grad).all()
        assert (grad - reference).abs().max() <= 0.02 * reference.abs().max() + 1e-3
    with ctx():
        assert conv(x).dtype is torch.bfloat16  # what autocast hands on, whichever precision computed it


def test_guard_touches_only_convs_whose_stride_exceeds_the_input():
    weight3, weight1 = torch.empty(4, 4, 3, 3), torch.empty(4, 4, 1, 1)
    assert stride_exceeds_input(torch.empty(2, 4, 1, 1), weight3, 2)
    assert stride_exceeds_input(torch.empty(2, 4, 2, 8), weight3, (3, 1))
    assert not stride_exceeds_input(torch.empty(2, 4, 2, 2), weight3, 2)
    assert not stride_exceeds_input(torch.empty(2, 4, 1, 1), weight1, 2)  # 1x1 kernels are computed right
    assert not stride_exceeds_input(torch.empty(2, 4, 1, 1), weight3, 1)


@pytest.mark.parametrize("seed", [0, 2])
def test_resnet18_imagenet_stem_trains_on_digits_in_bf16(seed, tiny_overrides):
    """The capacity study's smoke stem ablation, which stopped with a NaN gradient norm at step 0-3 in bf16."""
    from gapkd.api import run

    tiny_overrides["train"].update(amp="bf16", epochs=1, grad_clip=1.0)
    tiny_overrides["data"].update(train_subset=128, test_subset=64, batch_size=32, drop_last=True)
    tiny_overrides.update(seed=seed, student={"name": "resnet18", "options": {"stem": "imagenet"}})
    summary = run(build_config({"method": {"name": "ce"}}, None, tiny_overrides), echo=False)
    assert summary["skipped_steps"] == 0 and summary["last_test_acc"] is not None


# ---------------------------------------------------------------- finding 4: files never run code unasked

@pytest.fixture
def canary_plugin(tmp_path):
    """A plugin whose import leaves a mark on disk: proof that its code ran."""
    mark = tmp_path / "EXECUTED"
    path = tmp_path / "evil.py"
    path.write_text(f"open({str(mark)!r}, 'w').write('ran')\n")
    return path, mark


def _recipe(tmp_path, plugins, **extra):
    import yaml

    tree = {"plugins": plugins, "student": {"name": "resnet8"}, "data": {"name": "digits"}, "train": {"epochs": 1, "amp": "off"},
            "out_dir": str(tmp_path / "runs"), **extra}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_a_recipe_listing_a_plugin_is_refused_without_opt_in(tmp_path, canary_plugin, capsys):
    from gapkd.cli import main

    evil, mark = canary_plugin
    recipe = _recipe(tmp_path, [str(evil)])
    for argv in (["train", "-c", str(recipe)], ["study", "status", str(tmp_path / "study.yaml")],
                 ["export", str(tmp_path / "runs" / "victim")]):
        if argv[0] == "study":
            import yaml

            (tmp_path / "study.yaml").write_text(yaml.safe_dump({"name": "s", "base": {"plugins": [str(evil)]},
                                                                  "pairs": [{"student": "resnet8"}], "methods": {"ce": {"name": "ce"}}}))
        if argv[0] == "export":
            run_dir = tmp_path / "runs" / "victim"
            (run_dir / "checkpoints").mkdir(parents=True)
            (run_dir / "checkpoints" / "best.pt").write_bytes(b"")
            (run_dir / "config.yaml").write_text(recipe.read_text())
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "runs their Python code" in err and f"--plugin {evil}" in err and "--trust-plugins" in err, err
        assert len(err.strip().splitlines()) == 1
        assert not mark.exists(), argv  # nothing ran


def test_opting_in_imports_the_plugin_with_a_warning_naming_the_file(tmp_path, canary_plugin):
    from gapkd.config import build_config
    from gapkd.plugins import PluginWarning, command_line_plugins, trust_plugins

    evil, mark = canary_plugin
    recipe = _recipe(tmp_path, [str(evil)])
    with trust_plugins(), pytest.warns(PluginWarning, match=f"{evil}.*{recipe}.*code runs"):
        build_config({"method": {"name": "ce"}}, recipe)
    assert mark.exists()
    mark.unlink()
    import sys

    from gapkd.plugins import module_name_for

    sys.modules.pop(module_name_for(evil))
    with command_line_plugins([str(evil)]), pytest.warns(PluginWarning, match=str(recipe)):  # --plugin names it: opted in
        cfg = build_config({"method": {"name": "ce"}}, recipe)
    assert mark.exists() and cfg.plugins == [str(evil)]
    # a plugin given in Python (or on the command line) is the caller's own choice: no opt-in needed
    assert build_config({"method": {"name": "ce"}, "plugins": [str(evil)], "student": {"name": "resnet8"}}).plugins == [str(evil)]


def test_a_folder_given_as_config_is_named_as_a_folder(tmp_path):
    from gapkd.config import build_config
    from gapkd.errors import ConfigError

    (tmp_path / "config.yaml").write_text("student: {name: resnet8}\n")
    with pytest.raises(ConfigError, match=f"{tmp_path} is a folder.*{tmp_path / 'config.yaml'}"):
        build_config(None, tmp_path)


# ---------------------------------------------------------------- findings 5 and 9: data

def _tree(root, classes=("a", "b"), per_class=3, size=(8, 8)):
    from gapkd.testing import write_image

    for split in ("train", "test"):
        for index, cls in enumerate(classes):
            for i in range(per_class):
                write_image(root / split / cls / f"{i}.png", seed=100 * index + i, size=size)
    return root


def test_image_folder_cache_sees_a_new_class_and_a_replaced_image(tmp_path):
    """Finding 5: the decoded cache was keyed on the top folder's stat only, so these changes were ignored."""
    import os

    from gapkd.data.sources import read_image_tree
    from gapkd.testing import write_image

    root = _tree(tmp_path / "tree")
    first = read_image_tree(root, "tree")
    assert first.classes == ["a", "b"]
    stat = root.stat()
    for split in ("train", "test"):  # a third class: the top folder's size and mtime do not change
        write_image(root / split / "c" / "0.png", seed=7, size=(8, 8))
    os.utime(root, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert read_image_tree(root, "tree").classes == ["a", "b", "c"]
    before = read_image_tree(root, "tree").train.images.clone()
    write_image(root / "train" / "a" / "0.png", seed=999, size=(8, 8))  # one image replaced in place
    after = read_image_tree(root, "tree").train.images
    assert not torch.equal(before, after)


def test_a_tar_cut_at_a_member_boundary_is_refused(tmp_path):
    """Finding 9: Python's tarfile reads an uncompressed tar cut between members as complete."""
    import tarfile

    from gapkd.data.sources import read_image_tree
    from gapkd.errors import DataError

    root = _tree(tmp_path / "tree", classes=("a", "b", "c"))
    archive = tmp_path / "tree.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(root, arcname=".")
    assert read_image_tree(archive, "whole").classes == ["a", "b", "c"]
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        cut = next(m for m in members if m.name.endswith("train/c/0.png")).offset  # the start of a member's header
    cut_archive = tmp_path / "cut.tar"
    cut_archive.write_bytes(archive.read_bytes()[:cut])
    with pytest.raises(DataError, match="truncated.*end-of-archive.*again"):
        read_image_tree(cut_archive, "cut")


def test_a_one_class_folder_is_refused(tmp_path):
    from gapkd.data.sources import read_image_tree
    from gapkd.errors import DataError

    with pytest.raises(DataError, match="one class folder .'a'.*at least two"):
        read_image_tree(_tree(tmp_path / "tree", classes=("a",)), "one")


def test_a_subset_too_small_for_validation_is_refused_not_silently_unvalidated(tiny_overrides):
    """Finding 9: data.train_subset=5 dropped the validation split and logged test accuracy as 'val'."""
    from gapkd.api import run
    from gapkd.errors import DataError

    tiny_overrides["data"]["train_subset"] = 5
    with pytest.raises(DataError, match="val_fraction=0.1 leaves no validation image of data.train_subset=5.*val_fraction=0"):
        run(build_config({"method": {"name": "ce"}}, None, tiny_overrides), echo=False)
    tiny_overrides["data"].update(train_subset=40, val_fraction=0)
    tiny_overrides["train"]["epochs"] = 1
    cfg = build_config({"method": {"name": "ce"}}, None, tiny_overrides)
    summary = run(cfg, echo=False)
    assert summary["best_val_acc"] is None
    from gapkd.api import run_dir_for

    line = (run_dir_for(cfg) / "train.log").read_text().splitlines()[-1]
    assert "val -  test" in line  # no test accuracy under the val heading


# ---------------------------------------------------------------- finding 8: messages, not tracebacks

def test_a_full_disk_under_torch_save_is_named_not_unexpected_pos(tmp_path, monkeypatch):
    """torch.save writing into a file turned ENOSPC into 'RuntimeError: unexpected pos'."""
    import errno
    import os

    from gapkd.engine import checkpoint
    from gapkd.errors import CheckpointError

    path = tmp_path / "state.pt"
    checkpoint.atomic_save({"epoch": 1}, path)
    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, handle):
            self.handle = handle

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    monkeypatch.setattr(checkpoint.os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode)))
    with pytest.raises(CheckpointError, match="no space left.*previous checkpoint is intact"):
        checkpoint.atomic_save({"epoch": 2, "w": torch.ones(100_000)}, path)
    monkeypatch.undo()
    assert checkpoint.safe_load(path)["epoch"] == 1 and [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def test_damaged_checkpoints_and_folders_get_one_message_without_torchs_advice(tmp_path):
    import random

    from gapkd.engine.checkpoint import safe_load
    from gapkd.errors import CheckpointError

    (tmp_path / "zero.pt").write_bytes(b"")
    (tmp_path / "random.pt").write_bytes(random.Random(0).randbytes(4096))  # seeded: os.urandom made the message vary
    (tmp_path / "text.pt").write_text("not a checkpoint\n")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    expected = {"zero.pt": "is empty .0 bytes.", "random.pt": "not a PyTorch checkpoint", "text.pt": "not a PyTorch checkpoint",
                "run": "is a folder; give the path of a file .a run.s are in"}
    for name, fragment in expected.items():
        with pytest.raises(CheckpointError, match=fragment) as caught:
            safe_load(tmp_path / name)
        assert "weights_only" not in str(caught.value) and "objects other than tensors" not in str(caught.value)


def _cli(capsys, *argv):
    from gapkd.cli import main

    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_unknown_device_read_only_folder_damaged_database_and_missing_plot_library_are_messages(tmp_path, monkeypatch, capsys):
    import errno
    from pathlib import Path

    import yaml

    status, _, err = _cli(capsys, "train", "student.name=resnet8", "data.name=digits", "train.device=tpu", f"out_dir={tmp_path}")
    assert status == 2 and "train.device=tpu" in err and "use auto, cpu, cuda" in err and len(err.strip().splitlines()) == 1

    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):  # the run folder's parent refuses writes (root ignores chmod, so simulated)
        if str(self).startswith(str(tmp_path / "ro")):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    status, _, err = _cli(capsys, "train", "student.name=resnet8", "data.name=digits", "train.epochs=1", "train.amp=off",
                          f"out_dir={tmp_path / 'ro'}")
    assert status == 2 and "cannot write" in err and "Permission denied" in err and "out_dir=" in err, err
    monkeypatch.undo()

    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({"name": "s", "base": {"data": {"name": "digits"}}, "pairs": [{"student": "resnet8"}],
                                     "methods": {"scratch": {"name": "ce"}}}))
    (tmp_path / "sdir").mkdir()
    (tmp_path / "sdir" / "results.sqlite").write_bytes(b"this is not a database" * 100)
    status, _, err = _cli(capsys, "study", "status", str(study), "--dir", str(tmp_path / "sdir"))
    assert status == 2 and "is damaged" in err and "Move it aside" in err and "summary.json" in err, err

    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed: importing it raises ImportError
    status, _, err = _cli(capsys, "study", "report", str(study), "--dir", str(tmp_path / "fresh"))
    assert status == 2 and "needs matplotlib" in err and 'pip install "gapkd[study]"' in err, err


# ---------------------------------------------------------------- finding 10: smaller

def test_a_closed_stdout_does_not_stop_training(tmp_path):
    """`gapkd train ... | head -1` stopped training at the next epoch line and exited 0."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "gapkd.cli", "train", "student.name=resnet8", "data.name=digits",
                             "train.epochs=3", "train.amp=off", "data.train_subset=300", f"out_dir={tmp_path}", "name=piped"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    first = proc.stdout.readline()
    assert b"epoch 1/3" in first
    proc.stdout.close()  # the reader goes away, as `| head -1` does
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    summary = json.loads((tmp_path / "piped" / "summary.json").read_text())
    assert summary["epochs"] == 3 and len((tmp_path / "piped" / "metrics.jsonl").read_text().splitlines()) == 3


def test_a_killed_study_worker_is_not_shown_running(tmp_path):
    import subprocess
    import sys

    from gapkd.study.store import worker_alive, worker_id

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host = worker_id().rpartition(":")[0]
    assert worker_alive(worker_id()) is True
    assert worker_alive(f"{host}:{gone.pid}") is False
    assert worker_alive(f"another-host-{host}:{gone.pid}") is None  # unknown: reported as it is


def test_run_files_share_one_mode_and_eval_never_suggests_what_it_refuses(tiny_overrides, tmp_path):
    import stat

    from gapkd.api import evaluate, run, run_dir_for
    from gapkd.errors import CheckpointError
    from gapkd.testing import write_image

    tiny_overrides["train"]["epochs"] = 1
    cfg = build_config({"method": {"name": "ce"}}, None, tiny_overrides)
    run(cfg, echo=False)
    run_dir = run_dir_for(cfg)
    mode = stat.S_IMODE((run_dir / "config.yaml").stat().st_mode)
    for name in ("summary.json", "checkpoints/best.pt", "checkpoints/last.pt", "checkpoints/state.pt"):
        assert stat.S_IMODE((run_dir / name).stat().st_mode) == mode, name

    for split in ("train", "test"):  # a 2-class grey 8x8 dataset: the 10-class checkpoint does not fit it
        for cls in ("a", "b"):
            for i in range(10):
                write_image(tmp_path / "two" / split / cls / f"{i}.png", seed=i, size=(8, 8), mode="L")
    with pytest.raises(CheckpointError, match="trained for 10 classes.*dataset it was trained for") as caught:
        evaluate(run_dir / "checkpoints" / "best.pt", {"name": "image-folder", "path": str(tmp_path / "two"), "val_fraction": 0})
    assert "model.init_head" not in str(caught.value)


# ---------------------------------------------------------------- findings 1, 2, 3, 6: the run directory

def _cfg(overrides, **changes):
    import copy

    from gapkd.config import merge

    return build_config({"method": {"name": "ce"}}, None, merge(copy.deepcopy(overrides), changes))


def test_overwrite_deletes_only_a_gapkd_run_of_that_name_inside_out_dir(tiny_overrides, tmp_path):
    """Finding 1: --overwrite ran rmtree on whatever out_dir/name was, before any check; name=. or ../../x escaped."""
    from gapkd.api import run, run_dir_for
    from gapkd.errors import ConfigError

    out_dir = tmp_path / "runs"
    victim = out_dir / "victim"
    victim.mkdir(parents=True)
    (victim / "thesis.txt").write_text("precious\n")
    with pytest.raises(ConfigError, match="refuses to delete .*victim: it holds files a run does not write .thesis.txt."):
        run(_cfg(tiny_overrides, name="victim", train={"epochs": 1}), echo=False, overwrite=True)
    assert sorted(p.name for p in victim.iterdir()) == ["thesis.txt"]  # untouched, not even a lock file
    for name in (".", "..", "../../x", "a/b"):
        with pytest.raises(ConfigError, match="must be one folder name inside out_dir"):
            run(_cfg(tiny_overrides, name=name), echo=False, overwrite=True)
    assert (victim / "thesis.txt").read_text() == "precious\n"

    cfg = _cfg(tiny_overrides, name="real", train={"epochs": 1})
    first = run(cfg, echo=False)
    (run_dir_for(cfg) / "notes.txt").write_text("mine\n")  # a file of the user's inside a run folder: still refused
    with pytest.raises(ConfigError, match="notes.txt"):
        run(cfg, echo=False, overwrite=True)
    (run_dir_for(cfg) / "notes.txt").unlink()
    again = run(cfg, echo=False, overwrite=True)  # a real run folder is started over
    assert again["config_hash"] == first["config_hash"]
    # a bad teacher (or bad data) stops --overwrite before anything is deleted
    with pytest.raises(Exception, match="does not exist"):
        run(_cfg(tiny_overrides, name="real", train={"epochs": 1}, student={"name": "resnet8", "checkpoint": str(tmp_path / "no.pt")}),
            echo=False, overwrite=True)
    assert (run_dir_for(cfg) / "summary.json").is_file()


def test_a_second_process_on_a_live_run_directory_is_refused_naming_the_first(tiny_overrides, tmp_path):
    """Finding 2: two processes on one run name both exited 0 with mixed files, or one crashed in os.replace."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from gapkd.api import run
    from gapkd.errors import GapkdError

    src = Path(__file__).resolve().parents[1] / "src"
    out_dir = tmp_path / "runs"
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-m", "gapkd.cli", "train", "student.name=resnet8", "data.name=digits", "train.epochs=200",
                              "train.amp=off", "train.device=cpu", f"out_dir={out_dir}", "name=shared", "--quiet"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.time() + 240
        while not (out_dir / "shared" / "metrics.jsonl").is_file():
            assert first.poll() is None and time.time() < deadline, first.stderr.read() if first.poll() is not None else "timeout"
            time.sleep(0.2)
        before = (out_dir / "shared" / "config.yaml").read_text()
        with pytest.raises(GapkdError, match=rf"shared is in use by another gapkd process \(pid {first.pid} on .*started"):
            run(_cfg(tiny_overrides, name="shared", train={"epochs": 200}, optim={"lr": 0.2}), echo=False)
        assert (out_dir / "shared" / "config.yaml").read_text() == before  # nothing of the second config written
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # the kernel released the killed holder's lock: the same run resumes in this process
    summary = run(_cfg(tiny_overrides, name="shared", train={"epochs": 1}), echo=False, overwrite=True)
    assert summary["epochs"] == 1


@pytest.mark.parametrize("lr", [1e6, 1e38])
def test_a_diverged_run_never_checkpoints_nonfinite_or_exploded_weights(lr, tiny_overrides):
    """Finding 3: lr=1e6 exited 0 with Inf BatchNorm running_var in last.pt/state.pt; lr=1e38 kept |w| ~ 1e37."""
    from gapkd.api import run, run_dir_for
    from gapkd.core.runguard import diverged_tensor
    from gapkd.engine.checkpoint import safe_load
    from gapkd.errors import NonFiniteLossError

    cfg = _cfg(tiny_overrides, optim={"lr": lr}, train={"epochs": 3})
    with pytest.raises(NonFiniteLossError, match="NaN/Inf|diverged"):
        run(cfg, echo=False)
    checkpoints = run_dir_for(cfg) / "checkpoints"
    for path in checkpoints.glob("*.pt"):
        payload = safe_load(path)
        state = payload.get("state_dict", payload.get("model"))
        assert diverged_tensor(state) is None, path
    assert not (run_dir_for(cfg) / "summary.json").exists()


@pytest.mark.parametrize("corrupt, fragment", [
    (lambda student: student.bn1.running_var.fill_(float("inf")), r"student.bn1.running_var holds NaN/Inf"),
    (lambda student: student.fc.bias.data.fill_(1e25), r"student.fc.bias reached (9.99e\+24|1e\+25)"),  # every logit + 1e25: the loss stays log(10)
])
def test_divergence_with_finite_losses_is_caught_before_any_checkpoint(corrupt, fragment, tiny_overrides, monkeypatch):
    """Finding 3's silent cases: BatchNorm running_var Inf (train mode normalises with batch statistics, so the loss
    stays finite) and exploded but finite weights were checkpointed, and the run exited 0."""
    from gapkd.api import run, run_dir_for
    from gapkd.core.runguard import diverged_tensor
    from gapkd.engine.checkpoint import safe_load
    from gapkd.errors import NonFiniteLossError
    from gapkd.methods.ce import CrossEntropy

    forward = CrossEntropy.forward

    def diverging(self, images, labels, step):
        if step.epoch == 1 and step.step % step.steps_per_epoch == 2:
            with torch.no_grad():
                corrupt(self.student)
        return forward(self, images, labels, step)

    monkeypatch.setattr(CrossEntropy, "forward", diverging)
    cfg = _cfg(tiny_overrides, name="silent", train={"epochs": 3})
    with pytest.raises(NonFiniteLossError, match=rf"diverged in epoch 2: {fragment}.*last good checkpoint .*state.pt is kept"):
        run(cfg, echo=False)
    state = safe_load(run_dir_for(cfg) / "checkpoints" / "state.pt")
    assert state["epoch"] == 1 and diverged_tensor(state["model"]) is None
    assert diverged_tensor(safe_load(run_dir_for(cfg) / "checkpoints" / "best.pt")["state_dict"]) is None
    assert not (run_dir_for(cfg) / "checkpoints" / "last.pt").exists()


def test_skipping_every_step_is_an_error_and_a_nan_teacher_is_named(tiny_overrides, monkeypatch, tmp_path):
    from gapkd.api import run
    from gapkd.engine.checkpoint import atomic_save, safe_load
    from gapkd.errors import CheckpointError, NonFiniteLossError
    from gapkd.methods.ce import CrossEntropy

    teacher = run(_cfg(tiny_overrides, name="teacher", train={"epochs": 1}), echo=False)
    teacher_path = tmp_path / "runs" / teacher["run"] / "checkpoints" / "best.pt"
    payload = safe_load(teacher_path)
    payload["state_dict"]["bn1.running_var"] = torch.full_like(payload["state_dict"]["bn1.running_var"], float("inf"))
    atomic_save(payload, tmp_path / "nan-teacher.pt")
    kd = {"method": {"name": "kd"}, "teacher": {"name": "resnet8", "checkpoint": str(tmp_path / "nan-teacher.pt")}}
    with pytest.raises(CheckpointError, match="bn1.running_var holds NaN/Inf; it was saved by a run that diverged"):
        run(build_config(None, None, {**tiny_overrides, **kd}), echo=False)

    forward = CrossEntropy.forward

    def nan_loss(self, images, labels, step):
        out = forward(self, images, labels, step)
        return type(out)({k: v * float("nan") for k, v in out.losses.items()}, out.logits)

    monkeypatch.setattr(CrossEntropy, "forward", nan_loss)
    with pytest.raises(NonFiniteLossError, match="every step of epoch 1 .* was NaN/Inf and skipped"):
        run(_cfg(tiny_overrides, name="all-skipped", train={"nonfinite": "skip"}), echo=False)


class _Killed(BaseException):
    """SIGKILL at this exact point: nothing after it runs (not even except clauses that expect Exception)."""


def test_a_kill_while_metrics_jsonl_is_trimmed_on_resume_loses_no_epoch(tiny_overrides, monkeypatch):
    """Finding 6: MetricsLog rewrote metrics.jsonl in place on every resume; a kill there lost epochs for good."""
    from gapkd.api import run, run_dir_for
    from gapkd.engine import checkpoint, runlog

    cfg = _cfg(tiny_overrides, name="m", train={"epochs": 3})
    run(cfg, echo=False)
    path = run_dir_for(cfg) / "metrics.jsonl"
    whole = path.read_text()
    real_replace = checkpoint.os.replace

    def killed_at_the_rename(source, target):
        if str(target).endswith("metrics.jsonl"):
            raise _Killed()
        return real_replace(source, target)

    monkeypatch.setattr(checkpoint.os, "replace", killed_at_the_rename)
    with pytest.raises(_Killed):
        runlog.MetricsLog(path, keep_epochs=1)  # a resume after epoch 1 trims the later lines
    assert path.read_text() == whole  # the old file, whole
    monkeypatch.undo()
    runlog.MetricsLog(path, keep_epochs=1)
    assert len(path.read_text().splitlines()) == 1


def test_torn_summary_and_teacher_accuracy_files_are_recomputed_not_fatal(tiny_overrides):
    """Finding 6: a summary.json or teacher_acc.json torn by a kill made every rerun crash with JSONDecodeError."""
    import json

    from gapkd.api import run, run_dir_for

    teacher = run(_cfg(tiny_overrides, name="t", train={"epochs": 1}), echo=False)
    kd = {"method": {"name": "kd"}, "name": "kd", "train": {"epochs": 1},
          "teacher": {"name": "resnet8", "checkpoint": str(run_dir_for(_cfg(tiny_overrides, name="t")) / "checkpoints" / "best.pt")}}
    cfg = _cfg(tiny_overrides, **kd)
    finished = run(cfg, echo=False)
    assert teacher["run"] == "t" and "teacher_test_acc" in finished
    run_dir = run_dir_for(cfg)
    for name in ("summary.json", "teacher_acc.json"):
        text = (run_dir / name).read_text()
        (run_dir / name).write_text(text[: len(text) // 2])  # torn mid-write by an old version
    again = run(cfg, echo=False)
    assert again["teacher_test_acc"] == finished["teacher_test_acc"] and again["best_val_acc"] == finished["best_val_acc"]
    assert json.loads((run_dir / "summary.json").read_text()) == again
