"""supernet/ has no import cycle: the graph of its modules' imports of one another, module-level
or inside functions, is acyclic (a lazy import that dodges a cycle is still one)."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "supernet"
MODULES = sorted(p.stem for p in PKG.glob("*.py") if p.stem != "__init__")


def _imports(module: str) -> set[str]:
    """The sibling modules ``module`` imports with ``from .x import ...`` or ``from . import x``, anywhere in the file."""
    out = set()
    for node in ast.walk(ast.parse((PKG / f"{module}.py").read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names = [node.module.split(".")[0]] if node.module else [a.name for a in node.names]
            out.update(n for n in names if n in MODULES)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("supernet."):
            out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("supernet."))
    return out


def test_supernet_import_graph_is_acyclic():
    graph = {m: _imports(m) for m in MODULES}
    assert graph["layer"] and graph["io"], "the parser found no imports: it is broken"
    done: set[str] = set()

    def visit(m: str, path: list[str]) -> None:
        if m in path:
            cycle = path[path.index(m):] + [m]
            pytest.fail("import cycle in supernet/: " + " -> ".join(cycle))
        if m in done:
            return
        for n in sorted(graph[m]):
            visit(n, path + [m])
        done.add(m)

    for m in MODULES:
        visit(m, [])



def _top_level_imports(pkg: str) -> set[str]:
    """The top-level packages the modules of ``pkg`` import (absolute imports), anywhere in the files."""
    out = set()
    for path in (PKG.parent / pkg).glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                out.add(node.module.split(".")[0])
            elif isinstance(node, ast.Import):
                out.update(a.name.split(".")[0] for a in node.names)
    return out


def test_layers_import_downwards_only():
    """supernet/ is the math, methods/ builds on it, engine/ (the recipes) on both: never the reverse."""
    assert "supernet" in _top_level_imports("methods")
    assert not {"methods", "engine", "search"} & _top_level_imports("supernet")
    assert "engine" not in _top_level_imports("methods")
