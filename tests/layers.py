"""The layers of the code base and which imports which (docs/architecture.md, "Layout").

Run as a script to print each package's imports of the others, the module-level import graph and
its circles::

    python tests/layers.py            # layers and circles
    python tests/layers.py --graph    # and every module's imports

``tests/test_layout.py`` asserts that every arrow points down: core <- training / export / serving
<- cli / demo, that training, export and serving never import each other, and that no module imports
itself through others (a circle), counting imports inside functions too.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Folder in the repository -> the installed package it becomes (pyproject's package-dir mapping).
PACKAGE_DIRS = {
    "fpt_deploy": "fpt_deploy",
    "training": "fpt_deploy.training",
    "export": "fpt_deploy.export",
    "serving": "fpt_deploy.serving",
}
TOP = ("fpt_deploy.cli", "fpt_deploy.demo", "fpt_deploy.api")  # the top layer: nothing below may import these
LAYER_OF = {"core": 0, "fpt_deploy.training": 1, "fpt_deploy.export": 1, "fpt_deploy.serving": 1, "top": 2}


def module_name(path: Path) -> str:
    """``serving/runtimes/ort.py`` -> ``fpt_deploy.serving.runtimes.ort``."""
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    parts[0] = PACKAGE_DIRS[parts[0]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_of(module: str) -> str:
    """The layer a module belongs to: "top", one of the three packages, or "core"."""
    if any(module == t or module.startswith(t + ".") for t in TOP):
        return "top"
    for pkg in ("fpt_deploy.training", "fpt_deploy.export", "fpt_deploy.serving"):
        if module == pkg or module.startswith(pkg + "."):
            return pkg
    return "core"


def project_modules() -> dict[str, Path]:
    out = {}
    for folder in PACKAGE_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            out[module_name(path)] = path
    return out


def imports_of(module: str, path: Path) -> set[str]:
    """Every ``fpt_deploy...`` module that ``module`` imports, at any depth of the file (lazy ones too)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found = set()
    type_only = {  # imports under ``if TYPE_CHECKING:`` never run: they are no edge of the import graph
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for stmt in node.body
        for inner in ast.walk(stmt)
    }
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)
    return {m for m in found if m == "fpt_deploy" or m.startswith("fpt_deploy.")}


def module_graph() -> dict[str, set[str]]:
    """Each project module -> the project modules it imports (``from pkg.mod import name`` counts as pkg.mod)."""
    modules = project_modules()
    graph = {}
    for module, path in modules.items():
        targets = set()
        for target in imports_of(module, path):
            if target not in modules and target.rsplit(".", 1)[0] in modules:
                target = target.rsplit(".", 1)[0]
            if target in modules and target != module:
                targets.add(target)
        graph[module] = targets
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import one another, directly or through others (Tarjan's SCCs > 1)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def package_edges() -> dict[tuple[str, str], list[str]]:
    """(importing layer, imported layer) -> the modules that make that arrow, for arrows between layers."""
    modules = project_modules()
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for module, path in modules.items():
        src = package_of(module)
        for target in sorted(imports_of(module, path)):
            if target not in modules and target.rsplit(".", 1)[0] in modules:
                target = target.rsplit(".", 1)[0]  # `from pkg.mod import name`: the module is pkg.mod
            if target not in modules:
                continue
            dst = package_of(target)
            if dst != src:
                edges[(src, dst)].append(f"{module} -> {target}")
    return dict(edges)


def upward(edges: dict[tuple[str, str], list[str]]) -> list[str]:
    """The imports that break the layering: to the same or a higher layer, between different packages."""
    bad = []
    for (src, dst), lines in edges.items():
        if LAYER_OF.get(dst, 0) >= LAYER_OF.get(src, 0):
            bad.extend(lines)
    return bad


def main() -> int:
    edges = package_edges()
    for (src, dst), lines in sorted(edges.items()):
        print(f"{src:<22} -> {dst:<22} ({len(lines)} imports)")
    bad = upward(edges)
    print("\nupward or sideways imports:", "none" if not bad else "")
    for line in bad:
        print("  ", line)
    graph = module_graph()
    if "--graph" in sys.argv[1:]:
        print(f"\nmodule graph ({len(graph)} modules, {sum(map(len, graph.values()))} imports):")
        for module in sorted(graph):
            print(f"  {module} -> {', '.join(sorted(graph[module])) or '-'}")
    found = circles(graph)
    print("\nimport circles:", "none" if not found else "")
    for group in found:
        print("  ", " <-> ".join(group))
    return 1 if bad or found else 0


if __name__ == "__main__":
    sys.exit(main())
