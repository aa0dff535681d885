"""The layout: every import points down the layers, and no module imports itself back through others.

Layers, bottom to top (a module may import its own layer and the ones below, never above):

    core -> data -> models -> web -> run -> tasks -> evalsets -> synth -> training -> filters -> select -> stages
    -> workflows

Every import counts, also those inside functions (they hide cycles, they do not remove them).
"""

import ast
import os
import re

import pytest

from winnow.workflows.cli import COMMANDS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = [f"winnow.{name}" for name in (
    "pipeline.core", "pipeline.data", "pipeline.models", "pipeline.web", "pipeline.run", "pipeline.tasks",
    "pipeline.evalsets", "pipeline.synth", "pipeline.training", "filters", "pipeline.select", "pipeline.stages",
    "workflows")]
PACKAGES = ("pipeline", "filters", "workflows", "manifests")  # folders, installed as winnow.<folder>


def modules() -> dict[str, str]:
    """Module name -> file, for every module of the project's packages (``workflows/api`` is ``winnow`` itself)."""
    out = {}
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].replace(os.sep, ".")
                    rel = "winnow" + rel.removeprefix("workflows.api") if rel.startswith("workflows.api") else \
                        f"winnow.{rel}"
                    out[rel.removesuffix(".__init__")] = os.path.join(folder, f)
    return out


def layer(module: str) -> int:
    """Index of the module's layer; the bare packages (``pipeline``: the version; ``manifests``: data) are 0,
    ``winnow`` itself (the Python API, an entry point) is the top layer's."""
    if module == "winnow":
        return len(LAYERS) - 1
    for i, prefix in reversed(list(enumerate(LAYERS))):
        if module == prefix or module.startswith(prefix + "."):
            return i
    return 0


def imports(known: dict[str, str]) -> dict[str, set[str]]:
    """Module -> the project modules it imports (anywhere in its body)."""
    edges: dict[str, set[str]] = {}
    for module, path in known.items():
        package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
            else:
                continue
            for name in names:
                while name and name not in known:  # a name inside a module: the module
                    name = name.rpartition(".")[0]
                if name and name != module:
                    targets.add(name)
        edges[module] = targets
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
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
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


@pytest.fixture(scope="module")
def graph():
    known = modules()
    return known, imports(known)


def test_every_import_points_down_the_layers(graph):
    _, edges = graph
    upward = sorted(f"{m} (layer {LAYERS[layer(m)]}) imports {t} (layer {LAYERS[layer(t)]})"
                    for m, targets in edges.items() for t in targets if layer(t) > layer(m))
    assert not upward, "\n".join(upward)


def test_there_is_no_import_cycle(graph):
    _, edges = graph
    found = cycles(edges)
    assert not found, "\n".join(" <-> ".join(c) for c in found)


def test_the_checks_catch_what_they_are_for():
    """The graph code itself: an upward edge and a cycle in a made-up graph are found."""
    edges = {"winnow.pipeline.core.a": {"winnow.pipeline.stages.b"},
             "winnow.pipeline.stages.b": {"winnow.pipeline.stages.c"},
             "winnow.pipeline.stages.c": {"winnow.pipeline.stages.b"}}
    assert layer("winnow.pipeline.stages.b") > layer("winnow.pipeline.core.a")
    assert cycles(edges) == [["winnow.pipeline.stages.b", "winnow.pipeline.stages.c"]]
    known = modules()
    assert "winnow.pipeline.stages.ingest" in known and "winnow.workflows.cli" in known
    assert "winnow.filters.clip" in known


def test_architecture_map_names_every_command_and_existing_modules():
    """pipeline/README.md maps every command to its module in one hop: each command of the CLI table has a row,
    and every module path it names exists."""
    text = open(os.path.join(ROOT, "pipeline", "README.md")).read()
    rows = {m.group(1).split()[0] for m in re.finditer(r"^\| `(?:winnow )?([^`]+)` \|", text, re.M)}
    for command in COMMANDS:
        assert command.name in rows or command.name.replace("_", "-") in rows, f"{command.name} has no row"
    named = set(re.findall(r"`((?:pipeline|workflows|filters)/[\w/]+\.py)`", text))
    assert len(named) > 20
    missing = sorted(p for p in named if not os.path.exists(os.path.join(ROOT, p)))
    assert not missing, f"pipeline/README.md names modules that do not exist: {missing}"
