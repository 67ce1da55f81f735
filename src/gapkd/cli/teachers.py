"""`gapkd teachers list|fetch|import`: the teacher store's subcommands (gapkd.teachers does the work)."""
from __future__ import annotations

import argparse
import json
import sys
import textwrap

EXAMPLES = """
    Installed teachers are named zoo:SET/NAME wherever a checkpoint is accepted
    (teacher.checkpoint=zoo:mdistiller/resnet32x4, gapkd eval zoo:mdistiller/resnet56 ...).
    Each file is loaded into its architecture before it is installed, and its sha256 is
    recorded; a file that changes afterwards is refused. Store: $GAPKD_TEACHERS, else
    $GAPKD_CACHE/teachers, else ~/.cache/gapkd/teachers.

    examples:
      gapkd teachers list
      gapkd teachers fetch mdistiller                       # cifar_teachers.tar from mdistiller's release
      gapkd teachers fetch torchvision/resnet34
      gapkd teachers import ~/Downloads/cifar_teachers.tar   # a tarball or folder you already have
      gapkd teachers import save/models --set mdistiller     # RepDistiller's save/models/<arch>_vanilla/...
"""


def add_teachers_parser(sub, parents=()) -> None:
    text = "Published teacher sets: list what is known and installed, fetch one by name, or import files you have."
    tp = sub.add_parser("teachers", help=text, description=text, epilog=textwrap.dedent(EXAMPLES),
                        formatter_class=argparse.RawDescriptionHelpFormatter, parents=list(parents))
    commands = tp.add_subparsers(dest="teachers_command", metavar="{list,fetch,import}")
    commands.required = True
    ls = commands.add_parser("list", help="every known teacher, its reported accuracy and whether it is installed")
    ls.add_argument("--verify", action="store_true", help="also re-hash installed files against the manifest")
    ls.add_argument("--json", action="store_true", help="print JSON only")
    fe = commands.add_parser("fetch", help="download a set (mdistiller) or one teacher (torchvision/resnet34) and install it")
    fe.add_argument("name", help="SET or SET/NAME (gapkd teachers list)")
    fe.add_argument("--url", help="download from this address instead (a mirror)")
    im = commands.add_parser("import", help="install the teachers of a tarball, folder or file you already have")
    im.add_argument("path")
    im.add_argument("--set", dest="set_name", help="the set the files belong to (default: the one their names match)")


def teachers_command(args) -> int:
    from ..teachers import store

    echo = lambda line: print(line, file=sys.stderr)  # noqa: E731
    if args.teachers_command == "list":
        return _list(store, args)
    if args.teachers_command == "fetch":
        written = store.fetch(args.name, url=args.url, echo=echo)
    else:
        written = store.install(args.path, args.set_name, echo=echo)
    for reference, record in written.items():
        print(f"installed {reference} ({record['arch']}, sha256 {record['sha256']})")
    return 0


def _list(store, args) -> int:
    rows = []
    root = store.store_root()
    for chosen, entry, record in store.installed(root):
        state = "not installed"
        if record is not None:
            state = "installed"
            if args.verify:
                try:
                    store.resolve(store.reference_of(chosen, entry))
                except store.TeacherError:
                    state = "changed or missing"
        rows.append({"reference": store.reference_of(chosen, entry), "arch": entry.arch, "dataset": chosen.dataset,
                     "reported_acc": entry.reported_acc, "state": state,
                     "download": "yes" if (chosen.url or entry.url) else "import only"})
    if args.json:
        print(json.dumps({"store": str(root), "teachers": rows}))
        return 0
    print(f"store: {root}")
    for chosen in store.CATALOGUE.values():
        print(f"\n{chosen.name}: {chosen.title}\n  source: {chosen.source}\n  licence: {chosen.licence}\n  layout: {chosen.layout}"
              f"\n  input: {chosen.input}")
        for row in rows:
            if row["reference"].startswith(f"zoo:{chosen.name}/"):
                acc = f"{row['reported_acc']:.2f}" if row["reported_acc"] is not None else "-"
                print(f"  {row['reference']:<32} {row['arch']:<22} top-1 {acc:>6} (reported)  {row['state']}")
    return 0
