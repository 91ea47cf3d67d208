"""The package's layout: its import graph has no circle."""

import ast
import pathlib

import keras_colopt

ROOT = pathlib.Path(keras_colopt.__file__).parent


def _module(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path, name: str = "", package: bool = False):
    """Every module `path` imports, at any depth (a function's own import counts: it closes
    a circle as surely when it runs), relative imports resolved from module `name` (a
    package's `__init__` when `package`); `from a import b` yields `a` and `a.b`."""
    here = name if package else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = here.split(".")[:len(here.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            yield base
            yield from (f"{base}.{a.name}" for a in node.names)


def _graph():
    files = {_module(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        deps = set()
        for target in _imports(path, name, path.name == "__init__.py"):
            # `from keras_colopt.engines import tfmot` names a module; `... import get_engine`
            # names an attribute of its package's __init__.
            while target and target not in files:
                target = target.rpartition(".")[0]
            # A package's __init__ runs before any of its modules: importing it is no edge
            # back from its own modules.
            if target and target != name and not name.startswith(target + "."):
                deps.add(target)
        graph[name] = deps
    return graph


def _cycle(graph):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_import_graph_has_no_circle():
    graph = _graph()
    assert "keras_colopt.fit" in graph and "keras_colopt.runner" in graph["keras_colopt.fit"]
    cycle = _cycle({k: v for k, v in graph.items() if k != "keras_colopt"})
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_circle_finder_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
