"""archc's packages are ranked and every import points down the ranks (docs/architecture.md).

The ranks, lowest first: `errors` and `common` (no project imports), `ir` (graph vocabulary,
shapes, analysis), `frontend` (spec -> graph), `rewrite` (the engine and its algebra), the pass
catalogue `archc.passes` (the checkout's `passes/`), `backends` (files in and out), `train`, then
`compress` and `space` (side by side: neither imports the other), `cli`, and the package facade.
A module may import its own package and any lower rank; an import of a higher rank, or of a
sibling package of the same rank, is a violation. Every import counts, the ones inside functions
too (they hide an upward dependency at import time, not in the design), and cycles are found
even within one package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
RANKS = {
    "archc.errors": 0, "archc.common": 0,
    "archc.ir": 1,
    "archc.frontend": 2,
    "archc.rewrite": 3,
    "archc.passes": 4,
    "archc.backends": 5,
    "archc.train": 6,
    "archc.compress": 7, "archc.space": 7,
    "archc.cli": 8,
    "archc": 9, "archc.__main__": 9,
}


def layer(module: str) -> str:
    """The ranked unit a module belongs to: its package under archc (or the facade itself)."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


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
            names = [alias.name for alias in node.names]
            if base != "archc" or names != ["__version__"]:  # the version string is no layer
                found.add(base)
            found.update(f"{base}.{name}" for name in names)
    return {m for m in found if m in known}


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
    """Cycles, modules outside every ranked package, and imports that do not point down."""
    graph = import_graph(sources)
    problems = [f"cycle: {' -> '.join([*cycle, cycle[0]])}"
                for cycle in nx.simple_cycles(graph)]
    problems += [f"{name} is in no ranked package" for name in graph if layer(name) not in RANKS]
    for source, target in graph.edges:
        here, there = layer(source), layer(target)
        if here == there or here not in RANKS or there not in RANKS:
            continue
        if RANKS[there] > RANKS[here]:
            problems.append(f"{source} imports {target}: {there} is above {here}")
        elif RANKS[there] == RANKS[here]:
            problems.append(f"{source} imports {target}: {there} is a sibling of {here}")
    return sorted(problems)


def project_sources() -> dict[str, str]:
    return {module_name(path): path.read_text()
            for folder in ("archc", "passes") for path in sorted((ROOT / folder).rglob("*.py"))}


def test_the_project_is_layered():
    assert layering_problems(project_sources()) == []


def test_the_top_level_holds_only_the_facade_and_the_errors():
    modules = sorted(p.name for p in (ROOT / "archc").glob("*.py"))
    assert modules == ["__init__.py", "__main__.py", "errors.py"]


def test_every_package_is_installed():
    """A plain (not editable) `pip install .` installs the packages pyproject.toml lists."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"])
    on_disk = {module_name(init.parent / "__init__.py")
               for init in (ROOT / "archc").rglob("__init__.py")}
    assert on_disk <= listed, sorted(on_disk - listed)


def test_a_cycle_is_found_even_through_a_function_level_import():
    sources = project_sources()
    sources["archc.frontend.regnet"] += ("\n\ndef _later():\n"
                                         "    from archc.frontend.spec import Spec\n")
    problems = layering_problems(sources)
    assert any(p.startswith("cycle:") and "archc.frontend.regnet" in p
               and "archc.frontend.spec" in p for p in problems), problems


@pytest.mark.parametrize("module, statement, expected", [
    # the engine may not load the catalogue
    ("archc.rewrite.pipeline", "\n\ndef _registry():\n    import archc.passes\n",
     "archc.rewrite.pipeline imports archc.passes: archc.passes is above archc.rewrite"),
    # the graph layer may not load the spec frontend (pydantic and every block)
    ("archc.ir.analysis", "\nfrom archc.frontend.blocks.registry import BLOCKS\n",
     "archc.ir.analysis imports archc.frontend.blocks.registry: archc.frontend is above "
     "archc.ir"),
    # a pass may not load an exporter
    ("archc.passes.canonical", "\n\ndef f():\n    from archc.backends.export import export_onnx\n",
     "archc.passes.canonical imports archc.backends.export: archc.backends is above archc.passes"),
    # compression and design spaces are siblings
    ("archc.compress.pruning", "\nimport archc.space.records\n",
     "archc.compress.pruning imports archc.space.records: archc.space is a sibling of "
     "archc.compress"),
])
def test_an_import_that_does_not_point_down_is_found(module, statement, expected):
    sources = project_sources()
    assert expected not in layering_problems(sources)
    sources[module] += statement
    assert expected in layering_problems(sources)


def test_a_module_outside_the_ranked_packages_is_found():
    sources = {**project_sources(), "archc.misc.helpers": ""}
    assert "archc.misc.helpers is in no ranked package" in layering_problems(sources)


@pytest.mark.parametrize("statement, expected", [
    ("import archc.frontend.spec", {"archc.frontend.spec"}),
    ("from archc.rewrite import weight_algebra as wa", {"archc.rewrite",
                                                        "archc.rewrite.weight_algebra"}),
    ("from . import graph", {"archc.ir", "archc.ir.graph"}),
    ("from .graph import describe", {"archc.ir.graph"}),
    ("import torch", set()),
])
def test_imports_are_read_in_every_spelling(statement, expected):
    known = {"archc", "archc.ir", "archc.rewrite", "archc.frontend.spec", "archc.ir.graph",
             "archc.ir.shapes", "archc.rewrite.weight_algebra"}
    assert imported_modules(statement, "archc.ir.shapes", known) == expected
