"""The library's layering: no import cycles, counting imports inside functions, and the
library never imports the app (koclip_app, Streamlit) or the training code.

An import placed inside a function to get round a cycle hides the cycle from
Python but not from this test: it reads every module's source, takes each
`import` wherever it stands, and looks for strongly connected components.
Imports of third-party packages inside functions (transformers, torch-free
readers of optional formats) are fine and not counted.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "koclip"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """koclip module -> the koclip modules it imports (anywhere in its source)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([node.module] if node.module else []))
                # `from koclip import towers` imports the module koclip.towers; `from koclip.x import f`
                # imports koclip.x.
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in files]
                targets = subs if len(subs) == len(node.names) else subs + [base]
            else:
                continue
            for t in targets:
                # `import koclip.a.b` makes koclip.a.b a dependency; a name that is not a module
                # stands for its closest enclosing module.
                while t and t not in files:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    graph[name].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), sorted."""
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
    return sorted(found)


def test_the_checker_finds_a_cycle_through_a_function_level_import():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_library_has_no_import_cycles():
    graph = import_graph()
    assert "koclip.model" in graph and "koclip.towers.bert" in graph
    found = cycles(graph)
    detail = "; ".join(" <-> ".join(c) + " (" + ", ".join(
        f"{v} -> {w}" for v in c for w in sorted(graph[v]) if w in c) + ")" for c in found)
    assert not found, f"import cycles: {detail}"


def test_the_library_never_imports_training_code():
    graph = import_graph()
    offenders = sorted(f"{v} -> {w}" for v, ws in graph.items() if not v.startswith("koclip.train")
                       for w in ws if w.startswith("koclip.train"))
    assert not offenders, offenders


def test_the_library_knows_no_screen():
    """Nothing under koclip/ imports Streamlit or the app's own package (koclip_app)."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            offenders += [f"{path.relative_to(PACKAGE.parent)}: {n}" for n in names
                          if n.split(".")[0] in ("streamlit", "koclip_app")]
    assert not offenders, offenders
