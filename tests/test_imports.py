"""The import graph of trainer/ and launch/: no cycle (imports inside functions count, imports only
for type checkers do not), and every module imports on its own: each in its own process, in which no
other module of the project has been imported before it."""

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


# Third-party packages the project's modules import, loaded once in a parent process that forks one
# child per module: importing torch and Lightning afresh for each of ~70 modules would take minutes
# on 2 cores. Each child still imports its module, and everything of the project that module
# needs, from nothing: what it forgot to import itself is missing there.
PRELOADED = ("torch", "pytorch_lightning", "hydra", "omegaconf", "numpy", "fsspec", "jinja2",
             "yaml")

# Runs as `python -c FORKER <processes at once> <preloaded,...> <package prefixes,...> <module>...`
# and prints one line per module that failed to import and exits 1 if any did.
FORKER = r"""
import importlib, os, sys
parallel, preload, ours = int(sys.argv[1]), sys.argv[2], tuple(sys.argv[3].split(","))
modules = sys.argv[4:]
for name in filter(None, preload.split(",")):
    importlib.import_module(name)
early = sorted(m for m in sys.modules if m.split(".")[0] in ours)
if early:
    sys.exit(f"modules of the project were imported by the preloaded packages: {early}")
sys.stdout.flush()
running, failed = {}, []
def reap():
    pid, status = os.wait()
    if status:
        failed.append(running[pid])
    del running[pid]
for name in modules:
    while len(running) >= parallel:
        reap()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            importlib.import_module(name)
        except BaseException as exc:
            print(f"{name}: {exc!r}", flush=True)
            code = 1
        os._exit(code)
    running[pid] = name
while running:
    reap()
sys.exit(1 if failed else 0)
"""


def import_each(modules: list[str], *, root: Path, packages: tuple[str, ...],
                preloaded: tuple[str, ...] = PRELOADED) -> subprocess.CompletedProcess:
    """Import every one of `modules` in its own forked process (see FORKER)."""
    return subprocess.run(
        [sys.executable, "-c", FORKER, str(max(2, os.cpu_count() or 2)), ",".join(preloaded),
         ",".join(packages), *modules],
        capture_output=True, text=True, cwd=root, timeout=300,
        env={**os.environ, "PYTHONPATH": str(root)})


def test_every_module_imports_on_its_own():
    # `python -m trainer` runs on import; the other command lines are guarded but add nothing
    names = [m for m in modules() if not m.endswith("__main__")]
    assert len(names) > 50
    result = import_each(names, root=REPO, packages=PACKAGES)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]


def test_a_module_that_leans_on_an_earlier_import_fails_alone(tmp_path: Path):
    """`probe.user` reads `probe.helper` without importing it: it works only after something
    else imported `probe.helper`, as in one interpreter importing both, and must fail alone."""
    package = tmp_path / "probe"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "helper.py").write_text("VALUE = 1\n")
    (package / "user.py").write_text("import probe\n\nVALUE = probe.helper.VALUE\n")
    result = import_each(["probe.helper", "probe.user"], root=tmp_path, packages=("probe",),
                         preloaded=())
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        "probe.user: AttributeError(\"module 'probe' has no attribute 'helper'\")"]
