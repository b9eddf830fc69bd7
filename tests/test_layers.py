"""The import graph of archc/ and passes/ (installed as `archc.passes`) is acyclic and one-way:
the core never imports the catalogue. Every import counts, the ones inside functions too (they
hide cycles at import time, not in the design)."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
# The top layer: the command lines and the package facade may import everything.
TOP = {"archc.__main__", "archc.__init__", "archc"}
CATALOGUE = "archc.passes"


def is_top(name: str) -> bool:
    return name in TOP or name == "archc.cli" or name.startswith("archc.cli_")


def module_name(path: Path) -> str:
    """The module's import name; the checkout's `passes/` folder installs as `archc.passes`."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[0] == "passes":
        parts = ("archc", *parts)
    return ".".join(parts[:-1]) if parts[-1] == "__init__" else ".".join(parts)


def imported_modules(source: str, name: str, known: set[str]) -> set[str]:
    """The project modules `source` (module `name`) imports, anywhere in its body."""
    package = name if name in known and any(k.startswith(f"{name}.") for k in known) else (
        name.rpartition(".")[0])
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    # importing a.b.c runs the packages a and a.b first
    parents = {".".join(m.split(".")[:i]) for m in found for i in range(1, m.count(".") + 1)}
    return {m for m in found | parents if m in known}


def import_graph(sources: dict[str, str]) -> nx.DiGraph:
    """module -> the project modules it imports (a package's own `__init__` is the package)."""
    known = set(sources)
    graph = nx.DiGraph()
    graph.add_nodes_from(known)
    for name, source in sources.items():
        for target in imported_modules(source, name, known):
            if target != name:
                graph.add_edge(name, target)
    return graph


def layering_problems(sources: dict[str, str]) -> list[str]:
    """Import cycles, and imports of the catalogue from core modules (all but the top layer)."""
    graph = import_graph(sources)
    problems = [f"cycle: {' -> '.join([*cycle, cycle[0]])}"
                for cycle in nx.simple_cycles(graph)]
    for source, target in graph.edges:
        in_catalogue = source == CATALOGUE or source.startswith(f"{CATALOGUE}.")
        core = source.startswith("archc") and not is_top(source) and not in_catalogue
        if core and (target == CATALOGUE or target.startswith(f"{CATALOGUE}.")):
            problems.append(f"core module {source} imports the catalogue ({target})")
    return sorted(problems)


def project_sources() -> dict[str, str]:
    return {module_name(path): path.read_text()
            for folder in ("archc", "passes") for path in sorted((ROOT / folder).rglob("*.py"))}


def test_the_project_is_layered():
    assert layering_problems(project_sources()) == []


def test_a_cycle_is_found_even_through_a_function_level_import():
    sources = project_sources()
    sources["archc.regnet"] += "\n\ndef _later():\n    from archc.spec import Spec\n"
    problems = layering_problems(sources)
    assert any(p.startswith("cycle:") and "archc.regnet" in p and "archc.spec" in p
               for p in problems), problems


def test_a_core_import_of_the_catalogue_is_found():
    sources = project_sources()
    sources["archc.pipeline"] += "\n\ndef _registry():\n    import archc.passes\n"
    assert "core module archc.pipeline imports the catalogue (archc.passes)" in layering_problems(
        sources)
    sources = project_sources()
    sources["archc.analysis"] += "\nfrom archc.passes.cleanup import IDENTITY_RULES\n"
    assert any("archc.analysis imports the catalogue" in p for p in layering_problems(sources))


@pytest.mark.parametrize("statement, expected", [
    ("import archc.spec", {"archc", "archc.spec"}),
    ("from archc import weight_algebra as wa", {"archc", "archc.weight_algebra"}),
    ("from . import graph", {"archc", "archc.graph"}),
    ("from .graph import describe", {"archc", "archc.graph"}),
    ("import torch", set()),
])
def test_imports_are_read_in_every_spelling(statement, expected):
    known = {"archc", "archc.spec", "archc.graph", "archc.weight_algebra", "archc.rules"}
    assert imported_modules(statement, "archc.rules", known) == expected
