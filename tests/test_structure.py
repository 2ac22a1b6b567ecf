"""The package's structure: no import cycle, no module reaching into another's private names."""

from __future__ import annotations

import ast

from conftest import REPO

SRC = REPO / "src"


def _module_name(path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, list[ast.ImportFrom | ast.Import]]:
    """Each gptlab module's import statements, wherever they stand (lazy ones inside functions too)."""
    imports = {}
    for path in sorted((SRC / "gptlab").rglob("*.py")):
        tree = ast.parse(path.read_text())
        nodes = ast.walk(tree)
        imports[_module_name(path)] = [n for n in nodes if isinstance(n, ast.Import | ast.ImportFrom)]
    return imports


def _module_graph() -> dict[str, set[str]]:
    """module -> the gptlab modules it imports, lazy imports included."""
    imports = _imports()
    graph = {module: set() for module in imports}
    for module, nodes in imports.items():
        for node in nodes:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if isinstance(node, ast.ImportFrom) and node.module:
                # `from gptlab.data import x` may name a submodule gptlab.data.x
                names += [f"{node.module}.{a.name}" for a in node.names]
            graph[module] |= {n for n in names if n in graph and n != module}
    # a package's __init__ re-exports its submodules: edges from a package to its own children
    # are how Python packages work, not a cycle between modules
    for module in graph:
        graph[module] = {n for n in graph[module] if not n.startswith(module + ".")}
    return graph


def _assert_acyclic(graph: dict[str, set[str]]) -> None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(target) :] + [target]))
            if target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_no_import_cycle_between_modules():
    _assert_acyclic(_module_graph())


def test_no_import_cycle_between_folders():
    # One level up: gptlab.models.* count as one unit, gptlab.adapters as another. A lazy import
    # inside a function hides a loop from Python but not from a reader: "models" should not
    # need "adapters" while "adapters" needs "models".
    def unit(module: str) -> str:
        return ".".join(module.split(".")[:2])

    graph: dict[str, set[str]] = {}
    for module, targets in _module_graph().items():
        graph.setdefault(unit(module), set()).update(unit(t) for t in targets if unit(t) != unit(module))
    _assert_acyclic(graph)


def test_no_module_imports_another_modules_private_names():
    private = [
        f"{module}: from {node.module} import {alias.name}"
        for module, nodes in _imports().items()
        for node in nodes
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gptlab")
        for alias in node.names
        if alias.name.startswith("_")
    ]
    assert private == []
