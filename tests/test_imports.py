"""No import circles in gem3d/ (issue #23): every `import` and `from ... import` anywhere in a module, function-level
and TYPE_CHECKING ones included, is an edge of the module graph, and the graph has no cycle.

The one mechanism that is not an edge: the method registry imports a method's implementation module by its
dotted name when the method is used (gem3d/methods/registry.py, `implementation`), as nnU-Net finds a trainer."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO


def module_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (a name imported from a package that is a module of it counts as
    that module)."""
    root = package.parent
    files = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        files[".".join(parts[:-1] if is_package else parts)] = (path, is_package)

    def known(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, (path, is_package) in files.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {known(alias.name) for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = name.split(".") if is_package else name.split(".")[:-1]
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                for alias in node.names:
                    target = f"{base}.{alias.name}"
                    edges.add(target if target in files else known(base))
        graph[name] = edges - {None, name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_gem3d_has_no_import_circle():
    graph = module_graph(REPO / "gem3d")
    assert len(graph) > 90 and "gem3d.methods.registry" in graph["gem3d.config"]
    assert circles(graph) == []


def test_the_walk_finds_circles_through_function_level_and_type_checking_imports(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from pkg.sub.c import C\n")
    (package / "a.py").write_text("from pkg import b\n")
    (package / "b.py").write_text("def f():\n    from .sub import c\n")
    (package / "sub" / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.a\nC = 1\n")
    (package / "d.py").write_text("import pkg.a\n")  # into the circle, not part of it
    graph = module_graph(package)
    assert graph["pkg.b"] == {"pkg.sub.c"} and graph["pkg.sub.c"] == {"pkg.a"}
    assert circles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c"]]


def test_the_registry_imports_no_method_module():
    """config.py validates through the registry, which holds data and imports method modules by name only."""
    graph = module_graph(REPO / "gem3d")
    assert graph["gem3d.methods.registry"] == {"gem3d.io"}
    assert not {"gem3d.methods.pix2pix", "gem3d.methods.ldm3d", "gem3d.methods.volume"} & graph["gem3d.config"]
