"""docs/ stays true: every registered pass and every named pipeline is documented as it is."""

from __future__ import annotations

import re
from pathlib import Path

from archc.passes.pipelines import PIPELINES
from archc.rewrite.pipeline import list_passes

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_every_pass_has_a_section_with_its_kind():
    text = (DOCS / "passes.md").read_text()
    for name, preserves in ((p.name, p.preserves_function) for p in list_passes()):
        heading = next((line for line in text.splitlines() if line.startswith(f"### `{name}`")),
                       None)
        assert heading is not None, f"docs/passes.md has no section for {name}"
        assert ("exact" in heading) == preserves, heading
        assert ("CHANGES THE FUNCTION" in heading) == (not preserves), heading


def test_pipelines_table_matches_the_configuration():
    text = (DOCS / "passes.md").read_text()
    for name, names in PIPELINES.items():
        listed = ", ".join(f"`{n}`" for n in names) or "(nothing)"
        assert f"| `{name}` | {listed} |" in text, f"pipeline {name} is documented differently"


def test_every_option_is_documented_as_declared():
    text = (DOCS / "passes.md").read_text()
    for info in list_passes():
        for option in info.options:
            row = (f"| `{info.name}.{option.name}` | {option.type.__name__} | "
                   f"{option.default!r} | {option.help} |")
            assert row in text, f"docs/passes.md does not document {info.name}.{option.name}"


def test_docs_cite_no_file_outside_the_project():
    for path in [*DOCS.glob("*.md"), DOCS.parent / "README.md"]:
        text = path.read_text()
        assert "/work/" not in text and "shared/" not in text, path
        assert "REWRITES.md" not in text and "DECISIONS.md" not in text, path


def test_readme_lists_every_doc():
    readme = (DOCS.parent / "README.md").read_text()
    for path in DOCS.glob("*.md"):
        assert f"`docs/{path.name}`" in readme, f"README.md does not list docs/{path.name}"


def test_docs_name_no_machine_paths():
    machine_path = re.compile(r"(?<![\w.])/(home|root|tmp|Users|check|opt|mnt)/")
    for path in [*DOCS.glob("*.md"), DOCS.parent / "README.md"]:
        found = machine_path.search(path.read_text())
        assert found is None, f"{path.name} names a path on a machine: {found.group(0)}"


def test_architecture_lists_every_module():
    text = (DOCS / "architecture.md").read_text()
    for path in sorted((DOCS.parent / "archc").rglob("*.py")):
        if path.stem not in ("__init__", "__main__"):
            name = path.relative_to(DOCS.parent).as_posix()
            assert f"`{name}`" in text, f"docs/architecture.md omits {name}"


def test_readme_test_command_is_what_ci_runs():
    """The README says its test command is what `.ci/run` runs: the same install and pytest."""
    readme = (DOCS.parent / "README.md").read_text()
    ci = (DOCS.parent / ".ci" / "run").read_text()
    command = next(line.strip() for line in readme.splitlines() if "-m pytest" in line)
    assert command in ci, f"README's test command is not in .ci/run: {command}"


def test_measured_tables_are_what_the_bench_prints_from_its_committed_results():
    """The accuracy tables of docs/compression.md and docs/quantization.md (with their intervals
    and paired tests) are printed by the bench scripts from the results files committed beside
    them: no number in them is typed by hand."""
    import subprocess
    import sys

    root = DOCS.parent
    for script, results, doc in (
            ("bench/compression/tables.py", "bench/compression/results.json", "compression.md"),
            ("bench/quantization.py", "--tables bench/quantization.json", "quantization.md")):
        printed = subprocess.run([sys.executable, script, *results.split()], cwd=root, check=True,
                                 capture_output=True, text=True).stdout
        text = (DOCS / doc).read_text()
        tables = [block for block in printed.split("\n\n") if block.startswith("|")]
        assert len(tables) >= 3
        for table in tables:
            assert table.strip() in text, f"docs/{doc} lacks this table of {script}:\n{table}"
