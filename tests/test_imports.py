"""The import graph of trainer/ and launch/: no cycle (imports inside functions count, imports only
for type checkers do not), and every module imports in a fresh interpreter, dependencies first."""

from __future__ import annotations

import ast
import graphlib
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("trainer", "launch")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    paths = sorted(p for package in PACKAGES for p in (REPO / package).rglob("*.py"))
    return {module_name(p): p for p in paths}


def _type_checking_only(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def imported_by(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that `path` imports when it runs, anywhere in it (functions too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _type_checking_only(node):
            for child in getattr(node, "orelse", []):
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imported_by(name, path, set(found)) for name, path in found.items()}


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert {"trainer.config", "trainer.tracking.run", "trainer.data.writer"} <= set(graph)
    try:
        order = list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        raise AssertionError(f"import cycle: {' -> '.join(exc.args[1])}") from None
    assert set(order) == set(graph)


def test_the_checker_sees_imports_inside_functions_and_skips_type_checking(tmp_path: Path):
    # the checker itself must be able to fail: a cycle through a lazy import is one
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import trainer.fit\n"
              "def f():\n    from trainer import train\n    from .config import ConfigError\n")
    path = tmp_path / "probe.py"
    path.write_text(source)
    # `from trainer import train` runs trainer/__init__.py, then trainer/train.py
    assert imported_by("trainer.probe", path, set(modules())) == {"trainer", "trainer.train",
                                                                   "trainer.config"}


def test_every_module_imports_in_a_fresh_interpreter_in_dependency_order():
    order = list(graphlib.TopologicalSorter(import_graph()).static_order())
    # `python -m trainer` runs on import; the other command lines are guarded but add nothing
    order = [m for m in order if not m.endswith("__main__")]
    probe = ("import importlib, sys\nfailed = []\nfor name in sys.argv[1:]:\n"
             "    try:\n        importlib.import_module(name)\n"
             "    except Exception as exc:\n        failed.append(f'{name}: {exc!r}')\n"
             "print('\\n'.join(failed))\n")
    result = subprocess.run([sys.executable, "-c", probe, *order], capture_output=True, text=True,
                            cwd=REPO, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "", result.stdout
