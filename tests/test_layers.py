"""The layers point one way: every import in ``src/hfbridge`` (inside functions too), read with ``ast``.

* ``hfbridge.models`` (the core) imports none of the layers and faces built on it: it reaches the parallel layer,
  the adapters face and the data layer through :mod:`hfbridge.models.hooks`, wired by ``hfbridge/__init__``;
* no production module imports ``hfbridge.testing`` (test helpers);
* no import cycle: neither between the subpackages and top-level modules, nor between modules.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "hfbridge"

# What hfbridge.models must not import: the layers and faces above it, and the test helpers.
ABOVE_MODELS = ("parallel", "adapters", "declarative", "data", "recipe", "serving", "cli", "jax",
                "testing")

# Imports that break these rules and are someone else's to remove; shrink this, never grow it.
ALLOWED: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def _resolve(importer: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    is_package = MODULES[importer].name == "__init__.py"
    base = importer.split(".")[: len(importer.split(".")) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def imported_modules(importer: str) -> Iterator[str]:
    """The hfbridge modules ``importer`` imports anywhere in its code (``from a import b`` is ``a.b`` when that is a
    module, else ``a``)."""
    for node in ast.walk(ast.parse(MODULES[importer].read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(importer, node)
            names = [f"{source}.{a.name}" if f"{source}.{a.name}" in MODULES else source for a in node.names]
        else:
            continue
        yield from (name for name in names if name in MODULES and name != importer)


def import_edges() -> set[tuple[str, str]]:
    edges = {(m, dep) for m in MODULES for dep in imported_modules(m)}
    return edges - ALLOWED


def _group(module: str) -> str:
    """``hfbridge.models.loading`` -> ``hfbridge.models``; ``hfbridge.losses`` stays; ``hfbridge`` is the root."""
    return ".".join(module.split(".")[:2])


def cycles(edges: set[tuple[str, str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_import_reader_sees_imports_inside_functions():
    assert "hfbridge.parallel.mesh_plan" in set(imported_modules("hfbridge"))  # imported lazily, in a function
    assert "hfbridge.models.hooks" in set(imported_modules("hfbridge"))


def test_models_import_nothing_above_them():
    above = tuple(f"hfbridge.{name}" for name in ABOVE_MODELS)
    wrong = sorted((a, b) for a, b in import_edges()
                   if a.startswith("hfbridge.models") and (b in above or b.startswith(tuple(f"{n}." for n in above))))
    assert not wrong, f"hfbridge.models imports a layer above it (use hfbridge.models.hooks): {wrong}"


def test_no_production_module_imports_the_test_helpers():
    wrong = sorted(a for a, b in import_edges() if b == "hfbridge.testing")
    assert not wrong, f"production modules import hfbridge.testing: {wrong}"


def test_no_cycle_between_subpackages():
    edges = {(_group(a), _group(b)) for a, b in import_edges() if _group(a) != _group(b)}
    assert not cycles(edges), cycles(edges)


def test_no_cycle_between_modules():
    assert not cycles(import_edges()), cycles(import_edges())
