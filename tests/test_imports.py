"""No import circle inside bev3d: the graph of every import statement (module level and inside functions),
read with `ast`, has no cycle."""

import ast
from pathlib import Path

import bev3d

PACKAGE = Path(bev3d.__file__).resolve().parent


def _module_name(path, root):
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root=PACKAGE):
    """{module: set of bev3d modules it imports}. `from X import Y` points at X.Y when that is a module, else X."""
    files = {_module_name(p, root): p for p in root.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: strip level - 1 packages off this module's package
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in files and t != name}
        graph[name] = edges
    return graph


def find_cycle(graph):
    """One cycle of `graph` as a list of nodes (first == last), or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
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


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]


def test_graph_sees_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "bev3d"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("def f():\n    from bev3d.sub import b\n")
    (pkg / "sub" / "b.py").write_text("from . import a\n")
    graph = import_graph(pkg)
    assert graph["bev3d.sub.a"] == {"bev3d.sub.b"} and graph["bev3d.sub.b"] == {"bev3d.sub.a"}
    assert find_cycle(graph) is not None


def test_bev3d_has_no_import_circle():
    graph = import_graph()
    assert "bev3d.engine.train" in graph and "bev3d.models.core.criterion" in graph
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)
