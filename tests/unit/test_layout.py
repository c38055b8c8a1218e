"""The package's layout rules, checked on the source: no import cycles, executor side apart from driver side."""

from __future__ import annotations

import ast
import pathlib

import sparkhydrogen

ROOT = pathlib.Path(sparkhydrogen.__file__).parent


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports() -> dict[str, set[str]]:
    """Module -> the sparkhydrogen modules it imports at module level (lazy imports inside functions excluded)."""
    graph: dict[str, set[str]] = {}
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found: set[str] = set()
        for node in ast.parse(path.read_text()).body:  # top level only
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(node.level - 1):
                    base = base.rsplit(".", 1)[0]
                mod = (f"{base}.{node.module}" if node.module else base) if node.level else (node.module or "")
                targets = [mod] + [f"{mod}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            found.update(t for t in targets if t in modules and t != name)
        graph[name] = found
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return []


def test_no_import_cycles_outside_package_inits() -> None:
    graph = _imports()
    # a package __init__ re-exporting its submodules is not a cycle of modules
    modules = {n: {d for d in deps if not (n.startswith(d + ".") and d in graph)} for n, deps in graph.items()}
    assert _cycle(modules) == []


def test_executor_side_never_imports_the_driver_side() -> None:
    graph = _imports()
    offenders = {n: sorted(d for d in deps if d.startswith("sparkhydrogen.launch"))
                 for n, deps in graph.items() if n.startswith("sparkhydrogen.task")}
    assert {n: d for n, d in offenders.items() if d} == {}


def test_coordinator_never_imports_pyspark_or_the_launch_layer() -> None:
    """The coordinator must run inside a task too (Spark Connect), so it imports neither, even lazily."""
    for path in (ROOT / "coordinator").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                assert not name.startswith("pyspark"), f"{path.name} imports {name}"
                assert "launch" not in name and not name.startswith(("..task", "sparkhydrogen.task")), \
                    f"{path.name} imports {name}"
