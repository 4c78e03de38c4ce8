"""Checks on the source itself: strict typing, and the size limits that keep each piece readable."""

from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src" / "cnnlab"
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy is not installed (pip install -e '.[dev]')")
def test_the_library_type_checks_strictly():
    result = subprocess.run(
        [sys.executable, "-m", "mypy"], cwd=SOURCE.parents[1], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout[-3000:]


def test_no_file_or_function_is_too_long_to_read_in_one_sitting():
    too_long = []
    for path in sorted(SOURCE.rglob("*.py")):
        text = path.read_text()
        if text.count("\n") > MAX_FILE_LINES:
            too_long.append(f"{path.name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.name}: {node.name} is {length} lines")
    assert not too_long, too_long


def test_every_module_the_readme_names_in_how_it_is_built_exists():
    root = SOURCE.parents[1]
    section = (root / "README.md").read_text().split("## How it is built", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`([a-z_/]+\.py|[a-z_]+/)`", section))
    assert {"engine.py", "phases.py", "registry.py", "families/"} <= named
    files = {path.name for path in SOURCE.rglob("*.py")}
    folders = {f"{path.name}/" for path in SOURCE.rglob("*") if path.is_dir()}
    missing = [name for name in named if name not in files | folders and not (root / name).exists()]
    assert not missing, missing


def module_imports() -> dict[str, set[str]]:
    """Each cnnlab module's cnnlab modules imported when it is first imported (its module-level imports, each with
    the packages above it, which Python runs first; its own packages excepted, and TYPE_CHECKING blocks)."""
    names = {}
    for path in SOURCE.rglob("*.py"):
        parts = path.relative_to(SOURCE.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in names.items():
        imported = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.update([node.module, *(f"{node.module}.{alias.name}" for alias in node.names)])
        runs = {".".join(m.split(".")[:i]) for m in imported for i in range(2, m.count(".") + 2)}
        graph[name] = {m for m in runs if m in names and m != name and not name.startswith(m + ".")}
    return graph


def test_any_module_can_be_imported_first():
    # A cycle (report -> explain -> report.figures, hence report) imports fine in one order and fails in the
    # other: `from cnnlab.explain import explain` in a fresh notebook raised ImportError.
    graph, done, cycles = module_imports(), set(), []

    def visit(name: str, path: list[str]) -> None:
        for imported in sorted(graph[name]):
            if imported in path:
                cycles.append(" -> ".join([*path[path.index(imported) :], imported]))
            elif imported not in done:
                visit(imported, [*path, imported])
        done.add(name)

    for name in sorted(graph):
        if name not in done:
            visit(name, [name])
    assert not cycles, cycles
