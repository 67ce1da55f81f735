"""The package's shape, checked: layers import only downwards, no import circles, no function over
80 lines, ruff (lint + import order) clean. The layers are the ones README's architecture section shows."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "gapkd"

#: bottom to top; a module may import from its own layer and the layers below it, never above.
#: (errors, registry, plugins, pipeline_aid, ... are the old import paths, aliases of the moved modules)
LAYERS = [
    {"core", "errors", "registry", "plugins"},
    {"models", "data", "teachers"},
    {"methods", "testing"},
    {"analysis", "config"},
    {"engine", "teacher_cache"},
    {"api", "build"},
    {"pipelines", "pipeline_aid"},
    {"study"},
    {"deploy", "quickstart"},
    {"cli"},
]
LAYER = {name: index for index, names in enumerate(LAYERS) for name in names}
MAX_FUNCTION_LINES = 80


def _module_name(path: Path) -> str:
    parts = ["gapkd", *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in SRC.rglob("*.py")}


def _imports(name: str, path: Path) -> set[str]:
    """Every gapkd module ``name`` imports, at module level or inside functions."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES)
    return {target for target in found if target in MODULES and target != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(name: str) -> int | None:
    parts = name.split(".")
    return LAYER.get(parts[1]) if len(parts) > 1 else None  # gapkd/__init__ is the facade over everything


def test_every_module_has_a_layer():
    assert sorted(name for name in MODULES if name != "gapkd" and _layer(name) is None) == []


def test_imports_point_down():
    upward = [f"{name} (layer {_layer(name)}) imports {target} (layer {_layer(target)})"
              for name, targets in GRAPH.items() for target in targets
              if _layer(name) is not None and _layer(target) is not None and _layer(target) > _layer(name)]
    assert upward == [], "an import points up a layer; move the code it needs down (see README's architecture section)"


def test_no_import_circle():
    """No circle between modules, counting imports inside functions; a package's own __init__
    re-exporting its submodules is not a circle with them (they import their siblings, not it)."""
    def edges(name):
        return {t for t in GRAPH[name] if not (name.startswith(t + ".") and MODULES[t].name == "__init__.py")}

    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(node):  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges(node):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for name in sorted(GRAPH):
        if name not in index:
            visit(name)
    assert circles == []


def test_the_checks_see_an_upward_import():
    """The layer map itself: the loop is below what builds runs, the core below everything."""
    assert _layer("gapkd.engine.trainer") < _layer("gapkd.api") < _layer("gapkd.pipelines.base") < _layer("gapkd.cli.main")
    assert "gapkd.methods.base" in GRAPH["gapkd.engine.trainer"]
    assert all(_layer(target) == 0 for target in GRAPH["gapkd.core.rundir"])


def test_no_function_over_80_lines():
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                long.append(f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert long == []


def test_ruff_is_clean():
    pytest.importorskip("ruff", reason='ruff comes with pip install -e ".[test]"')
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "src", "tests", "benchmarks", "configs"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_hyper_parameter_has_its_docstring():
    """One documentation style for hyper-parameters: a one-line docstring under each field, which
    `gapkd list methods -v` prints."""
    from gapkd.methods import METHODS

    missing = [f"{name}.{key}" for name in METHODS.names() for key, doc in METHODS.get(name).hparam_docs().items() if not doc]
    assert missing == []


def test_recipes_named_in_help_and_docs_exist():
    """Every configs/...yaml the CLI's help, README or docs name is a file (placeholders like <method> aside)."""
    import re

    texts = [*(SRC / "cli").glob("*.py"), ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
    named = {match for path in texts for match in re.findall(r"configs/[\w./+-]+\.yaml", path.read_text())}
    assert named and sorted(name for name in named if not (ROOT / name).is_file()) == []


def test_user_facing_text_never_points_at_the_projects_shared_folder():
    texts = [ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *SRC.rglob("*.py")]
    assert [str(path) for path in texts if "../shared" in path.read_text() or "shared/specs" in path.read_text()] == []
