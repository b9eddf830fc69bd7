"""The README's promises, command by command: errors are one line before any work or output (an
output that cannot be written, an extension a command does not write, option combinations, pass
names), every command takes --quiet, and what the commands print reads right."""

from __future__ import annotations

from pathlib import Path

import pytest

from archc.cli.main import main

TINY = """name: tiny
input: {channels: 3, size: 32}
num_classes: 10
stem: {type: simple, width: 8}
body:
  type: anynet
  stages:
    - {block: res_basic, depth: 1, width: 16, stride: 2}
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A tiny spec, its checkpoint (.pt) and its program (.pt2), built once."""
    folder = tmp_path_factory.mktemp("models")
    spec = folder / "tiny.yaml"
    spec.write_text(TINY)
    paths = {"spec": spec, "pt": folder / "tiny.pt", "pt2": folder / "tiny.pt2"}
    for kind in ("pt", "pt2"):
        assert main(["build", str(spec), "-o", str(paths[kind]), "-q"]) == 0
    return paths


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def exit_code(argv: list[str]) -> int:
    """`main`'s exit code, whether it returns it or argparse exits with it."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


@pytest.mark.parametrize("kind", ["pt", "pt2"])
def test_show_draws_a_checkpoint(kind, models, tmp_path, capsys):
    assert main(["show", str(models[kind]), "-o", str(tmp_path / "g.svg")]) == 0
    assert "changed (highlighted)" in capsys.readouterr().out
    assert (tmp_path / "g.svg").read_text().lstrip().startswith("<?xml")
