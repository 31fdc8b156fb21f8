"""No import circles inside qwenkit: every `import` (module-level or inside a function) is an
edge, `from package import module` an edge to that module; the graph must have no cycle. Nor
between folders: with each of qwenkit's subpackages taken as one node (a top-level module is its
own), `loader/` importing `distributed/` in one module while `distributed/` imports `loader/` in
another is a circle too, though no module imports itself back."""

import ast
from pathlib import Path

import qwenkit

PACKAGE = Path(qwenkit.__file__).parent


def _import_graph() -> dict[str, set[str]]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                submodules = [f"{node.module}.{alias.name}" for alias in node.names]
                targets = [t for t in submodules if t in modules] or [node.module]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_package_has_no_import_circles():
    cycle = _cycle(_import_graph())
    assert cycle is None, " -> ".join(cycle)


def _package(module: str) -> str:
    """The node of a module in the package graph: qwenkit's subpackage holding it (its first two
    dotted names), or the top-level module itself."""
    return ".".join(module.split(".")[:2])


def _package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    packages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        node = _package(module)
        packages.setdefault(node, set()).update(_package(t) for t in targets if _package(t) != node)
    return packages


def test_the_package_folders_have_no_import_circles():
    cycle = _cycle(_package_graph(_import_graph()))
    assert cycle is None, " -> ".join(cycle)


def test_the_package_check_finds_a_circle_no_module_sees():
    modules = {"q.loader": {"q.distributed.shard"}, "q.distributed.shard": set(),
               "q.distributed.executor": {"q.loader"}}
    assert _cycle(modules) is None
    assert _cycle(_package_graph(modules)) == ["q.distributed", "q.loader", "q.distributed"]


def test_the_check_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
