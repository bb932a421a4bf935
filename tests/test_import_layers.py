"""The packages' floors, read from every import statement (at the top of a module or inside a function): no import
cycle between modules, and no upward import (model_core imports neither pyramid_app nor training; training does not
import pyramid_app; inside pyramid_app, options/ imports no other part of it and jobs/ only options/)."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model_core", "pyramid_app", "training")
FORBIDDEN = {  # package -> what none of its modules may import
    "model_core": ("pyramid_app", "training"),
    "training": ("pyramid_app",),
    "pyramid_app.options": ("pyramid_app.jobs", "pyramid_app.studio", "pyramid_app.cli"),
    "pyramid_app.jobs": ("pyramid_app.studio", "pyramid_app.cli"),
}


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def module_files() -> dict:
    """Module name -> file, for every module of the three packages."""
    found = {}
    for package in PACKAGES:
        for file in sorted((ROOT / package).rglob("*.py")):
            parts = file.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = file
    return found


def imported_modules(name: str, file: Path, modules: dict) -> set:
    """The modules of the three packages that `file` imports anywhere in its body."""
    package = name.split(".") if file.name == "__init__.py" else name.split(".")[:-1]
    targets = set()
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            targets.add(base)
            targets.update(f"{base}.{alias.name}" for alias in node.names)
    return {target for target in targets if target in modules} - {name}


def import_graph() -> dict:
    modules = module_files()
    return {name: imported_modules(name, file, modules) for name, file in modules.items()}


def cycles(graph: dict) -> list:
    """The strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for neighbour in graph[node]:
            if neighbour not in index:
                visit(neighbour)
                low[node] = min(low[node], low[neighbour])
            elif neighbour in on_stack:
                low[node] = min(low[node], index[neighbour])
        if low[node] == index[node]:
            group = []
            while not group or group[-1] != node:
                group.append(stack.pop())
                on_stack.discard(group[-1])
            if len(group) > 1:
                groups.append(sorted(group))

    for node in graph:
        if node not in index:
            visit(node)
    return groups


def test_no_module_imports_another_that_imports_it_back():
    assert cycles(import_graph()) == []


def test_no_package_imports_a_floor_above_it():
    upward = [(name, target) for name, targets in import_graph().items() for target in targets
              for package, floors_above in FORBIDDEN.items() if within(name, package)
              if any(within(target, above) for above in floors_above)]
    assert upward == []


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ({"a": {"b"}, "b": set()}, []),
])
def test_the_cycle_finder_finds_cycles(graph, expected):
    assert cycles(graph) == expected
