"""The layout of difftool's modules: imports among them run one way, with no circle.

The graph is read from the source with ast, imports inside functions included, so this test is
fast and imports neither difftool nor torch.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted([*ROOT.glob("difftool/*.py"), *ROOT.glob("difftool/builtins/*.py")])}


def imported(name: str, path: Path) -> set[str]:
    """The difftool modules that `name` imports anywhere in its source (top level or in a function)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from .y import z
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            # from difftool import build: the submodule; from difftool.build import model: the module
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # difftool.builtins.models.x -> difftool.builtins.models
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: imported(name, path) for name, path in MODULES.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other in a circle (Tarjan's strongly connected components)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
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
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
                on_stack.discard(group[-1])
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def reachable(start: str) -> set[str]:
    """Every module `start` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for w in GRAPH[todo.pop()] - seen:
            seen.add(w)
            todo.append(w)
    return seen


def test_the_graph_sees_imports_inside_functions():
    assert len(MODULES) > 30 and "difftool.builtins.objectives" in MODULES
    assert "difftool.sampling" in GRAPH["difftool.build"]  # only inside noise_scheduler and sampling_scheduler
    assert {"difftool.build", "difftool.adapters", "difftool.sampling"} <= GRAPH["difftool.runs"]


def test_difftool_modules_import_each_other_in_no_circle():
    found = cycles(GRAPH)
    described = "; ".join(
        ", ".join(f"{m} -> {sorted(GRAPH[m] & set(group))}" for m in group) for group in found)
    assert not found, f"modules that import each other in a circle: {described}"


def test_finished_runs_sit_above_build_adapters_and_sampling():
    """Loading a finished run needs build, adapters and sampling; none of them needs difftool.runs,
    adapters needs neither build nor sampling, and sampling needs neither build nor runs."""
    for low in ("difftool.build", "difftool.adapters", "difftool.sampling"):
        assert "difftool.runs" not in reachable(low), f"{low} imports difftool.runs"
    for low, higher in (("difftool.adapters", {"difftool.build", "difftool.sampling"}),
                        ("difftool.sampling", {"difftool.build", "difftool.runs"})):
        assert not higher & reachable(low), f"{low} imports {sorted(higher & reachable(low))}"
