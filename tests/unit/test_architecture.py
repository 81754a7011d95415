"""The package's shape, read from its source: dependencies point down and nothing imports in a circle.

Layers, from the bottom: plumbing (configuration, the clock, PostgreSQL and Redis access, logs, counters,
the Celery app), the domain (what metering, quotas, periods, Stripe and the periodic jobs mean), and the
edges that drive it (tasks, the web, the command line, the demo). A module imports only from its own
layer or below.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from support.run import ROOT

PACKAGE = ROOT / "worker"

PLUMBING = {
    "worker", "worker.config", "worker.clock", "worker.errors", "worker.logs", "worker.db", "worker.cache",
    "worker.sqlarrays", "worker.tables", "worker.metrics", "worker.celery", "worker.retry", "worker.broker",
    "worker.liveness",
}  # fmt: skip
EDGES = ("worker.tasks", "worker.web", "worker.cli", "worker.demo", "worker.__main__", "worker.health")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The worker modules a file imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        found.update(name for name in names if name in modules)
    return found - {module_name(path)}


def graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(path) for path in paths}
    return {module_name(path): imports_of(path, modules) for path in paths}


def is_edge(name: str) -> bool:
    return any(name == edge or name.startswith(edge + ".") for edge in EDGES)


def test_no_module_imports_itself_in_a_circle() -> None:
    edges = graph()
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for target in sorted(edges[name]):
            if state.get(target) == "open":
                pytest.fail("import cycle: " + " -> ".join([*path[path.index(target) :], target]))
            if target not in state:
                visit(target, [*path, target])
        state[name] = "done"

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])


def test_plumbing_imports_only_plumbing() -> None:
    wrong = {name: sorted(targets - PLUMBING) for name, targets in graph().items() if name in PLUMBING}
    assert {name: targets for name, targets in wrong.items() if targets} == {}


def test_the_domain_never_imports_the_edges() -> None:
    wrong = {
        name: sorted(target for target in targets if is_edge(target))
        for name, targets in graph().items()
        if not is_edge(name)
    }
    assert {name: targets for name, targets in wrong.items() if targets} == {}


def test_the_package_itself_imports_nothing() -> None:
    """`import worker.config` must not build Celery or read the environment."""
    assert graph()["worker"] == set()
