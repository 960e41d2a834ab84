"""bench/ is one module a section plus shared helpers: its modules import each other without a circle,
and only through public names."""

from __future__ import annotations

import ast
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _bench_imports() -> dict[str, dict[str, set[str]]]:
    """module -> {imported bench module -> names taken from it}, read from the source (nothing runs)."""
    graph = {}
    for path in sorted(BENCH.glob("*.py")):
        imports: dict[str, set[str]] = {}
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "bench":
                imports.setdefault(node.module, set()).update(a.name for a in node.names)
        graph[f"bench.{path.stem}"] = imports
    return graph


def test_bench_modules_import_each_other_without_a_circle():
    graph = _bench_imports()
    done, path = set(), []

    def visit(module: str) -> None:
        assert module not in path, f"import circle: {' -> '.join([*path[path.index(module) :], module])}"
        if module in done:
            return
        path.append(module)
        for imported in graph.get(module, {}):
            visit(imported)
        path.pop()
        done.add(module)

    for module in graph:
        visit(module)
    assert {"bench.suite", "bench.config", "bench.server_process"} <= done


def test_bench_modules_take_only_public_names_from_each_other():
    private = {
        f"{module}: {name} from {source}"
        for module, imports in _bench_imports().items()
        for source, names in imports.items()
        for name in names
        if name.startswith("_")
    }
    assert not private, sorted(private)
