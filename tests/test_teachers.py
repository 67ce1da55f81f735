"""gapkd teachers list|fetch|import: a stand-in teacher tarball served over 127.0.0.1 (no external
network): the happy path, a resumed download, unsafe archives, a checkpoint that does not fit its
architecture, and a file that changed after it was installed."""
from __future__ import annotations

import http.server
import io
import json
import tarfile
import threading

import pytest
import torch

from gapkd.cli import main
from gapkd.config import build_config
from gapkd.models import create_model, load_checkpoint
from gapkd.teachers import catalogue, store
from gapkd.teachers.store import TeacherError


class Server:
    """Serves files from a dict over HTTP on 127.0.0.1, with Range requests; ``cut`` makes the next
    full GET stop after that many bytes of the body (a dropped connection)."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.cut: int | None = None
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.lstrip("/")
                ranged = self.headers.get("Range")
                outer.requests.append((name, ranged))
                if name not in outer.files:
                    self.send_error(404)
                    return
                body, start = outer.files[name], 0
                if ranged:
                    start = int(ranged.split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if outer.cut is not None and not ranged:
                    self.wfile.write(body[:outer.cut])
                    outer.cut = None
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"


@pytest.fixture
def server():
    serving = Server()
    yield serving
    serving.httpd.shutdown()
    serving.httpd.server_close()


@pytest.fixture
def teacher_store(tmp_path, monkeypatch):
    root = tmp_path / "store"
    monkeypatch.setenv("GAPKD_TEACHERS", str(root))
    return root


def checkpoint_bytes(arch: str, num_classes: int = 100, in_channels: int = 3, seed: int = 0) -> bytes:
    """A RepDistiller/mdistiller-style checkpoint: {'epoch', 'model': state dict, 'accuracy'}."""
    torch.manual_seed(seed)
    buffer = io.BytesIO()
    model = create_model(arch, num_classes=num_classes, in_channels=in_channels)
    torch.save({"epoch": 240, "model": model.state_dict(), "accuracy": torch.tensor(70.0)}, buffer)
    return buffer.getvalue()


def tarball(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            archive.addfile(info)
    return buffer.getvalue()


def test_fetch_installs_a_published_layout_and_zoo_references_resolve(server, teacher_store, capsys):
    good = checkpoint_bytes("resnet56")
    server.files["cifar_teachers.tar"] = tarball({"cifar_teachers/resnet56_vanilla/ckpt_epoch_240.pth": good})
    assert main(["teachers", "fetch", "mdistiller", "--url", server.url("cifar_teachers.tar")]) == 0
    assert "installed zoo:mdistiller/resnet56 (resnet56, sha256" in capsys.readouterr().out
    path = store.resolve("zoo:mdistiller/resnet56")
    assert path.read_bytes() == good and path.parent == teacher_store / "mdistiller"
    manifest = json.loads((teacher_store / "mdistiller" / "manifest.json").read_text())["files"]
    assert manifest["resnet56"]["member"] == "cifar_teachers/resnet56_vanilla/ckpt_epoch_240.pth"
    assert not list((teacher_store / ".downloads").rglob("*.tar"))  # the archive is not kept once installed
    # the reference works where a checkpoint is accepted, and names its architecture
    model = load_checkpoint(create_model("resnet56", num_classes=100), "zoo:mdistiller/resnet56")
    expected = torch.load(io.BytesIO(good), weights_only=True)["model"]
    assert torch.equal(model.classifier.weight, expected["fc.weight"])
    cfg = build_config(None, None, ["method.name=kd", "student.name=resnet20", "teacher.checkpoint=zoo:mdistiller/resnet56"])
    assert cfg.teacher.name == "resnet56"
    with pytest.raises(Exception, match="is a resnet56, but name is 'resnet110'"):
        build_config(None, None, ["method.name=kd", "student.name=resnet20", "teacher.name=resnet110",
                                  "teacher.checkpoint=zoo:mdistiller/resnet56"])
    assert main(["teachers", "list", "--json"]) == 0
    rows = {r["reference"]: r for r in json.loads(capsys.readouterr().out)["teachers"]}
    assert rows["zoo:mdistiller/resnet56"]["state"] == "installed" and rows["zoo:mdistiller/resnet56"]["reported_acc"] == 72.34
    assert rows["zoo:mdistiller/resnet32x4"]["state"] == "not installed"


def test_an_interrupted_download_resumes_where_it_stopped(server, teacher_store):
    server.files["cifar_teachers.tar"] = body = tarball({"cifar_teachers/resnet56_vanilla/ckpt_epoch_240.pth": checkpoint_bytes("resnet56")})
    server.cut = len(body) // 3
    with pytest.raises(TeacherError, match=r"stopped after \d+ of \d+ bytes .*run the same command again to resume"):
        store.fetch("mdistiller", url=server.url("cifar_teachers.tar"), progress=False)
    part = teacher_store / ".downloads" / "mdistiller" / "cifar_teachers.tar.part"
    assert part.stat().st_size == len(body) // 3
    assert not (teacher_store / "mdistiller" / "manifest.json").exists()
    store.fetch("mdistiller", url=server.url("cifar_teachers.tar"), progress=False)
    assert server.requests[-1] == ("cifar_teachers.tar", f"bytes={len(body) // 3}-")  # only the rest was asked for
    assert store.resolve("zoo:mdistiller/resnet56").is_file() and not part.exists()


@pytest.mark.parametrize("bad", ["../escape.pth", "/abs/escape.pth", "link"])
def test_an_archive_with_members_outside_the_destination_is_refused_whole(server, teacher_store, tmp_path, bad):
    members = {"cifar_teachers/resnet56_vanilla/ckpt_epoch_240.pth": checkpoint_bytes("resnet56")}
    links = {}
    if bad == "link":
        links["cifar_teachers/resnet110_vanilla"] = "../../../outside"
    else:
        members[bad] = b"not a teacher"
    server.files["t.tar"] = tarball(members, links)
    with pytest.raises(TeacherError, match="was refused and nothing was extracted: members that would land outside"):
        store.fetch("mdistiller", url=server.url("t.tar"), progress=False)
    assert not (teacher_store / "mdistiller" / "manifest.json").exists()
    assert not list(teacher_store.rglob("*.pth"))  # nothing extracted, not even the good member
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]  # nothing beside the store
    assert not (tmp_path.parent / "escape.pth").exists()


def test_a_checkpoint_that_does_not_fit_its_architecture_installs_nothing(server, teacher_store):
    server.files["t.tar"] = tarball({
        "cifar_teachers/resnet56_vanilla/ckpt_epoch_240.pth": checkpoint_bytes("resnet56"),
        "cifar_teachers/resnet110_vanilla/ckpt_epoch_240.pth": checkpoint_bytes("resnet20"),  # mislabelled
    })
    with pytest.raises(TeacherError, match=r"resnet110_vanilla/ckpt_epoch_240.pth is not a resnet110 checkpoint, so nothing "
                                           r"was installed: .*does not fit CifarResNet: missing keys"):
        store.fetch("mdistiller", url=server.url("t.tar"), progress=False)
    assert not (teacher_store / "mdistiller" / "manifest.json").exists()
    assert not list((teacher_store / "mdistiller").rglob("*.pth"))


def test_a_file_changed_after_installing_is_refused(tmp_path, teacher_store, capsys):
    folder = tmp_path / "save" / "models" / "resnet56_vanilla"  # RepDistiller's own layout, imported from a folder
    folder.mkdir(parents=True)
    (folder / "ckpt_epoch_240.pth").write_bytes(checkpoint_bytes("resnet56"))
    assert main(["teachers", "import", str(tmp_path / "save")]) == 0
    installed = store.resolve("zoo:mdistiller/resnet56")
    installed.write_bytes(checkpoint_bytes("resnet56", seed=1))  # same architecture, other weights
    with pytest.raises(TeacherError, match="changed after it was installed .* Install it again with gapkd teachers fetch mdistiller"):
        load_checkpoint(create_model("resnet56", num_classes=100), "zoo:mdistiller/resnet56")
    capsys.readouterr()
    assert main(["teachers", "list", "--verify", "--json"]) == 0
    rows = {r["reference"]: r["state"] for r in json.loads(capsys.readouterr().out)["teachers"]}
    assert rows["zoo:mdistiller/resnet56"] == "changed or missing"
    assert main(["eval", "zoo:mdistiller/resnet56", "data.name=digits"]) == 2
    assert "changed after it was installed" in capsys.readouterr().err


def test_clear_errors_for_unknown_and_uninstalled_teachers(teacher_store, tmp_path, capsys):
    with pytest.raises(TeacherError, match=r"zoo:mdistiller/resnet32x4 is not installed .*gapkd teachers fetch mdistiller"):
        store.resolve("zoo:mdistiller/resnet32x4")
    with pytest.raises(Exception, match="unknown teacher set 'mdistiler'. Did you mean 'mdistiller'"):
        store.resolve("zoo:mdistiler/resnet32x4")
    with pytest.raises(Exception, match="has no teacher 'resnet32x5'. Did you mean 'resnet32x4'"):
        store.resolve("zoo:mdistiller/resnet32x5")
    with pytest.raises(Exception, match="write zoo:SET/NAME"):
        store.resolve("zoo:resnet32x4")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "weights.pth").write_bytes(b"x")
    assert main(["teachers", "import", str(tmp_path / "junk")]) == 2
    assert "holds no file of a known teacher set" in capsys.readouterr().err


def test_a_set_published_file_by_file_checks_the_publishers_hash(server, teacher_store, monkeypatch, capsys):
    """A 10-class, 1-channel stand-in set, so the installed teacher also distils on digits."""
    weights = checkpoint_bytes("resnet14", num_classes=10, in_channels=1)
    import hashlib

    digest = hashlib.sha256(weights).hexdigest()
    good, bad = f"resnet14-{digest[:8]}.pth", "resnet8-00000000.pth"
    server.files[good] = weights
    server.files[bad] = checkpoint_bytes("resnet8", num_classes=10, in_channels=1)
    files = (catalogue.TeacherFile("resnet14", "resnet14", good, 10, None, url=server.url(good), sha256_prefix=digest[:8], in_channels=1),
             catalogue.TeacherFile("resnet8", "resnet8", bad, 10, None, url=server.url(bad), sha256_prefix="00000000", in_channels=1))
    monkeypatch.setitem(catalogue.CATALOGUE, "standin", catalogue.TeacherSet("standin", "stand-in", "digits", "here", "none", "flat", files))
    with pytest.raises(TeacherError, match="its sha256 starts .* but the publisher's name promises 00000000"):
        store.fetch("standin/resnet8", progress=False)
    store.fetch("standin/resnet14", progress=False)
    assert main(["eval", "zoo:standin/resnet14", "data.name=digits", "--json"]) == 0  # the catalogue names its architecture
    assert json.loads(capsys.readouterr().out)["model"] == "resnet14"
    cfg = build_config(None, None, ["method.name=kd", "student.name=resnet8", "teacher.checkpoint=zoo:standin/resnet14",
                                    "train.epochs=1", "train.device=cpu", "data.train_subset=200", f"out_dir={teacher_store.parent / 'runs'}"])
    from gapkd.api import run

    summary = run(cfg, echo=False)
    assert summary["epochs"] == 1 and 0 <= summary["teacher_test_acc"] <= 100
