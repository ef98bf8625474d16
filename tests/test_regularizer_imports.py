"""The modules of repa_kernels/regularizer/ import each other without a cycle (each reads on its own, from
the leaves grids.py / inputs.py up to crepa.py / urepa.py)."""

import ast
import os

import repa_kernels.regularizer as regularizer

PACKAGE_DIR = os.path.dirname(regularizer.__file__)


def _sibling_imports(path: str) -> set[str]:
    """Modules of this package that `path` imports at run time (imports under `if TYPE_CHECKING:` excluded)."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            skipped.update(id(child) for child in ast.walk(node))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and id(node) not in skipped:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {name[:-3] for name in os.listdir(PACKAGE_DIR) if name.endswith(".py") and name != "__init__.py"}
    return {m: _sibling_imports(os.path.join(PACKAGE_DIR, m + ".py")) & modules for m in modules}


def test_the_regularizer_modules_import_without_a_cycle():
    graph = _graph()
    assert graph["families"] and "capture" in graph and "families" in graph["capture"]   # the walk sees imports
    done, path = set(), []

    def visit(module):
        assert module not in path, "import cycle: " + " -> ".join(path[path.index(module):] + [module])
        if module in done:
            return
        path.append(module)
        for imported in sorted(graph[module]):
            visit(imported)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)
