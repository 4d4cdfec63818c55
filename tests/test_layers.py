"""No import cycles among the modules of src/fedsrd, counting imports inside functions (imports under
`if TYPE_CHECKING:` only name types and never run, so they are not counted) and the package ``__init__`` that an
import of one of its modules runs first."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in (SRC / "fedsrd").rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = path
    return mods


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports when it runs (at the top or in any function)."""
    mods = _modules()

    def resolve(target: str) -> str | None:
        while target and target not in mods:
            target = target.rsplit(".", 1)[0] if "." in target else ""
        return target or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for module, path in mods.items():
        tree = ast.parse(path.read_text())
        type_only = {
            id(sub)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for sub in ast.walk(node)
        }
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        for node in ast.walk(tree):
            if id(node) in type_only:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for target in targets:
                resolved = resolve(target) if target.startswith("fedsrd") else None
                if resolved and resolved != module:
                    graph[module].add(resolved)
                    # Importing fedsrd.a.b first runs fedsrd.a's __init__ (the root package is already loaded).
                    parts = resolved.split(".")
                    for depth in range(2, len(parts)):
                        parent = ".".join(parts[:depth])
                        if parent in mods and not module.startswith(parent + ".") and parent != module:
                            graph[module].add(parent)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles_in_the_package():
    graph = import_graph()
    assert "fedsrd.runtime.local" in graph["fedsrd.trainer"]  # function-level and top-level imports are both seen
    assert "fedsrd.federation" in graph["fedsrd.hub"]  # fedsrd.federation.callbacks runs fedsrd/federation/__init__
    assert cycles(graph) == []


def test_config_imports_only_the_algorithms_options():
    graph = import_graph()
    reachable, todo = set(), ["fedsrd.config"]
    while todo:
        for imported in graph[todo.pop()] - reachable:
            reachable.add(imported)
            todo.append(imported)
    assert all(m.startswith(("fedsrd.algorithms", "fedsrd.ops", "fedsrd.schedule")) for m in reachable), reachable


def test_the_federation_core_never_imports_a_runtime():
    graph = import_graph()
    for module, imported in graph.items():
        if module.startswith("fedsrd.federation"):
            assert not {m for m in imported if m.startswith(("fedsrd.runtime", "fedsrd.integrations"))}, module
