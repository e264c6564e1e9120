"""Imports go one way: no module of the package reaches, directly or through others, back to
itself (function-level imports included), and ``errors`` imports nothing of the package."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "jaxprune"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (``from jaxprune.x import y`` names the module
    ``jaxprune.x.y`` when that is a module, else ``jaxprune.x``)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("jaxprune")}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jaxprune"):
                for alias in node.names:
                    child = f"{node.module}.{alias.name}"
                    found.add(child if child in modules else node.module)
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 30
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_lower_layers_import_no_higher_one():
    graph = import_graph()
    assert graph["jaxprune.errors"] == set()
    # The math and the models know no method, pipeline or command.
    higher = ("jaxprune.methods", "jaxprune.pipeline", "jaxprune.job", "jaxprune.commands")
    for low in ("jaxprune.objective", "jaxprune.objective_vjp", "jaxprune.models.llama"):
        assert not {m for m in graph[low] if m.startswith(higher)}, low
    # Methods never import the run's config class (it is built from them) nor the pipeline.
    for name, deps in graph.items():
        if name.startswith("jaxprune.methods"):
            assert not deps & {"jaxprune.prune_config", "jaxprune.pipeline"}, name
