"""eventcore's modules import one another one way: core model -> executor -> stores -> projections -> CLI.

The graph is read from the source with `ast`: every import statement, those inside functions (lazy)
and under TYPE_CHECKING included, and `importlib.import_module("...")` of a literal name.
"""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"


def _modules(root: Path) -> dict[str, tuple[Path | None, bool]]:
    """Module name -> (source path or None for a compiled module, is a package), under package `root`."""
    found: dict[str, tuple[Path | None, bool]] = {}
    for path in root.rglob("*"):
        parts = list(path.relative_to(root.parent).parts)
        if path.suffix == ".py":
            if parts[-1] == "__init__.py":
                found[".".join(parts[:-1])] = (path, True)
            else:
                found[".".join(parts[:-1] + [path.stem])] = (path, False)
        elif path.suffix in (".pyi", ".so", ".pyd") and path.name != "__init__.pyi":
            found.setdefault(".".join(parts[:-1] + [path.name.split(".")[0]]), (None, False))
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports (a `from package import name` counts as
    importing the submodule `name` when there is one, else the package)."""
    modules = _modules(root)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, (path, is_package) in modules.items():
        if path is None:
            continue
        package = name if is_package else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                           for alias in node.names]
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr == "import_module" and node.args
                  and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                targets = [node.args[0].value]
            for target in targets:
                # `import a.b.c` imports a, a.b and a.b.c: the deepest one known stands for them.
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_among_eventcore_modules():
    graph = import_graph(SRC / "eventcore")
    assert {"eventcore.stores.base", "eventcore.projections.runner"} <= set(graph)
    assert "eventcore.stores.base" in graph["eventcore.stores.memory"]
    assert cycles(graph) == []


def test_stores_import_nothing_above_them():
    graph = import_graph(SRC / "eventcore")
    above = ("eventcore.executor", "eventcore.metrics", "eventcore.projections", "eventcore.cli", "eventcore.bench")
    upward = {(m, t) for m, targets in graph.items() if m.startswith("eventcore.stores")
              for t in targets if t == "eventcore" or t.startswith(above)}
    assert upward == set()


def test_projections_import_no_backend_driver():
    drivers = {"sqlite3", "fcntl", "msvcrt", "psycopg", "psycopg_pool"}
    for path in (SRC / "eventcore" / "projections").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = {(node.module or "").split(".")[0]}
            else:
                continue
            assert not names & drivers, f"{path.name} imports {names & drivers}"


def test_the_check_sees_a_cycle_through_a_lazy_import(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from .sub import b\n")
    (package / "sub" / "b.py").write_text("def f():\n    from .. import a\n")
    (package / "c.py").write_text("import importlib\nimportlib.import_module('pkg.a')\n")
    graph = import_graph(package)
    assert graph["pkg.c"] == {"pkg.a"}
    assert cycles(graph) == [["pkg.a", "pkg.sub.b"]]
