"""Issue 21's adversarial probe, scripted: bad inputs a hostile or careless user would try, each run as
a `gapkd` command in a fresh process on digits or small generated image folders, classified as

- clear: exit 2, one `gapkd ...: error:` line containing what the case expects (the problem and its fix);
- unclear: a refusal without a traceback whose message lacks that;
- traceback: a Python traceback reached the user;
- silent: exit 0 where a refusal was due (or, for the cases that must succeed, a failure);
- lost / executed: a file the user owned was deleted, or a plugin's code ran unasked.

    python benchmarks/adversarial_probe.py --out probe.json        # about 3 minutes on 2 CPU cores

Cases that must succeed (bf16 resnet18 ImageNet-stem, a training piped into `head`) count as `ok`
when they do. The probe is a smaller set than the issue's 137 inputs: one or more per finding, and
a few of the classic ones (typos, impossible values, malicious YAML) that held before.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
QUICK = ["student.name=resnet8", "data.name=digits", "train.epochs=1", "train.amp=off", "train.device=cpu"]


def gapkd(argv, cwd, env_extra=None, pipe_head=False, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    command = [sys.executable, "-m", "gapkd.cli", *argv]
    if pipe_head:  # `gapkd ... | head -1`: read one line, then close the pipe
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        proc.stdout.readline()
        proc.stdout.close()
        _, err = proc.communicate(timeout=timeout)
        return proc.returncode, "", err.decode()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stdout, done.stderr


def image_tree(root: Path, classes=("a", "b", "c"), per_class=12):
    sys.path.insert(0, str(SRC))
    from gapkd.testing import write_image

    for split in ("train", "test"):
        for index, cls in enumerate(classes):
            for i in range(per_class):
                write_image(root / split / cls / f"{i}.png", seed=100 * index + i, size=(8, 8), mode="L")
    return root


def cases(work: Path):
    """(name, finding, setup() -> argv, expected fragment or None for 'must succeed', check() -> lost/executed note)."""
    canary = work / "EXECUTED"
    evil = work / "evil.py"
    evil.write_text(f"open({str(canary)!r}, 'w').write('ran')\n")
    recipe = work / "recipe.yaml"
    recipe.write_text(f"plugins: [{evil}]\nstudent: {{name: resnet8}}\ndata: {{name: digits}}\ntrain: {{epochs: 1, amp: 'off'}}\n")
    study = work / "study.yaml"
    study.write_text(f"name: s\nbase: {{plugins: [{evil}], data: {{name: digits}}}}\npairs: [{{student: resnet8}}]\n"
                     "methods: {scratch: {name: ce}}\n")
    executed = lambda: "executed" if canary.exists() else None  # noqa: E731

    def victim():
        (work / "runs" / "victim").mkdir(parents=True, exist_ok=True)
        (work / "runs" / "victim" / "thesis.txt").write_text("precious\n")
        return ["train", *QUICK, f"out_dir={work / 'runs'}", "name=victim", "--overwrite"]

    def sibling_kept():
        return None if (work / "runs" / "victim" / "thesis.txt").is_file() else "lost"

    def trained(name):
        run_dir = work / "runs" / name
        if not (run_dir / "summary.json").is_file():
            gapkd(["train", *QUICK, f"out_dir={work / 'runs'}", f"name={name}", "--quiet"], work)
        return run_dir

    def export_with_plugin():
        run_dir = trained("exported")
        import yaml

        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        config["plugins"] = [str(evil)]  # (a line put in front would lose to the file's own `plugins: []`)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
        return ["export", str(run_dir), "--format", "torchscript"]

    def cut_tar():
        root = image_tree(work / "tartree")
        whole = work / "tree.tar"
        with tarfile.open(whole, "w") as tar:
            tar.add(root, arcname=".")
        with tarfile.open(whole) as tar:
            offset = next(m for m in tar.getmembers() if m.name.endswith("train/c/0.png")).offset
        cut = work / "cut.tar"
        cut.write_bytes(whole.read_bytes()[:offset])
        return ["train", *QUICK[:1], "data.name=image-folder", f"data.path={cut}", "train.epochs=1", "train.amp=off",
                f"out_dir={work / 'runs'}", "name=cut"]

    def cache_change():
        root = image_tree(work / "cachetree", classes=("a", "b"))
        gapkd(["data", "check", "data.name=image-folder", f"data.path={root}"], work)
        stat = root.stat()
        image_tree(root, classes=("c",))
        os.utime(root, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        return ["data", "check", "data.name=image-folder", f"data.path={root}", "--json", str(work / "cache.json")]

    def cache_check():
        report = json.loads((work / "cache.json").read_text()) if (work / "cache.json").is_file() else {}
        classes = report.get("splits", {}).get("train", {}).get("classes")
        return None if classes == 3 else f"stale cache: {classes} classes"

    def corrupt_db():
        (work / "sdir").mkdir(exist_ok=True)
        (work / "sdir" / "results.sqlite").write_bytes(b"not a database" * 100)
        plain = work / "plain-study.yaml"
        plain.write_text("name: s\nbase: {data: {name: digits}}\npairs: [{student: resnet8}]\nmethods: {scratch: {name: ce}}\n")
        return ["study", "status", str(plain), "--dir", str(work / "sdir")]

    def checkpoint_file(name, payload):
        path = work / name
        path.write_bytes(payload)
        return ["eval", str(path), "data.name=digits"]

    def nan_teacher():
        run_dir = trained("teacher")
        sys.path.insert(0, str(SRC))
        import torch

        from gapkd.engine.checkpoint import atomic_save, safe_load

        payload = safe_load(run_dir / "checkpoints" / "best.pt")
        payload["state_dict"]["bn1.running_var"].fill_(float("inf"))
        atomic_save(payload, work / "nan-teacher.pt")
        del torch
        return ["distill", *QUICK, "teacher.name=resnet8", f"teacher.checkpoint={work / 'nan-teacher.pt'}", "train.nonfinite=skip",
                f"out_dir={work / 'runs'}", "name=nan-teacher"]

    def other_classes():
        run_dir = trained("ten")
        image_tree(work / "two", classes=("a", "b"))
        return ["eval", str(run_dir / "checkpoints" / "best.pt"), "data.name=image-folder", f"data.path={work / 'two'}"]

    def modes():
        run_dir = trained("modes")
        wanted = (run_dir / "config.yaml").stat().st_mode & 0o777
        odd = [p.name for p in (run_dir / "summary.json", *(run_dir / "checkpoints").glob("*.pt")) if p.stat().st_mode & 0o777 != wanted]
        return None if not odd else f"modes differ: {odd}"

    def piped_check():
        summary = work / "runs" / "piped" / "summary.json"
        return None if summary.is_file() and json.loads(summary.read_text())["epochs"] == 3 else "training stopped"

    live = {}

    def second_process():
        env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
        live["first"] = subprocess.Popen([sys.executable, "-m", "gapkd.cli", "train", *QUICK, "train.epochs=500", f"out_dir={work / 'runs'}",
                                          "name=shared", "--quiet"], cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while not (work / "runs" / "shared" / "metrics.jsonl").is_file() and time.time() < deadline:
            time.sleep(0.2)
        return ["train", *QUICK, "train.epochs=500", "optim.lr=0.2", f"out_dir={work / 'runs'}", "name=shared"]

    def stop_first():
        live["first"].kill()
        live["first"].wait()
        return None

    yield "overwrite a folder that is not a run", 1, victim, "refuses to delete", sibling_kept
    yield "second process on a live run (other lr)", 2, second_process, "in use by another gapkd process", stop_first
    yield "name=. --overwrite", 1, lambda: ["train", *QUICK, f"out_dir={work / 'runs'}", "name=.", "--overwrite"], "one folder name", sibling_kept
    yield "name=../../x", 1, lambda: ["train", *QUICK, f"out_dir={work / 'runs'}", "name=../../x"], "one folder name", \
        lambda: "written outside out_dir" if (work.parent / "x").exists() else None
    yield "lr=1e6 (divergence)", 3, lambda: ["train", *QUICK, "optim.lr=1e6", "train.epochs=3", f"out_dir={work / 'runs'}", "name=lr"], "NaN/Inf", None
    yield "lr=1e38 with grad_clip", 3, lambda: ["train", *QUICK, "optim.lr=1e38", "train.grad_clip=1", "train.epochs=3",
                                              f"out_dir={work / 'runs'}", "name=lr38"], "NaN/Inf", None
    yield "NaN teacher, nonfinite=skip", 3, nan_teacher, "holds NaN/Inf", None
    yield "recipe listing a plugin (train -c)", 4, lambda: ["train", "-c", str(recipe), f"out_dir={work / 'runs'}"], "runs their Python code", executed
    yield "study status of a study with plugins", 4, lambda: ["study", "status", str(study), "--dir", str(work / "s1")], "runs their Python code", executed
    yield "study run --dry-run with plugins", 4, lambda: ["study", "run", str(study), "--dir", str(work / "s1"), "--dry-run"], \
        "runs their Python code", executed
    yield "export of a run folder with plugins", 4, export_with_plugin, "runs their Python code", executed
    yield "image-folder: class added inside train/ (data check)", 5, cache_change, None, cache_check
    yield "uncompressed tar cut at a member boundary", 9, cut_tar, "truncated", None
    yield "one-class folder", 9, lambda: ["train", *QUICK[:1], "data.name=image-folder", f"data.path={image_tree(work / 'one', ('a',))}",
                                          "train.epochs=1", "train.amp=off", f"out_dir={work / 'runs'}"], "one class folder", None
    yield "data.train_subset=5", 9, lambda: ["train", *QUICK, "data.train_subset=5", f"out_dir={work / 'runs'}"], "leaves no validation image", None
    yield "0-byte checkpoint", 8, lambda: checkpoint_file("zero.pt", b""), "is empty", None
    yield "random bytes as checkpoint", 10, lambda: checkpoint_file("random.pt", os.urandom(4096)), "not a PyTorch checkpoint", None
    yield "text file as checkpoint", 8, lambda: checkpoint_file("text.pt", b"hello\n"), "not a PyTorch checkpoint", None
    yield "folder as checkpoint", 10, lambda: ["eval", str(work), "data.name=digits"], "is a folder", None
    yield "folder as -c", 10, lambda: ["train", "-c", str(work)], "is a folder", None
    yield "train.device=tpu", 8, lambda: ["train", *QUICK, "train.device=tpu", f"out_dir={work / 'runs'}"], "train.device=tpu", None
    yield "a file where out_dir should be", 8, lambda: ["train", *QUICK, f"out_dir={recipe}"], "error:", None
    yield "damaged results.sqlite", 8, corrupt_db, "is damaged", None
    yield "study report without matplotlib", 8, lambda: ["study", "report", str(work / "plain-study.yaml"), "--dir", str(work / "s2")], \
        "needs matplotlib", None
    yield "eval on a dataset with other classes", 10, other_classes, "dataset it was trained for", None
    yield "unknown method (classic)", 0, lambda: ["train", *QUICK, "method.name=kdd"], "Did you mean", None
    yield "config key typo (classic)", 0, lambda: ["train", *QUICK, "optim.lrr=0.1"], "optim.lrr", None
    yield "negative lr (classic)", 0, lambda: ["train", *QUICK, "optim.lr=-1"], "optim.lr", None
    yield "python tag in YAML (classic)", 0, lambda: (work / "tag.yaml").write_text("seed: !!python/object/apply:os.system ['touch "
                                                                                      f"{canary}']\n") and ["train", "-c", str(work / "tag.yaml")], \
        "safe loading refuses", executed
    yield "resnet18 ImageNet stem in bf16 (must train)", 7, lambda: ["train", "student.name=resnet18", "student.options.stem=imagenet",
                                                                    "data.name=digits", "data.train_subset=128", "data.batch_size=32",
                                                                    "data.drop_last=true", "train.amp=bf16", "train.grad_clip=1",
                                                                    "train.epochs=1", f"out_dir={work / 'runs'}", "name=r18", "--quiet"], None, None
    yield "gapkd train | head -1 (must train on)", 10, lambda: ["train", *QUICK, "train.epochs=3", "data.train_subset=300",
                                                                f"out_dir={work / 'runs'}", "name=piped"], None, piped_check
    yield "run files' modes", 10, lambda: ["list", "models"], None, modes


def classify(code, err, expected):
    if "Traceback" in err:
        return "traceback"
    if expected is None:
        return "ok" if code == 0 else "silent"  # a case that must succeed and did not: counted with the silent ones
    if code == 0:
        return "silent"
    lines = [line for line in err.strip().splitlines() if line.strip() and "Warning" not in line and "warnings.warn" not in line
             and not line.startswith("  ")]
    return "clear" if expected in err and len(lines) == 1 and ": error:" in lines[0] else "unclear"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=None, help="scratch folder (default: a new temporary one)")
    parser.add_argument("--out", help="write the per-case results and counts as JSON")
    args = parser.parse_args()
    import tempfile

    work = Path(args.work or tempfile.mkdtemp(prefix="gapkd-probe-")).resolve() / "probe"
    work.mkdir(parents=True, exist_ok=True)
    results, counts = [], {}
    for name, finding, setup, expected, check in cases(work):
        started = time.time()
        argv = setup()
        env_extra = {"PYTHONPATH": f"{work / 'no-mpl'}{os.pathsep}{SRC}"} if "matplotlib" in name else None
        if env_extra:  # a matplotlib that cannot be imported, shadowing the installed one
            (work / "no-mpl" / "matplotlib").mkdir(parents=True, exist_ok=True)
            (work / "no-mpl" / "matplotlib" / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
        code, _, err = gapkd(argv, work, env_extra, pipe_head="head" in name)
        outcome = classify(code, err, expected)
        note = check() if check else None
        if note in ("lost", "executed"):
            outcome = note
        elif note:
            outcome = "silent"
        counts[outcome] = counts.get(outcome, 0) + 1
        message = next((line for line in err.splitlines() if ": error:" in line), err.strip().splitlines()[-1] if err.strip() else "")
        results.append({"case": name, "finding": finding, "exit": code, "outcome": outcome, "note": note, "message": message[:300],
                        "seconds": round(time.time() - started, 1)})
        print(f"{outcome:<9} [{finding:>2}] {name}: exit {code}  {message[:150]}", flush=True)
    counts["inputs"] = len(results)
    print(json.dumps(counts))
    if args.out:
        Path(args.out).write_text(json.dumps({"counts": counts, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
