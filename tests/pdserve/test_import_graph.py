"""The import graph between pdserve's top-level packages has no cycle.

Each arrow points from the user of a seam to its owner (docs/ARCHITECTURE.md): the engine
knows nothing of the packages that host it, workers know the engine, the router knows the
workers and the controller, and the command line (`pdserve/`) sits on top. Read from the
source with `ast`, so lazy imports inside functions count too.
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]


def _packages() -> dict[str, Path]:
    """Top-level subpackage name ('engine', 'router', ...) -> its folder, from pyproject's package-dir."""
    dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    return {name.split(".")[1] if "." in name else "pdserve": ROOT / folder for name, folder in dirs.items()}


def _imported_modules(path: Path) -> set[str]:
    mods = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mods.add(node.module)
        elif isinstance(node, ast.Import):
            mods.update(alias.name for alias in node.names)
    return mods


def import_graph() -> dict[str, dict[str, set[str]]]:
    """package -> {imported package: files that import it}."""
    packages = _packages()
    graph: dict[str, dict[str, set[str]]] = {name: {} for name in packages}
    for name, folder in packages.items():
        files = folder.glob("*.py") if name == "pdserve" else folder.rglob("*.py")
        for path in files:
            for module in _imported_modules(path):
                parts = module.split(".")
                if parts[0] != "pdserve":
                    continue
                target = parts[1] if len(parts) > 1 and parts[1] in packages else "pdserve"
                if target != name:
                    graph[name].setdefault(target, set()).add(str(path.relative_to(ROOT)))
    return graph


def _cycle(graph: dict[str, dict[str, set[str]]]) -> list[str] | None:
    """One cycle of the graph as a list of packages, or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt, [*path, nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_no_cycle_between_top_level_packages():
    graph = import_graph()
    cycle = _cycle(graph)
    if cycle:
        arrows = [f"{a} -> {b} ({', '.join(sorted(graph[a][b]))})" for a, b in itertools.pairwise(cycle)]
        raise AssertionError("import cycle between packages:\n  " + "\n  ".join(arrows))


def test_the_engine_and_the_wire_format_own_no_other_package():
    graph = import_graph()
    assert graph["engine"] == {}, f"the engine imports {graph['engine']}"
    assert graph["proto"] == {}, f"proto imports {graph['proto']}"
    assert set(graph["roles"]) <= {"engine"}, f"workers import {graph['roles']}"


def test_cycle_finder_finds_a_cycle():
    graph = {"a": {"b": {"x.py"}}, "b": {"c": {"y.py"}}, "c": {"a": {"z.py"}}, "d": {}}
    assert _cycle(graph) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b": set()}, "b": {}}) is None
