"""The package's layout rules, checked on the source.

* no import cycles, counting imports inside functions (a lazy import still ties two modules together);
* no private name (``_x``) imported from another module;
* no import from a private module (``_x.py``) outside the package that holds it;
* the executor side apart from the driver side; the coordinator free of pyspark and the launch layer.
"""

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


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _import_froms(name: str, path: pathlib.Path) -> list[tuple[str, str]]:
    """``(module, imported name)`` of every ``from ... import ...`` anywhere in the module (functions included)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: list[tuple[str, str]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rsplit(".", 1)[0]
            mod = (f"{base}.{node.module}" if node.module else base) if node.level else (node.module or "")
            found.extend((mod, alias.name) for alias in node.names)
        elif isinstance(node, ast.Import):
            found.extend((alias.name, "") for alias in node.names)
    return found


def _imports() -> dict[str, set[str]]:
    """Module -> the sparkhydrogen modules it imports, at module level or inside functions."""
    graph: dict[str, set[str]] = {}
    modules = _modules()
    for name, path in modules.items():
        found: set[str] = set()
        for mod, alias in _import_froms(name, path):
            found.update(t for t in (mod, f"{mod}.{alias}") if t in modules and t != name)
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


def test_no_import_cycles_counting_imports_inside_functions() -> None:
    graph = _imports()
    # a package __init__ re-exporting its submodules is not a cycle of modules
    modules = {n: {d for d in deps if not (n.startswith(d + ".") and d in graph)} for n, deps in graph.items()}
    assert _cycle(modules) == []


def _private(part: str) -> bool:
    return part.startswith("_") and not part.startswith("__")


def test_no_private_name_is_imported_from_another_module() -> None:
    modules = _modules()
    offenders = [f"{name} imports {mod}.{alias}" for name, path in modules.items()
                 for mod, alias in _import_froms(name, path)
                 if mod.startswith("sparkhydrogen") and _private(alias) and f"{mod}.{alias}" not in modules
                 and mod != name]
    assert offenders == []


def test_no_import_from_a_private_module_outside_its_package() -> None:
    modules = _modules()
    offenders = []
    for name, path in modules.items():
        for mod, alias in _import_froms(name, path):
            dest = f"{mod}.{alias}" if f"{mod}.{alias}" in modules else mod
            if dest not in modules or dest == name or not any(_private(p) for p in dest.split(".")[1:]):
                continue
            owner = dest.rsplit(".", 1)[0]  # the package holding the private module
            if not (name == owner or name.startswith(owner + ".")):
                offenders.append(f"{name} imports {dest}")
    assert sorted(set(offenders)) == []


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
