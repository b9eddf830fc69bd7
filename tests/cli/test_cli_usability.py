"""What a new user trips over: every failure is one line with the right exit code and no output
file, options are checked when parsed, specs are found by name, outputs are normal files, and the
reports read right (--quiet, --json, progress, info on checkpoints, models, show, --version)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

# imported before any test patches `lower.build`: its `from ... import build` binds at import
import archc.backends.checkpoint  # noqa: F401
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


@pytest.fixture
def tiny(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "Traceback" not in err[0]
    return err[0]


@pytest.mark.parametrize("options, phrase", [
    (["--opset", "13"], "--opset: 13 is outside 18..24"),
    (["--opset", "17"], "--opset: 17 is outside 18..24"),
    (["--opset", "25"], "--opset: 25 is outside 18..24"),
    (["--rtol", "-1"], "--rtol: -1 is not between 0 and 1"),
    (["--rtol", "1"], "--rtol: 1 is not between 0 and 1"),
    (["--input-size", "7"], "--input-size: 7 is outside 8..4096"),
    (["--input-size", "100000"], "--input-size: 100000 is outside 8..4096"),
    (["--max-memory", "lots"], "--max-memory: 'lots' is not a memory size"),
    (["--seed", "-1"], "--seed: a seed is a non-negative integer"),
])
def test_options_are_checked_when_parsed(options, phrase, tiny, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    with pytest.raises(SystemExit) as raised:
        main(["build", str(tiny), "-o", str(out), *options])
    assert raised.value.code == 2
    assert phrase in one_error_line(capsys)
    assert not out.exists()


def test_unknown_pass_is_one_line_before_any_work(tiny, tmp_path, capsys, monkeypatch):
    import archc.frontend.lower

    monkeypatch.setattr(archc.frontend.lower, "build", lambda *a, **k: pytest.fail("built anyway"))
    assert main(["build", str(tiny), "-o", str(tmp_path / "m.onnx"),
                 "--passes", "fold_bm"]) == 2
    assert "fold_bm" in one_error_line(capsys)


def test_output_location_is_checked_before_any_work(tiny, tmp_path, capsys, monkeypatch):
    import archc.frontend.loading

    monkeypatch.setattr(archc.frontend.loading, "load_spec",
                        lambda *a: pytest.fail("worked anyway"))
    (tmp_path / "afile").write_text("")
    assert main(["build", str(tiny), "-o", str(tmp_path / "afile" / "m.onnx")]) == 2
    assert "afile is a file, not a folder" in one_error_line(capsys)
    (tmp_path / "folder.onnx").mkdir()
    assert main(["build", str(tiny), "-o", str(tmp_path / "folder.onnx")]) == 2
    assert "is a folder" in one_error_line(capsys)


@pytest.mark.parametrize("command", ["build", "info"])
def test_a_model_beyond_any_machine_is_refused_up_front(command, tmp_path, capsys):
    spec = tmp_path / "huge.yaml"
    spec.write_text(TINY.replace("width: 16", "width: 1000000000"))
    argv = [command, str(spec)] + (["-o", str(tmp_path / "m.onnx")] if command == "build" else [])
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: {spec}: ") and "params" in line
    assert not (tmp_path / "m.onnx").exists()


def test_memory_budget_is_an_option(tiny, tmp_path, capsys):
    assert main(["build", str(tiny), "-o", str(tmp_path / "m.pt"), "--max-memory", "1K"]) == 2
    assert "more than the budget of 1.0 KiB" in one_error_line(capsys)


def test_blocks_without_bn_are_budgeted_too(tiny, tmp_path, capsys):
    """A `fire` stage (convs with bias, no BN) is budgeted by its analytic twin, before any
    weight is allocated."""
    tiny.write_text(TINY.replace("block: res_basic", "block: fire, bottleneck_ratio: 8")
                    .replace("stride: 2", "stride: 1")
                    .replace("width: 16", "width: 4096"))
    assert main(["build", str(tiny), "-o", str(tmp_path / "m.pt"), "--max-memory", "64M"]) == 2
    line = one_error_line(capsys)
    assert "more than the budget of 64.0 MiB" in line and "params" in line
    assert not (tmp_path / "m.pt").exists()


def test_running_out_of_memory_is_a_user_error(tiny, tmp_path, capsys, monkeypatch):
    import archc.frontend.lower

    def allocate(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't "
                           "allocate memory: you tried to allocate 4000000000000 bytes.\nmore")

    monkeypatch.setattr(archc.frontend.lower, "build", allocate)
    assert main(["build", str(tiny), "-o", str(tmp_path / "m.onnx")]) == 2
    assert "this machine cannot hold the model" in one_error_line(capsys)


def test_an_internal_error_is_one_line_and_the_traceback_needs_debug(tiny, tmp_path, capsys,
                                                                     monkeypatch):
    import archc.frontend.lower

    monkeypatch.setattr(archc.frontend.lower, "build", lambda *a, **k: {}["a bug"])
    argv = ["build", str(tiny), "-o", str(tmp_path / "m.onnx")]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["internal error: KeyError: 'a bug' (an archc bug; rerun with --debug for the "
                   "traceback)"]
    assert main([*argv, "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("internal error:")


def test_every_spec_error_is_reported_at_once(tmp_path, capsys):
    spec = tmp_path / "two.yaml"
    spec.write_text(TINY.replace("channels: 3", "chanels: 3").replace("depth: 1", "depth: 0"))
    assert main(["info", str(spec)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {spec}:input.chanels: unknown key 'chanels' (did you mean "
                   f"'channels'?)",
                   f"error: {spec}:body.stages[0].depth: Input should be greater than or equal "
                   f"to 1 (got 0)"]


@pytest.mark.parametrize("name, phrase", [
    ("model.onnx", "an ONNX model"), ("graph.png", "not a file torch.save"),
])
def test_info_says_what_it_accepts(name, phrase, tmp_path, capsys):
    (tmp_path / name).write_bytes(b"\x08\x07\x12\x03abc" if name.endswith("onnx") else b"\x89PNG")
    assert main(["info", str(tmp_path / name)]) == 2
    line = one_error_line(capsys)
    assert phrase in line or "spec" in line


def test_specs_are_found_by_name_with_a_suggestion(capsys):
    assert main(["info", "regnetx_600m"]) == 2
    assert "did you mean regnetx_600mf" in one_error_line(capsys)
    assert main(["info", "regnetx_600mf", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["params"] == 6_196_040


def test_models_lists_the_shipped_specs(capsys):
    assert main(["models", "--filter", "regnety_*", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 12 and all(row["name"].startswith("regnety_") for row in rows)
    assert main(["models", "--filter", "resnet50"]) == 0
    out = capsys.readouterr().out
    assert "resnet50" in out and "25.56M" in out


def test_version(capsys):
    with pytest.raises(SystemExit) as raised:
        main(["--version"])
    assert raised.value.code == 0 and capsys.readouterr().out.startswith("archc 0.")


def test_quiet_json_progress_and_info_on_a_checkpoint(tiny, tmp_path, capsys):
    checkpoint = tmp_path / "tiny.pt"
    assert main(["build", str(tiny), "-o", str(checkpoint), "--quiet"]) == 0
    assert capsys.readouterr() == ("", "")
    assert main(["fuse", str(checkpoint), "-o", str(tmp_path / "tiny.onnx"), "--json",
                 "--progress"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["deploy_form"]["normalization_layers"] == 0
    assert report["output"]["relative_error"] <= report["output"]["tolerance"]
    assert [p["name"] for p in report["passes"]][:3] == ["remove_identity", "canonicalize",
                                                         "fold_bn"]
    assert "pass 3/" in captured.err and "fold_bn" in captured.err
    assert main(["info", str(checkpoint), "--json"]) == 0
    from_checkpoint = json.loads(capsys.readouterr().out)
    assert main(["info", str(tiny), "--json"]) == 0
    from_spec = json.loads(capsys.readouterr().out)
    assert from_checkpoint["params"] == from_spec["params"]
    assert from_checkpoint["stages"] == from_spec["stages"]


def test_missing_output_folders_are_created_and_said(tiny, tmp_path, capsys):
    """A folder an output goes into (`-o` into a new folder, `--dump-after`'s DIR) is created
    with one note each, silent with --quiet; the dumps run as Python."""
    output, dumps = tmp_path / "out" / "m.pt2", tmp_path / "dumps"
    assert main(["build", str(tiny), "-o", str(output), "--dump-after", "fold_bn",
                 str(dumps)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err.count(f"created folder {tmp_path / 'out'}") == 1
    assert err.count(f"created folder {dumps}") == 1
    for dump in dumps.iterdir():  # the default pipeline folds BN twice
        ran = subprocess.run([sys.executable, str(dump)], capture_output=True, text=True)
        assert ran.returncode == 0, ran.stderr
    quiet = tmp_path / "quiet" / "m.pt2"
    assert main(["build", str(tiny), "-o", str(quiet), "--passes", "none", "-q"]) == 0
    assert capsys.readouterr() == ("", "") and quiet.exists()


def test_one_is_singular(tiny, tmp_path, capsys):
    from archc.cli.output import counted

    assert [counted(n, "model") for n in (0, 1, 2)] == ["0 models", "1 model", "2 models"]
    assert counted(1, "fit") == "1 fit"
    assert main(["build", str(tiny), "-o", str(tmp_path / "m.pt2"), "--passes", "none",
                 "--progress"]) == 0
    assert "tiny: lowering 1 block\n" in capsys.readouterr().err


def test_info_on_a_program_lists_stages_as_the_graph_runs_them(tmp_path, capsys):
    """A torch.export program's weights are read (get_attr) before any layer runs; its rows
    follow the layers that run, not the order its weights are read in."""
    import torch
    from torch import nn

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
            self.layer1, self.fc = nn.Conv2d(8, 16, 3), nn.Linear(16, 10)

        def forward(self, x):
            return self.fc(self.layer1(self.bn1(self.conv1(x))).mean((2, 3)))

    program = tmp_path / "plain.pt2"
    torch.export.save(torch.export.export(Plain().eval(), (torch.randn(1, 3, 16, 16),)), program)
    assert main(["info", str(program), "--json"]) == 0
    stages = [row["stage"] for row in json.loads(capsys.readouterr().out)["stages"]]
    assert stages == ["conv1", "bn1", "layer1", "fc"]


def test_a_fold_does_not_read_as_a_cost(tiny, tmp_path, capsys):
    assert main(["build", str(tiny), "-o", str(tmp_path / "m.pt2"), "--json"]) == 0
    passes = json.loads(capsys.readouterr().out)["passes"]
    fold = next(p for p in passes if p["name"] == "fold_bn")
    assert fold["modified"]
    assert fold["after"]["executed_flops"] <= fold["before"]["executed_flops"]


@pytest.mark.slow
def test_every_output_is_a_normal_file(tiny, tmp_path):
    """Mode 0644 under umask 022, for every emitter (the .py's weights file too)."""
    old = os.umask(0o022)
    try:
        for suffix in (".onnx", ".pt2", ".pt", ".py"):
            assert main(["build", str(tiny), "-o", str(tmp_path / f"m{suffix}"), "-q"]) == 0
        assert main(["schema", "-o", str(tmp_path / "schema.json")]) == 0
    finally:
        os.umask(old)
    written = sorted(p.name for p in tmp_path.iterdir() if p.name != "tiny.yaml")
    assert written == ["m.onnx", "m.pt", "m.pt2", "m.py", "m.weights.pt", "schema.json"]
    for name in written:
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


def test_the_emitted_python_and_its_weights_each_report_their_size(tiny, tmp_path, capsys):
    from archc.common.fileio import size_text

    code, weights = tmp_path / "m.py", tmp_path / "m.weights.pt"
    assert main(["build", str(tiny), "-o", str(code), "--passes", "none", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["output"]["bytes"] == code.stat().st_size
    assert main(["build", str(tiny), "-o", str(code), "--passes", "none"]) == 0
    wrote = next(line for line in capsys.readouterr().out.splitlines() if "wrote" in line)
    assert wrote == (f"wrote {code} ({size_text(code.stat().st_size)}; weights in "
                     f"{weights.name}, {size_text(weights.stat().st_size)})")


def test_the_emitted_python_checks_itself(tiny, tmp_path, capsys):
    assert main(["build", str(tiny), "-o", str(tmp_path / "m.py"), "-q"]) == 0
    run = subprocess.run([sys.executable, "-I", str(tmp_path / "m.py")], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.startswith("self-check passed"), run.stderr
    weights = tmp_path / "m.weights.pt"
    import torch

    state = torch.load(weights, weights_only=True)
    first = next(iter(state))
    state[first] = state[first] + 1.0
    torch.save(state, weights)
    run = subprocess.run([sys.executable, "-I", str(tmp_path / "m.py")], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode != 0 and "output differs from the recorded one" in run.stderr


def test_show_draws_before_and_after(tiny, tmp_path, capsys):
    assert main(["show", str(tiny), "-o", str(tmp_path / "g.svg")]) == 0
    assert "changed (highlighted)" in capsys.readouterr().out
    text = (tmp_path / "g.svg").read_text()
    assert text.lstrip().startswith("<?xml") and "s1.b1" in text
    assert main(["show", str(tiny), "-o", str(tmp_path / "g.png"), "--after", "frobnicate"]) == 2
    assert "not a pass of the pipeline" in one_error_line(capsys)


def test_a_shipped_spec_builds_by_name_from_any_folder(tmp_path):
    run = subprocess.run([sys.executable, "-m", "archc", "build", "regnetx_200mf", "-o", "m.pt",
                          "-q"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "m.pt").stat().st_size > 1_000_000
