"""Layers only point down: no import cycle among alignkit's modules, not even one hidden behind a function-level
import, every module imports when it is the first one loaded, and nothing below the CLI imports the CLI."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import alignkit

PACKAGE = Path(alignkit.__file__).parent
ABOVE_THE_CLI = {"alignkit.cli", "alignkit.__main__", "alignkit.demo"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(name: str) -> set[str]:
    """The alignkit modules `name` imports anywhere in its file, at the top or inside a function.

    `from alignkit.a import b` counts `alignkit.a`, and `alignkit.a.b` when b is a module. The package a
    submodule sits in is loaded first by Python itself and is not counted: it is no import of the file's own.
    """
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: `from .x import y` inside package p is p.x
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in found if m in MODULES and m != name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once every path from it is explored
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_even_through_function_level_imports():
    # A function-level import runs late enough to dodge a cycle at import time; counting it keeps it from
    # hiding one. Lazy imports that remain are there for start-up time only (torch, sqlalchemy, matplotlib).
    graph = {name: imported_modules(name) for name in MODULES}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_nothing_below_the_cli_imports_it():
    offenders = sorted(name for name in MODULES if name not in ABOVE_THE_CLI and "alignkit.cli" in imported_modules(name))
    assert offenders == [], f"these modules import alignkit.cli; read alignkit.commands instead: {offenders}"


def test_every_module_imports_when_it_is_loaded_first():
    # An import cycle can hold in one order and break in another. One fresh interpreter per module would cost
    # seconds each (torch); forgetting every alignkit module before each import gives the same order for
    # alignkit's own code, while torch and transformers stay loaded.
    script = """
import importlib, json, sys, traceback
failed = {}
for name in json.loads(sys.argv[1]):
    for loaded in [m for m in sys.modules if m == "alignkit" or m.startswith("alignkit.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failed[name] = traceback.format_exc(limit=-3)
print(json.dumps(failed))
"""
    loadable = sorted(set(MODULES) - {"alignkit.__main__"})  # importing it runs the CLI
    result = subprocess.run(
        [sys.executable, "-c", script, json.dumps(loadable)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    failed = json.loads(result.stdout.strip().splitlines()[-1])
    assert failed == {}, "\n".join(f"{name}:\n{why}" for name, why in failed.items())
