"""The shape of the house (docs/ARCHITECTURE.md), checked from the sources without importing them.

- No import cycle between the project's modules, counting imports inside functions too (a function-level import
  must not be a way to hide one).
- Layers point one way: the engine (``equicore``) imports none of the packages built on it; ``storage`` imports
  neither ``tasks`` nor ``flows``; ``tasks`` does not import ``flows``; training and reports are not engine code.
- No module is longer than 600 lines unless its docstring says why.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("equicore", "storage", "tasks", "flows", "training", "reports")
MAX_LINES = 600

# package -> packages (of this project, or heavy third-party ones) it must never import
FORBIDDEN = {
    "equicore": ("storage", "tasks", "flows", "training", "reports", "prefect", "prefect_dask", "distributed", "dask"),
    "storage": ("tasks", "flows", "training", "reports"),
    "tasks": ("flows", "training", "reports"),
    "training": ("tasks", "flows", "reports"),
}


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project's packages."""
    out = {}
    for package in PACKAGES:
        root = REPO / package
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def imported_names(path: Path, module: str, is_package: bool) -> Iterator[str]:
    """Every dotted name `path` imports, anywhere in the file (top level, functions, TYPE_CHECKING blocks aside)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    type_checking_nodes = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
        for child in node.body
        for n in ast.walk(child)
    }
    for node in ast.walk(tree):
        if id(node) in type_checking_nodes:
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            for alias in node.names:
                yield f"{prefix}.{alias.name}"  # a submodule if one exists by that name, else an attribute
            yield prefix


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for target in imported_names(path, name, path.name == "__init__.py"):
            # The longest prefix that is one of our modules: `from a.b import c` is a.b.c if that is a module.
            parts = target.split(".")
            while parts and ".".join(parts) not in modules:
                parts.pop()
            if parts and ".".join(parts) != name:
                edges.add(".".join(parts))
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), ignoring a package's imports of its own
    submodules' names through its ``__init__`` (``from .x import y`` in a package is how packages are built)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def edges(node: str) -> set[str]:
        # A submodule importing its own package's __init__ (to get a re-exported name) while the __init__ imports
        # it back is Python's normal package build, not a design cycle; count only edges between distinct subtrees.
        return {t for t in graph[node] if not node.startswith(t + ".") and not t.startswith(node + ".")}

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in edges(node):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return out


def test_no_import_cycle_between_modules() -> None:
    found = cycles(import_graph())
    assert not found, "import cycles (counting function-level imports): " + "; ".join(" <-> ".join(c) for c in found)


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layers_import_only_downwards(package: str) -> None:
    modules = project_modules()
    bad = []
    for name, path in modules.items():
        if name.split(".")[0] != package:
            continue
        for target in imported_names(path, name, path.name == "__init__.py"):
            top = target.split(".")[0]
            if top in FORBIDDEN[package]:
                bad.append(f"{name} imports {target}")
    assert not bad, "\n".join(sorted(set(bad)))


def test_modules_stay_readable_in_one_sitting() -> None:
    long = []
    for name, path in project_modules().items():
        lines = len(path.read_text().splitlines())
        if lines <= MAX_LINES:
            continue
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if f"{MAX_LINES} lines" not in doc:  # a long module says why in its docstring
            long.append(f"{name}: {lines} lines")
    assert not long, f"modules over {MAX_LINES} lines without a docstring saying why: {long}"


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a.x": {"a.y"}, "a.y": {"b.z"}, "b.z": {"a.x"}, "c": {"a.x"}, "p": {"p.q"}, "p.q": {"p"}}
    assert cycles(graph) == [["a.x", "a.y", "b.z"]]
