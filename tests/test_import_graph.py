"""The package's import graph: no cycle, and the kernels (repa_kernels/ops/) never import the layers above them.

Read from the source (every import statement, also those inside functions, and importlib.import_module
calls with a relative name), so it holds for imports that only run on some paths.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "repa_kernels"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The package modules `path` imports (a `from package import name` counts as the submodule `name`
    when there is one)."""
    own = module_name(path)
    base = own.split(".") if path.name == "__init__.py" else own.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            parent = base[:len(base) - node.level + 1] if node.level else []
            prefix = ".".join(parent + ([node.module] if node.module else []))
            targets = [f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in known else prefix
                       for alias in node.names]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).startswith(".")):
            targets = [".".join(base + [node.args[0].value.lstrip(".")])]
        found.update(target for target in targets if target in known and target != own)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: imported_modules(path, set(paths)) for name, path in paths.items()}


def cycle_through(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """A path start -> ... -> start, if there is one (depth-first)."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for target in graph[node]:
            if target == start:
                return path + [start]
            if target not in seen:
                seen.add(target)
                stack.append((target, path + [target]))
    return None


def test_the_graph_is_read_from_the_sources():
    graph = import_graph()
    assert "repa_kernels.options" in graph["repa_kernels.ops.crepa_triton"]
    assert "repa_kernels.ops.cpp" in graph["repa_kernels.backends"]  # importlib.import_module(".ops.cpp")


def test_no_import_cycle():
    graph = import_graph()
    cycles = [cycle for cycle in (cycle_through(graph, name) for name in sorted(graph)) if cycle]
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


def test_the_kernels_import_only_the_options_and_each_other():
    for name, targets in import_graph().items():
        if name.startswith("repa_kernels.ops"):
            upward = {t for t in targets if not t.startswith("repa_kernels.ops") and t != "repa_kernels.options"}
            assert not upward, f"{name} imports {sorted(upward)}"
