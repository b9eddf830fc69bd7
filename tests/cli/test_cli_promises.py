"""The README's promises, command by command: errors are one line before any work or output (an
output that cannot be written, an extension a command does not write, option combinations, pass
names), every command takes --quiet, and what the commands print reads right."""

from __future__ import annotations

import os
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


def local(folder: Path, part: str) -> str:
    """A file name argument (`m.onnx`) as a path in `folder`; other arguments as they are."""
    return str(folder / part) if "." in part and not part[0].isdigit() else part


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


def no_work(monkeypatch):
    """Make loading any spec or model fail the test: a check that comes after it is too late."""
    import archc.backends.importers
    import archc.frontend.loading

    monkeypatch.setattr(archc.frontend.loading, "load_spec", lambda *a: pytest.fail("worked"))
    monkeypatch.setattr(archc.backends.importers, "load_model",
                        lambda *a, **k: pytest.fail("worked"))


def unwritable_outputs(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "afile").write_text("")
    return {"sys": Path("/sys/m"), "proc": Path("/proc/m"),
            "long": tmp_path / ("x" * 300), "under_a_file": tmp_path / "afile" / "m"}


@pytest.mark.parametrize("where", ["sys", "proc", "long", "under_a_file"])
@pytest.mark.parametrize("command, suffix", [
    (["build", "SPEC"], ".pt"), (["build", "SPEC"], ".onnx"), (["fuse", "PT"], ".pt2"),
    (["show", "SPEC"], ".svg"), (["schema"], ".json"), (["space", "fit", "SPEC"], ".yaml"),
    (["train", "SPEC", "--data", "digits"], ".pt"), (["lowrank", "PT"], ".pt"),
])
def test_an_output_that_cannot_be_written_is_refused_before_any_work(
        command, suffix, where, models, tmp_path, capsys, monkeypatch):
    no_work(monkeypatch)
    output = unwritable_outputs(tmp_path)[where].with_suffix(suffix)
    argv = [{"SPEC": str(models["spec"]), "PT": str(models["pt"])}.get(part, part)
            for part in command]
    assert main([*argv, "-o", str(output)]) == 2
    assert "cannot write" in one_error_line(capsys)
    assert not os.path.lexists(output)  # Path.exists raises for a name too long


@pytest.mark.parametrize("where", ["sys", "long", "under_a_file", "a_file"])
def test_a_folder_that_cannot_be_written_is_refused_before_any_work(where, models, tmp_path,
                                                                    capsys, monkeypatch):
    no_work(monkeypatch)
    folders = unwritable_outputs(tmp_path) | {"a_file": tmp_path / "afile"}
    argv = ["build", str(models["spec"]), "-o", str(tmp_path / "m.pt2"), "--dump-after", "all",
            str(folders[where])]
    assert main(argv) == 2
    assert "cannot write" in one_error_line(capsys) or where == "a_file"
    assert not (tmp_path / "m.pt2").exists()


@pytest.mark.parametrize("argv, phrase", [
    (["build", "SPEC", "-o", "m.onnx", "--channels-last"], "ONNX is NCHW"),
    (["fuse", "PT", "-o", "m.onnx", "--channels-last"], "ONNX is NCHW"),
    (["build", "SPEC", "-o", "m.onnx", "--dtype", "bf16"], "no bfloat16 Conv"),
    (["build", "SPEC", "-o", "m.pt", "--passes", "default"], "a .pt checkpoint stores"),
    (["show", "SPEC", "-o", "g.svg", "--after", "fold_bm"], "did you mean fold_bn"),
    (["build", "SPEC", "-o", "m.pt2", "--dump-after", "fold_bm", "DIR"], "did you mean fold_bn"),
    (["fuse", "PT", "--dump-after", "frobnicate", "DIR"], "no pass has that name"),
])
def test_option_combinations_are_checked_before_any_work(argv, phrase, models, tmp_path, capsys,
                                                         monkeypatch):
    no_work(monkeypatch)
    names = {"SPEC": str(models["spec"]), "PT": str(models["pt"]), "DIR": str(tmp_path / "d")}
    argv = [names.get(part, local(tmp_path, part)) for part in argv]
    assert main(argv) == 2
    assert phrase in one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_a_pass_outside_the_pipeline_is_named_with_the_pipeline_once(models, tmp_path, capsys):
    argv = ["show", str(models["spec"]), "-o", str(tmp_path / "g.svg"), "--after",
            "align_channels"]
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert "not a pass of the pipeline" in line and line.count("fold_bn") == 1


def test_the_pass_names_parsing_knows_are_the_catalogue():
    import archc.passes  # noqa: F401 - registers the catalogue
    from archc.cli.arguments import PASS_NAMES
    from archc.rewrite.pipeline import list_passes

    assert tuple(info.name for info in list_passes()) == PASS_NAMES


@pytest.mark.parametrize("argv, formats", [
    (["train", "SPEC", "--data", "digits", "-o", "t.onnx"], ".pt"),
    (["train", "SPEC", "--data", "digits", "-o", "t.pt", "--metrics", "m.txt"], ".json"),
    (["space", "sample", "S", "-n", "2", "-o", "s.json"], ".jsonl"),
    (["space", "sweep", "S", "--data", "digits", "--epochs", "1", "-o", "r.txt"], ".jsonl"),
    (["space", "fit", "SPEC", "-o", "f.txt"], ".yaml, .yml, .json, .jsonl"),
    (["schema", "-o", "schema.yaml"], ".json"),
    (["prune", "PT", "--ratio", "0.5", "-o", "p.pt", "--spec", "p.txt"], ".yaml, .yml, .json"),
    (["lowrank", "PT", "-o", "l.onnx"], ".pt"),
    (["quantize", "m.onnx", "--calib", "digits", "-o", "q.pt"], ".onnx"),
])
def test_every_written_file_has_an_extension_its_command_writes(argv, formats, models, tmp_path,
                                                                capsys):
    names = {"SPEC": str(models["spec"]), "PT": str(models["pt"]), "S": str(models["spec"])}
    argv = [names.get(part, local(tmp_path, part)) for part in argv]
    with pytest.raises(SystemExit) as raised:
        main(argv)
    assert raised.value.code == 2
    assert f"use one of {formats}" in one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_fit_writes_the_format_of_its_source(models, tmp_path, capsys):
    assert main(["space", "fit", str(models["spec"]), "-o", str(tmp_path / "f.jsonl")]) == 2
    assert "fitted spec of a spec as .yaml" in one_error_line(capsys)
