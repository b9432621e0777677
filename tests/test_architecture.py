"""The package's layering: no import cycles, one reader of ``config.task``, a thin CLI.

The import graph is read from the source with ``ast``: every ``import`` and
``from ... import`` of a ``diffusionforge`` module, at module level *and*
inside functions, is an edge. A function-local import that closes a cycle is
a cycle all the same (it only moves the failure to run time), so it fails here
too. Edges go to the module named (``from .x import y`` goes to ``pkg.x.y``
when that is a module, else to ``pkg.x``); importing a submodule does not add
an edge to its package's ``__init__``, as Python resolves that without a cycle.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = "diffusionforge"
SRC = Path(__file__).resolve().parent.parent / "src" / PACKAGE


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(SRC.rglob("*.py"))}


def resolve(current: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute module a (possibly relative) import names."""
    if level == 0:
        return target or ""
    base = current.split(".") if is_package else current.split(".")[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def imports_of(name: str, path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every import of a package module in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    local_lines = {node.lineno for func in ast.walk(tree) if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for node in ast.walk(func) if isinstance(node, (ast.Import, ast.ImportFrom))}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = resolve(name, is_package, node.level, node.module)
            targets = [f"{module}.{alias.name}" if f"{module}.{alias.name}" in MODULES else module
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES and "." in target:  # `import a.b.c` of an attribute path
                target = target.rsplit(".", 1)[0]
            if target in MODULES and target != name:
                found.append((target, node.lineno, node.lineno in local_lines))
    return found


GRAPH = {name: imports_of(name, path) for name, path in MODULES.items()}


def cycles(graph: dict[str, list[tuple[str, int, bool]]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, result = {}, {}, [], set(), []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target, _, _ in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return result


def test_the_graph_is_read():
    assert len(MODULES) > 100
    assert ("diffusionforge.runs", ) and any(t == "diffusionforge.runs" for t, _, _ in GRAPH["diffusionforge.training"])
    # a function-local import is an edge too
    assert any(local for t, _, local in GRAPH["diffusionforge.cli.sample"] if t == "diffusionforge.tasks")


def test_no_import_cycles_even_through_function_local_imports():
    found = cycles(GRAPH)
    details = []
    for component in found:
        members = set(component)
        edges = [f"{a} -> {t} (line {line}{', function-local' if local else ''})"
                 for a in component for t, line, local in GRAPH[a] if t in members]
        details.append("; ".join(edges))
    assert not found, "import cycles: " + " | ".join(details)


def test_a_cycle_is_found_when_there_is_one():
    graph = {"a": [("b", 1, False)], "b": [("c", 1, True)], "c": [("a", 1, False)], "d": [("a", 1, False)]}
    assert cycles(graph) == [["a", "b", "c"]]


def third_party_top_level(path: Path) -> set[str]:
    """The top-level names of the outside packages a module imports at module level."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names - {PACKAGE}


def reached_from(start: str, top_level_only: bool = True) -> set[str]:
    reached, todo = {start}, [start]
    while todo:
        for target, _, local in GRAPH[todo.pop()]:
            if target not in reached and not (local and top_level_only):
                reached.add(target)
                todo.append(target)
    return reached


def test_run_directory_handling_and_config_loading_import_no_model_code():
    """runs.py and the config loader reach neither torch nor Lightning (nor any module that imports them)."""
    for start in ("diffusionforge.runs", "diffusionforge.config.loader"):
        heavy = {m: third_party_top_level(MODULES[m]) & {"torch", "lightning", "transformers", "torchmetrics"}
                 for m in reached_from(start)}
        assert not {m: h for m, h in heavy.items() if h}, start


def test_only_the_task_registry_reads_config_task():
    """The kind of run is chosen in one place, ``tasks.base.task_of``: no `task ==` switches elsewhere, and
    ``config.task`` is read only there (messages that name it aside)."""
    switch = re.compile(r"\btask\s*(==|!=)|\.task\s+(not\s+)?in\b")
    offenders = [f"{path.relative_to(SRC)}:{number}" for path in MODULES.values()
                 for number, line in enumerate(path.read_text().splitlines(), 1)
                 if switch.search(line)]
    assert offenders == []
    readers = [f"{path.relative_to(SRC)}:{number}" for path in MODULES.values()
               for number, line in enumerate(path.read_text().splitlines(), 1)
               if re.search(r"config\.task\b", line.split("#")[0]) and "{config.task" not in line
               and "``config.task``" not in line]
    assert readers == ["tasks/base.py:" + str(next(i for i, line in enumerate(
        (SRC / "tasks" / "base.py").read_text().splitlines(), 1) if "TASKS[config.task]" in line))]


@pytest.mark.parametrize("command", ["train", "sample", "evaluate", "story", "translate", "convert", "plot",
                                     "serve", "presets", "main"])
def test_cli_modules_import_no_heavy_module_at_top_level(command):
    """A CLI module parses arguments, calls the library and prints: at import time it needs only the
    standard library and the torch-free helpers, so `dforge --help` is quick."""
    allowed = {"diffusionforge.errors", "diffusionforge.utils.outputs", "diffusionforge.config.loader",
               "diffusionforge.cli.sample", "diffusionforge.cli.presets", "diffusionforge.cli.plot",
               *(f"diffusionforge.cli.{c}" for c in ("train", "sample", "evaluate", "story", "translate",
                                                    "convert", "plot", "presets"))}
    top_level = {t for t, _, local in GRAPH[f"diffusionforge.cli.{command}"] if not local}
    assert top_level <= allowed, top_level - allowed
