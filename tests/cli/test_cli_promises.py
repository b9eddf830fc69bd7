"""The README's promises, command by command: errors are one line before any work or output (an
output that cannot be written, an extension a command does not write, option combinations, pass
names), every command takes --quiet, and what the commands print reads right."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from archc.cli.main import main
from tests.cli.test_cli_usability import TINY


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
    (["build", "SPEC"], ".xml"), (["show", "SPEC"], ".svg"), (["schema"], ".json"),
    (["space", "fit", "SPEC"], ".yaml"),
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
    (["build", "SPEC", "-o", "m.xml", "--channels-last"], "OpenVINO IR is NCHW"),
    (["fuse", "PT", "-o", "m.xml", "--channels-last"], "OpenVINO IR is NCHW"),
    (["build", "SPEC", "-o", "m.xml", "--int8", "--calib", "digits"],
     "give an .onnx or .pte output"),
    (["build", "SPEC", "-o", "m.pte", "--int8", "--calib", "digits", "--method", "entropy"],
     "XNNPACK's quantizer, which calibrates min/max"),
    (["fuse", "PT", "-o", "m.pte", "--int8", "--calib", "digits", "--keep-float", "first"],
     "drop --method / --keep-float"),
    (["build", "SPEC", "-o", "m.pte", "--dtype", "fp16"], "ExecuTorch programs in float32"),
    (["fuse", "PT", "-o", "m.pte", "--channels-last"], "ExecuTorch programs in float32"),
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


@pytest.mark.parametrize("runtime, suffix", [("openvino", ".xml"), ("executorch", ".pte")])
@pytest.mark.parametrize("command", [["build", "SPEC"], ["fuse", "PT"]])
def test_a_runtime_output_without_its_extra_is_one_line_before_any_work(
        command, runtime, suffix, models, tmp_path, capsys, monkeypatch):
    import sys

    no_work(monkeypatch)
    monkeypatch.setitem(sys.modules, runtime, None)  # what an install without it looks like
    argv = [{"SPEC": str(models["spec"]), "PT": str(models["pt"])}.get(p, p) for p in command]
    assert main([*argv, "-o", str(tmp_path / f"m{suffix}")]) == 2
    line = one_error_line(capsys)
    assert f"needs {runtime}" in line and f"pip install 'archc[{runtime}]'" in line
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
    (["build", "SPEC", "-o", "m.bin"], ".onnx, .pt, .pt2, .py, .xml, .pte"),
    (["fuse", "PT", "-o", "m.bin"], ".pt2, .onnx, .py, .xml, .pte"),
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


DIGITS = TINY.replace("channels: 3, size: 32", "channels: 1, size: 8")
REDUCENET = {"name": "tiny_reducenet", "input": {"channels": 1, "size": 8}, "num_classes": 10,
             "stem": {"type": "simple", "width": 8, "stride": 1},
             "body": {"type": "anynet", "stages": [
                 {"block": "reducenet", "depth": 1, "width": 8, "stride": 1, "expansion": 2,
                  "phase": "train"}]}}

# Every command, quickly: S a digits-sized spec, P its checkpoint, O its ONNX model, R a
# ReduceNet checkpoint, J a samples file, K a results file; OUT.x a fresh file
QUIET_RUNS = {
    "build": ["build", "S", "-o", "OUT.onnx"],
    "fuse": ["fuse", "P", "-o", "OUT.pt2"],
    "bench": ["bench", "S", "--runtimes", "torch", "--rounds", "1"],
    "passes": ["passes"],
    "info": ["info", "S"],
    "models": ["models", "--filter", "regnetx_200mf"],
    "show": ["show", "S", "-o", "OUT.svg"],
    "schema": ["schema", "-o", "OUT.json"],
    "space sample": ["space", "sample", "SPACE", "-n", "2", "-o", "OUT.jsonl"],
    "space sweep": ["space", "sweep", "J", "--data", "digits", "--epochs", "1", "-o",
                    "OUT.jsonl"],
    "space analyze": ["space", "analyze", "K", "-o", "OUT", "--resamples", "20"],
    "space fit": ["space", "fit", "K", "-o", "OUT.jsonl"],
    "train": ["train", "S", "--data", "digits", "--epochs", "1", "-o", "OUT.pt"],
    "eval": ["eval", "P", "--data", "digits"],
    "prune": ["prune", "P", "--ratio", "0.5", "-o", "OUT.pt"],
    "lowrank": ["lowrank", "P", "-o", "OUT.pt"],
    "reduce": ["reduce", "R", "-o", "OUT.pt"],
    "quantize": ["quantize", "O", "--calib", "digits", "-o", "OUT.onnx", "--latency-rounds",
                 "0", "--samples", "16"],
    "qat": ["qat", "P", "--data", "digits", "--epochs", "1", "-o", "OUT.onnx",
            "--latency-rounds", "0", "--samples", "16"],
}


def test_the_quiet_runs_cover_every_command():
    from archc.cli.main import _all_parsers, make_parser

    leaves = {parser.prog.removeprefix("archc ") for parser in _all_parsers(make_parser())
              if not any(a.dest in ("command", "space_command") for a in parser._actions)}
    assert leaves == set(QUIET_RUNS)


@pytest.fixture(scope="module")
def quiet_inputs(tmp_path_factory) -> dict[str, str]:
    import json

    import yaml

    folder = tmp_path_factory.mktemp("quiet")
    spec = folder / "digits.yaml"
    spec.write_text(DIGITS)
    reducenet = folder / "reducenet.yaml"
    reducenet.write_text(yaml.safe_dump(REDUCENET))
    names = {"S": spec, "P": folder / "digits.pt", "O": folder / "digits.onnx",
             "R": folder / "reducenet.pt", "J": folder / "samples.jsonl",
             "K": folder / "results.jsonl", "SPACE": Path("spaces/regnetx.yaml").resolve()}
    for source, output in (("S", "P"), ("S", "O")):
        assert main(["build", str(names[source]), "-o", str(names[output]), "-q"]) == 0
    assert main(["build", str(reducenet), "-o", str(names["R"]), "-q"]) == 0
    spec_dict = yaml.safe_load(DIGITS)
    names["J"].write_text(json.dumps({"id": "a", "spec": spec_dict}) + "\n")
    regnet = yaml.safe_load(Path("specs/regnetx_200mf.yaml").read_text())
    names["K"].write_text("".join(json.dumps({"id": f"m{i}", "spec": regnet,
                                              "best_error": 10.0 + i,
                                              "complexity": {"flops": 2e8, "params": 2e6,
                                                             "acts": 2e6}}) + "\n"
                                  for i in range(4)))
    return {key: str(value) for key, value in names.items()}


@pytest.mark.parametrize("command", sorted(QUIET_RUNS))
def test_quiet_prints_nothing_but_json_still_prints_the_report(command, quiet_inputs, tmp_path,
                                                               capfd):
    argv = [quiet_inputs.get(part, str(tmp_path / part) if part.startswith("OUT") else part)
            for part in QUIET_RUNS[command]]
    assert main([*argv, "--quiet"]) == 0
    assert capfd.readouterr() == ("", "")
    if command in ("eval", "train", "info", "models", "lowrank", "space fit"):  # --json: asked
        import json

        assert main([*argv, "--quiet", "--json"]) == 0
        captured = capfd.readouterr()
        assert json.loads(captured.out) and captured.err == ""


def test_a_truncated_program_is_one_line_without_torch_logging(models, tmp_path):
    """torch's logger prints the load's traceback before archc's error: silenced around the
    load, its level restored after (a subprocess: pytest's own log capture would hide it)."""
    import subprocess
    import sys

    cut = tmp_path / "cut.pt2"
    data = models["pt2"].read_bytes()
    cut.write_bytes(data[:-100])  # the zip's directory is cut: torch logs, then raises
    run = subprocess.run([sys.executable, "-m", "archc", "info", str(cut)], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a loadable torch.export program" in lines[0], run.stderr


@pytest.mark.parametrize("command, label", [("space sample", "sampling regnetx"),
                                            ("space sweep", "sweep: 1/1"), ("train", "epoch 1/1")])
def test_progress_reaches_a_pipe_only_when_asked(command, label, quiet_inputs, tmp_path, capfd):
    """Progress goes to stderr on a terminal or with --progress: a pipe (the captured stderr
    here) gets the notes, not the progress lines, unless --progress asks for them."""
    argv = [quiet_inputs.get(part, str(tmp_path / part) if part.startswith("OUT") else part)
            for part in QUIET_RUNS[command]]
    assert main(argv) == 0
    assert label not in capfd.readouterr().err
    argv = [quiet_inputs.get(part, str(tmp_path / f"again_{part}") if part.startswith("OUT")
                             else part) for part in QUIET_RUNS[command]]
    assert main([*argv, "--progress"]) == 0
    assert label in capfd.readouterr().err
