"""Data-parallel training (DDP) on CPU: 2 processes with gloo, started as torchrun would start
them (WORLD_SIZE / RANK / LOCAL_RANK / MASTER_ADDR / MASTER_PORT), through gapkd.api.run.

Checked: the loader's shards are disjoint and make up each global batch exactly (augmentation
included); the processes trained on exactly those shards; only rank 0 wrote into the run
directory (an audit hook records every file the other rank opened for writing); the final
weights match a single-process run with the same global batch; a run interrupted mid-epoch (every
process stopped at the same step, as Ctrl-C under torchrun does) resumes under 2 processes
bit-identically, and its DDP checkpoint also resumes in a single process. CRD (memory banks,
negatives and normalisation over the global batch): 2 processes match one in weights and banks,
the processes' banks agree bit for bit at every step, and its 2-process resume is exact."""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from gapkd.api import evaluate_checkpoint, run, run_dir_for
from gapkd.config import build_config
from gapkd.data.core import make_split
from gapkd.data.loader import DeviceLoader, Normalizer
from gapkd.engine import distributed
from gapkd.engine.checkpoint import safe_load
from gapkd.errors import ConfigError
from gapkd.methods import METHODS, StepInfo, TaskInfo
from gapkd.methods.crd import CRD
from gapkd.methods.kd import KD
from gapkd.models import MODELS, create_model
from gapkd.models.base import StagedNet
from gapkd.models.registry import ModelEntry

WORLD = 2
PLAIN_NET = "plainnet_test"  # a small CNN without BatchNorm: its update depends on no batch statistics


class PlainNet(StagedNet):
    """conv -> ReLU stages, global pooling, linear: a StagedNet without normalisation layers."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__(num_classes, in_channels, [8, 16])
        self.stem = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.stage1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(16, num_classes)
        self.set_stages(self.stage1, self.stage2)

    def forward_stem(self, x):
        return torch.relu(self.stem(x))

    @property
    def classifier(self):
        return self.fc


class RecordingKD(KD):
    """KD that remembers the sample ids of every step (what this process trained on)."""

    seen: list = []

    def forward(self, images, labels, step):
        RecordingKD.seen.append((step.step, step.indices.tolist()))
        return super().forward(images, labels, step)


class RecordingCRD(CRD):
    """CRD that remembers, after every step, the step's sample ids and both memory banks of this process."""

    def forward(self, images, labels, step):
        out = super().forward(images, labels, step)
        RecordingKD.seen.append((step.step, step.indices.tolist()))
        RecordingCRD.banks.append((step.step, self.memory_student.clone(), self.memory_teacher.clone()))
        return out

    banks: list = []


def _register(setitem=lambda mapping, key, value: mapping.__setitem__(key, value)) -> None:
    """Add the plain net and the recording methods to the registries (the tests undo it through monkeypatch)."""
    setitem(MODELS._entries, PLAIN_NET, ModelEntry(PlainNet, 8, "test"))
    setitem(MODELS._aliases, PLAIN_NET, PLAIN_NET)
    for name, method in (("kd-recording", RecordingKD), ("crd-recording", RecordingCRD)):
        setitem(METHODS._entries, name, method)
        setitem(METHODS._aliases, name, name)


def _overrides(out_dir: Path, teacher: Path, name: str, epochs: int = 3) -> dict:
    """KD from a BatchNorm teacher (frozen, eval mode) into the plain net. 301 training samples make an
    uneven last global batch (45 = 23 + 22 over two processes), and the 33 validation samples an uneven
    evaluation batch (17 + 16)."""
    return {
        "name": name, "out_dir": str(out_dir),
        "data": {"name": "digits", "batch_size": 64, "eval_batch_size": 100, "train_subset": 301,
                 "augment": {"crop_padding": 1, "flip": True}},
        "student": {"name": PLAIN_NET}, "teacher": {"name": "resnet8", "checkpoint": str(teacher)},
        "method": {"name": "kd-recording"},
        "optim": {"name": "adamw", "lr": 0.01}, "schedule": {"name": "cosine"},
        "train": {"epochs": epochs, "device": "cpu", "log_every": 1000, "amp": "off"},  # fp32: compared at fp32 rounding
    }


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _audit_writes(root: str, record: list) -> None:
    """Record every file or folder under ``root`` this process opens for writing, creates, renames or deletes."""
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & write_flags)
            paths = [path] if writing else []
        elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree"):
            paths = [args[0]]
        elif event in ("os.rename", "os.replace"):
            paths = [args[0], args[1]]
        else:
            return
        record.extend(str(p) for p in paths if isinstance(p, (str, os.PathLike)) and str(p).startswith(root))

    sys.addaudithook(hook)


class Interrupted(Exception):
    """Stands for Ctrl-C / a kill reaching every process of the job at the same step."""


def _interrupt_at(epoch_index: int, step: int):
    """A DeviceLoader.epoch that stops training before ``step`` of epoch ``epoch_index`` (0-based)."""
    real_epoch = DeviceLoader.epoch

    def epoch(self, epoch=0):
        for index, batch in enumerate(real_epoch(self, epoch)):
            if self.train and epoch == epoch_index and index == step:
                raise Interrupted
            yield batch

    return epoch


def _worker(rank: int, port: int, jobs: list[dict], report: str) -> None:
    """One process of a 2-process job, set up as torchrun sets one up. Each job runs ``overrides``;
    with ``interrupt=(epoch, step)`` every process stops there, and rank 0 then copies the run
    directory to ``copy_to`` (to resume it in one process later)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    _register()
    writes: list[str] = []
    if rank > 0:
        _audit_writes(jobs[0]["overrides"]["out_dir"], writes)
    for job in jobs:
        cfg = build_config(job["overrides"])
        RecordingKD.seen, RecordingCRD.banks = [], []
        if job.get("interrupt"):
            real_epoch, DeviceLoader.epoch = DeviceLoader.epoch, _interrupt_at(*job["interrupt"])
            try:
                with pytest.raises(Interrupted):
                    run(cfg, echo=False)
            finally:
                DeviceLoader.epoch = real_epoch
            if rank == 0:
                shutil.copytree(run_dir_for(cfg), job["copy_to"])
            distributed.current().barrier()
            continue
        summary = run(cfg, echo=False)
        torch.save({"summary": summary, "seen": RecordingKD.seen, "banks": RecordingCRD.banks, "writes": list(writes)},
                   f"{report}.{cfg.name}.rank{rank}.pt")


def _launch(jobs: list[dict], report: Path) -> None:
    mp.start_processes(_worker, args=(_free_port(), jobs, str(report)), nprocs=WORLD, join=True, start_method="spawn")


def _weights(run_dir: Path) -> dict:
    return safe_load(run_dir / "checkpoints" / "last.pt")["state_dict"]


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setattr(RecordingKD, "seen", [])
    monkeypatch.setattr(RecordingCRD, "banks", [])
    _register(monkeypatch.setitem)


@pytest.fixture
def teacher(tmp_path, tiny_overrides) -> Path:
    cfg = build_config(tiny_overrides, overrides=["name=teacher", "train.epochs=1", "data.batch_size=128"])
    run(cfg, echo=False)
    return run_dir_for(cfg) / "checkpoints" / "best.pt"


# ---------------------------------------------------------------- in one process
def test_shards_are_disjoint_and_make_up_each_global_batch_exactly():
    split = make_split(np.random.default_rng(0).integers(0, 255, (37, 3, 6, 6), dtype=np.uint8), np.arange(37) % 5)
    normalizer = Normalizer((0.5,) * 3, (0.5,) * 3, torch.device("cpu"))
    for train, world in [(True, 2), (True, 3), (False, 2), (False, 4)]:
        whole = DeviceLoader(split, 12, normalizer, torch.device("cpu"), train=train, seed=3, crop_padding=2, flip=True)
        shards = [whole.shard(rank, world) for rank in range(world)]
        assert len({len(s) for s in shards}) == 1  # every process makes the same number of steps
        batches = list(whole.epoch(5))
        parts = list(zip(*(s.epoch(5) for s in shards)))
        # 37 = 3 x 12 + 1: a training loader drops the last single sample (fewer than processes); evaluation keeps it
        assert len(parts) == (3 if train else 4) and len(batches) == 4
        for batch, slices in zip(batches, parts):
            for field in ("images", "labels", "indices"):
                assert torch.equal(torch.cat([getattr(s, field) for s in slices]), getattr(batch, field)), field
            sizes = [s.labels.numel() for s in slices]
            assert max(sizes) - min(sizes) <= 1
            if train:  # weighted slice means, averaged over processes, have the gradient of the batch mean
                probe = torch.linspace(-1, 1, batch.images[0].numel(), requires_grad=True)
                loss = lambda b: (b.images.flatten(1) @ probe).square().mean()  # noqa: E731
                whole_grad, = torch.autograd.grad(loss(batch), probe)
                averaged = sum(torch.autograd.grad(loss(s) * s.weight, probe)[0] for s in slices) / world
                torch.testing.assert_close(averaged, whole_grad)


def test_batch_size_must_split_evenly_and_methods_can_refuse_ddp():
    two = distributed.Distributed(rank=0, world_size=2)
    distributed.check_batch_size(64, two)
    with pytest.raises(ConfigError, match="data.batch_size=65 is the global batch.*multiple of 2"):
        distributed.check_batch_size(65, two)
    make = lambda: create_model("resnet8", num_classes=10, in_channels=1)  # noqa: E731
    task = TaskInfo(10, 1, 8, 20, torch.arange(20), torch.arange(20) % 10)
    distributed.check_supported(METHODS.get("crd")(make(), make(), task=task, num_negatives=4))  # CRD trains under DDP

    class Unsynchronised(KD):
        supports_ddp = False

    refused = Unsynchronised(make(), make())
    with pytest.raises(ConfigError, match="Unsynchronised keeps per-sample state"):
        distributed.wrap(refused, two, torch.device("cpu"))
    assert distributed.wrap(refused, distributed.SINGLE, torch.device("cpu")) is refused  # a single process needs nothing


def test_all_gather_in_one_process_is_the_tensor_itself():
    x = torch.arange(6).reshape(3, 2)
    assert distributed.all_gather(x, distributed.SINGLE) == [x]


def test_on_gpus_every_trainable_batchnorm_becomes_syncbatchnorm_in_place():
    """Converted object by object, so that the BatchNorm layers StagedNet's stage chains also hold
    (WRN's final bn1) are synchronised too; the frozen teacher's stay as they are."""
    student, teacher = create_model("wrn_16_1", num_classes=10), create_model("wrn_16_1", num_classes=10)
    distiller = KD(student, teacher).eval()
    images = torch.randn(2, 3, 32, 32)
    keys, logits = list(distiller.state_dict()), student(images)
    distributed.convert_batchnorm(distiller, distributed.frozen_names(distiller))
    batchnorms = lambda modules: [m for m in modules if isinstance(m, nn.modules.batchnorm._BatchNorm)]  # noqa: E731
    in_stages = batchnorms(m for stage in student.stages for m in stage.modules())
    assert in_stages and all(isinstance(m, nn.SyncBatchNorm) for m in batchnorms(student.modules()) + in_stages)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in teacher.modules())
    assert list(distiller.state_dict()) == keys and torch.equal(student(images), logits)


def test_under_torchrun_the_cli_runs_only_train_and_distill(monkeypatch, capsys):
    from gapkd.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["list", "models"]) == 2
    assert "only `gapkd train` and `gapkd distill` run under torchrun" in capsys.readouterr().err


@pytest.mark.parametrize("name", [m for m in METHODS.names() if METHODS.get(m).supports_ddp])
def test_every_trainable_parameter_gets_a_gradient_each_step(name):
    """DDP runs without find_unused_parameters: a parameter that needs a gradient but gets none in a
    step would stop the job, so every method must use all of them at every step."""
    torch.manual_seed(0)
    task = TaskInfo(10, 1, 8, 16, torch.arange(16), torch.arange(16) % 10)
    make = lambda: create_model("resnet8", num_classes=10, in_channels=1)  # noqa: E731
    cls = METHODS.get(name)
    extra = {"reference": make()} if name == "aid-adapt" else {}
    distiller = cls(make(), make() if cls.needs_teacher else None, task=task, **extra).train()
    for epoch in (0, 9):  # early and late: warm-ups and schedules inside methods
        distiller.zero_grad(set_to_none=True)
        strong = torch.randn(6, 1, 8, 8) if getattr(cls, "needs_strong_view", False) else None  # mlkd's second view
        out = distiller(torch.randn(6, 1, 8, 8), torch.arange(6), StepInfo(epoch, epoch * 4, 10, 4, torch.arange(6), strong))
        sum(out.losses.values()).backward()
        unused = [n for n, p in distiller.named_parameters() if p.requires_grad and p.grad is None]
        assert unused == [], f"{name}: {unused[:5]}"


# ---------------------------------------------------------------- two processes
# DDP sums the two processes' gradients in another order than one process sums the batch: the
# weights agree to float32 rounding (measured: at most 1e-7 apart after 15 AdamW steps), while
# they move by more than 1e-3 in the last epoch alone; dropping Batch.weight breaks this tolerance.
CLOSE = {"rtol": 1e-5, "atol": 1e-6}


def test_two_processes_match_one_write_once_and_resume(tmp_path, teacher, registered):
    out = tmp_path / "ddp"
    report = tmp_path / "report"
    straight, interrupted = _overrides(out, teacher, "straight"), _overrides(out, teacher, "interrupted")
    batchnorm = _overrides(out, teacher, "batchnorm", epochs=1)
    batchnorm["student"]["name"] = "resnet8"
    _launch([
        {"overrides": straight},
        {"overrides": batchnorm},
        {"overrides": interrupted, "interrupt": (2, 2), "copy_to": str(out / "resumed-alone")},  # stops in epoch 3
        {"overrides": interrupted},  # the same command again resumes it
    ], report)
    saved = out / "resumed-alone"  # the interrupted run as it was left
    assert safe_load(saved / "checkpoints" / "state.pt")["epoch"] == 2 and not (saved / "summary.json").exists()

    # one process, the same global batch
    single = build_config(_overrides(tmp_path / "single", teacher, "single"))
    run(single, echo=False)
    single_seen = dict(RecordingKD.seen)

    straight_dir = run_dir_for(build_config(straight))
    ranks = [torch.load(f"{report}.straight.rank{r}.pt") for r in range(WORLD)]
    # shards: each step's slices are disjoint and together are the single-process batch
    steps = [dict(r["seen"]) for r in ranks]
    assert steps[0].keys() == steps[1].keys() == single_seen.keys() and len(single_seen) == 3 * 5
    for step, ids in single_seen.items():
        assert not set(steps[0][step]) & set(steps[1][step])
        assert steps[0][step] + steps[1][step] == ids
    # only rank 0 wrote; every process returned rank 0's summary
    assert torch.load(f"{report}.interrupted.rank1.pt")["writes"] == []  # over all four runs
    assert ranks[0]["summary"] == ranks[1]["summary"] == json.loads((straight_dir / "summary.json").read_text())
    assert len((straight_dir / "metrics.jsonl").read_text().splitlines()) == 3
    assert json.loads((straight_dir / "env.json").read_text())["distributed"] == {"world_size": 2, "backend": "gloo"}

    # the same result as one process
    a, b = _weights(straight_dir), _weights(run_dir_for(single))
    epoch2 = {k.removeprefix("student."): v for k, v in safe_load(saved / "checkpoints" / "state.pt")["model"].items()}
    assert a.keys() == b.keys() == epoch2.keys()
    assert max(float((a[k] - epoch2[k]).abs().max()) for k in a) > 1e-3
    for key in a:
        torch.testing.assert_close(a[key], b[key], **CLOSE)
    ddp_metrics, single_metrics = ([json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
                                   for d in (straight_dir, run_dir_for(single)))
    for x, y in zip(ddp_metrics, single_metrics, strict=True):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-5)
        assert (x["train_acc"], x["val_acc"], x["test_acc"]) == (y["train_acc"], y["val_acc"], y["test_acc"])

    # with BatchNorm (statistics per process on CPU), the accuracies logged from the sharded evaluation
    # are those of the saved model: the processes' running statistics were made to agree before it
    bn_dir = run_dir_for(build_config(batchnorm))
    bn_summary = json.loads((bn_dir / "summary.json").read_text())
    alone = evaluate_checkpoint(bn_dir / "checkpoints" / "last.pt", build_config(batchnorm).data, device="cpu", amp="off")
    assert (alone["val_acc"], alone["test_acc"]) == (bn_summary["last_val_acc"], bn_summary["last_test_acc"])

    # resume under 2 processes is exact; a DDP checkpoint also resumes in one process (no `module.` keys)
    resumed = run_dir_for(build_config(interrupted))
    assert "resuming interrupted after epoch 2/3" in (resumed / "train.log").read_text()
    assert [json.loads(x)["epoch"] for x in (resumed / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    c = _weights(resumed)
    assert all(torch.equal(a[k], c[k]) for k in a)
    assert run(build_config(_overrides(out, teacher, "resumed-alone")), echo=False)["epochs"] == 3
    d = _weights(saved)
    for key in a:
        torch.testing.assert_close(a[key], d[key], **CLOSE)


def _crd_overrides(out_dir: Path, teacher: Path, name: str) -> dict:
    """CRD (with KD) into the plain net, 2 epochs of 5 steps; each epoch's last global batch splits unevenly."""
    overrides = _overrides(out_dir, teacher, name, epochs=2)
    overrides["method"] = {"name": "crd-recording", "num_negatives": 64, "feature_dim": 16, "kd_weight": 0.5}
    return overrides


def test_crd_two_processes_match_one_and_resume_exactly(tmp_path, teacher, registered):
    """CRD's memory banks, negatives and normalisation follow the global batch: 2 processes train
    as one does (weights and banks equal to float rounding, the two processes' banks bit-identical
    at every step), and an interrupted 2-process run resumes bit-identically."""
    out, report = tmp_path / "ddp", tmp_path / "report"
    straight, interrupted = _crd_overrides(out, teacher, "crd-straight"), _crd_overrides(out, teacher, "crd-interrupted")
    _launch([
        {"overrides": straight},
        {"overrides": interrupted, "interrupt": (1, 2), "copy_to": str(out / "crd-left")},  # stops in epoch 2
        {"overrides": interrupted},  # resumes it
    ], report)
    single = build_config(_crd_overrides(tmp_path / "single", teacher, "crd-single"))
    run(single, echo=False)
    single_banks = RecordingCRD.banks

    ranks = [torch.load(f"{report}.crd-straight.rank{r}.pt") for r in range(WORLD)]
    assert len(single_banks) == len(ranks[0]["banks"]) == len(ranks[1]["banks"]) == 2 * 5
    last = [len(dict(r["seen"])[4]) for r in ranks]
    assert last[0] == last[1] + 1  # the last global batch of an epoch splits unevenly (22 + 21)
    for (step, s0, t0), (_, s1, t1), (single_step, s, t) in zip(ranks[0]["banks"], ranks[1]["banks"], single_banks):
        assert step == single_step
        assert torch.equal(s0, s1) and torch.equal(t0, t1)  # every process holds the same banks
        torch.testing.assert_close(s0, s, **CLOSE)
        torch.testing.assert_close(t0, t, **CLOSE)

    a = safe_load(run_dir_for(build_config(straight)) / "checkpoints" / "state.pt")["model"]
    b = safe_load(run_dir_for(single) / "checkpoints" / "state.pt")["model"]
    left = safe_load(out / "crd-left" / "checkpoints" / "state.pt")
    assert left["epoch"] == 1 and a.keys() == b.keys() == left["model"].keys()
    assert {"memory_student", "memory_teacher", "normalizers"} <= a.keys()
    assert max(float((a[k] - left["model"][k]).abs().max()) for k in a) > 1e-3  # the last epoch moved them
    for key in a:
        torch.testing.assert_close(a[key], b[key], **CLOSE)

    c = safe_load(run_dir_for(build_config(interrupted)) / "checkpoints" / "state.pt")["model"]
    assert "resuming crd-interrupted after epoch 1/2" in (run_dir_for(build_config(interrupted)) / "train.log").read_text()
    assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a)
