"""The package's import graph (issue 9): the runtime sub-packages never import the synthetic-slide generator or the
benchmark helpers (``monai_wsi_ext.testing``), and the modules' top-level imports form no cycle. Read from the source
with ``ast``, so nothing is imported here."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "monai_wsi_ext"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _imported(name: str, nodes) -> set[str]:
    """``monai_wsi_ext`` modules named by the import statements among ``nodes`` of module ``name``."""
    package = name if MODULES[name].name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.add(target)
            out.update(f"{target}.{a.name}" for a in node.names)  # `from pkg import module`
    return {m for m in out if m in MODULES and m != name}


def _top_level_nodes(tree: ast.Module):
    """The statements run at import time: the module body, and what ``if``/``try`` blocks there hold (not function
    or class bodies, whose imports run later)."""
    for node in tree.body:
        if isinstance(node, (ast.If, ast.Try)):
            yield from (n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)))
        else:
            yield node


def test_the_modules_are_found():
    assert len(MODULES) > 50
    assert {"monai_wsi_ext.model.predict", "monai_wsi_ext.testing.synthetic",
            "monai_wsi_ext.engines.e2e"} <= set(MODULES)


def test_runtime_modules_never_import_the_testing_package():
    offenders = {}
    for name, path in MODULES.items():
        if name == "monai_wsi_ext.testing" or name.startswith("monai_wsi_ext.testing."):
            continue
        used = {m for m in _imported(name, ast.walk(ast.parse(path.read_text())))
                if m == "monai_wsi_ext.testing" or m.startswith("monai_wsi_ext.testing.")}
        if used:
            offenders[name] = sorted(used)
    assert not offenders, f"runtime modules importing the generator/benchmark helpers: {offenders}"


def test_top_level_imports_have_no_cycle():
    graph = {name: _imported(name, _top_level_nodes(ast.parse(path.read_text()))) for name, path in MODULES.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
