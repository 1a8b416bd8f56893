"""The house's floors, checked from the code's own imports (issue 11).

Floors, bottom up: ``configs`` (the site config schema, loading, budgets), ``models`` (the zoo;
knows nothing of scheduling), ``links`` (output tuples only), ``scheduler`` (decides; alone
loads and unloads), ``server`` (streams, HTTP, Redis), ``bench``. A module imports only from
its own floor or the floors below, and no files import each other in a circle. Every import
counts: at module level, inside functions, and under ``TYPE_CHECKING``; this reads the source
with :mod:`ast`, so nothing is imported or run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FLOORS = ["configs", "models", "links", "scheduler", "server", "bench"]


def _modules() -> dict[str, Path]:
    """Dotted module name (mlink.<folder>...) -> source file, for every Python file of the package."""
    out = {}
    for floor in FLOORS:
        for path in sorted((REPO / floor).rglob("*.py")):
            rel = path.relative_to(REPO).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(["mlink", *parts])] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The mlink modules ``name`` imports (resolved to modules of the package, not names in them)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for t in targets:
            # the longest prefix that is a module of the package
            parts = t.split(".")
            for k in range(len(parts), 1, -1):
                cand = ".".join(parts[:k])
                if cand in MODULES and cand != name:
                    found.add(cand)
                    break
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _floor(module: str) -> int:
    return FLOORS.index(module.split(".")[1])


def test_the_walker_sees_the_package() -> None:
    assert len(MODULES) > 40
    assert "mlink.links.linkset" in MODULES and "mlink.configs.schema" in MODULES
    # it resolves absolute, package-relative and function-level imports
    assert "mlink.links.tuples" in GRAPH["mlink.links.linkset"]


def test_no_import_runs_up_a_floor() -> None:
    up = sorted(f"{m} -> {t}" for m, ts in GRAPH.items() for t in ts if _floor(t) > _floor(m))
    assert not up, "imports from a higher floor:\n" + "\n".join(up)


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one file (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(GRAPH[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return out


def test_no_files_import_each_other_in_a_circle() -> None:
    cycles = _cycles()
    assert not cycles, "files that import each other in a circle:\n" + "\n".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize("floor", FLOORS)
def test_each_floor_exists(floor: str) -> None:
    assert any(_floor(m) == FLOORS.index(floor) for m in MODULES)


def _limits() -> dict[str, int]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["mlink"]["lint"]


def test_no_module_is_too_long() -> None:
    most = _limits()["max-module-lines"]
    long = sorted(
        f"{p.relative_to(REPO)}: {n} lines" for p in MODULES.values() if (n := len(p.read_text().splitlines())) > most
    )
    assert not long, f"modules over {most} lines:\n" + "\n".join(long)


def test_no_function_is_too_long() -> None:
    most = _limits()["max-function-lines"]
    long = []
    for path in MODULES.values():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > most:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {n} lines")
    assert not long, f"functions over {most} lines:\n" + "\n".join(sorted(long))
