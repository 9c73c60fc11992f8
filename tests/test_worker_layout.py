"""The worker's modules import one another without a circle: each part is given what it
uses, never its owner (imports under TYPE_CHECKING count too)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _worker_imports() -> dict[str, set[str]]:
    """Each module of the `worker` package, with the modules of the package it imports."""
    paths = sorted((ROOT / "worker").rglob("*.py"))
    modules = {_module_name(path) for path in paths}
    graph: dict[str, set[str]] = {}
    for path in paths:
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module)
                # `from worker import images` imports the module worker.images.
                imported.update(f"{node.module}.{alias.name}" for alias in node.names)
        name = _module_name(path)
        graph[name] = {m for m in imported if m in modules and m != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    visiting: list[str] = []
    done: set[str] = set()

    def visit(module: str) -> list[str] | None:
        if module in visiting:
            return [*visiting[visiting.index(module) :], module]
        if module in done:
            return None
        visiting.append(module)
        for imported in sorted(graph[module]):
            if (found := visit(imported)) is not None:
                return found
        visiting.pop()
        done.add(module)
        return None

    for module in sorted(graph):
        if (found := visit(module)) is not None:
            return found
    return None


def test_the_worker_modules_import_one_another_without_a_circle() -> None:
    graph = _worker_imports()
    assert {"worker.host", "worker.replica", "worker.metrics"} <= graph.keys()
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_only_the_entry_point_imports_the_host() -> None:
    importers = {m for m, imported in _worker_imports().items() if "worker.host" in imported}
    assert importers == {"worker.main"}


def test_a_circle_is_found() -> None:
    # The check above must be able to fail.
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
