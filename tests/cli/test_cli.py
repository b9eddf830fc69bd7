"""The CLI's fast path: --help and argument errors never import torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from archc.cli.main import idle_threads_sleep, main


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["build", "--help"],
        ["info", "--help"],
        ["build", "x.yaml", "-o", "y.tflite"],
        ["build", "x.yaml"],
        ["frobnicate"],
        ["info", "x.yaml", "--input-size", "-3"],
        ["bench", "--help"],
        ["bench", "x.yaml", "--runtimes", "tvm"],
        ["build", "x.yaml", "-o", "y.xml", "--channels-last"],
        ["build", "x.yaml", "-o", "y.pte", "--dtype", "bf16"],
    ],
)
def test_help_and_argument_errors_do_not_import_torch(argv):
    code = (
        "import sys\nfrom archc.cli.main import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules, 'pydantic' in sys.modules)"
    )
    result = run_python(code)
    assert result.stdout.strip().splitlines()[-1] == "False False", result.stderr


@pytest.mark.parametrize("environment, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_idle_threads_sleep_unless_the_environment_says_otherwise(environment, expected):
    """`archc` sets OpenMP's wait policy before torch loads OpenMP (cli/main.py's docstring)."""
    code = ("import os\nfrom archc.cli.main import main\nmain(['models', '-q'])\n"
            "print(os.environ.get('OMP_WAIT_POLICY'))")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if environment is not None:
        env["OMP_WAIT_POLICY"] = environment
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, env=env)
    assert result.stdout.strip().splitlines()[-1] == expected, result.stderr


def test_idle_threads_sleep_changes_nothing_once_torch_is_loaded(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    idle_threads_sleep()  # torch is imported by this test module: too late to matter
    assert "OMP_WAIT_POLICY" not in os.environ


def test_help_is_fast():
    timings = []
    for _ in range(5):
        start = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-m", "archc", "--help"], capture_output=True, timeout=60
        )
        timings.append(time.perf_counter() - start)
        assert result.returncode == 0
    assert min(timings) < 0.5, timings


def test_argument_error_exit_code():
    result = subprocess.run(
        [sys.executable, "-m", "archc", "build"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_schema_is_a_json_schema_with_every_field(capsys, tmp_path):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["title"] == "archc spec"
    regnet = schema["$defs"]["RegNetBody"]["properties"]
    assert {
        "depth",
        "w0",
        "wa",
        "wm",
        "group_width",
        "q",
        "bottleneck_ratio",
        "bottleneck_multiplier",
        "se_ratio",
    } <= set(regnet)
    assert "res_bottleneck" in schema["$defs"]["StageSpec"]["properties"]["block"]["enum"]
    assert main(["schema", "-o", str(tmp_path / "schema.json")]) == 0
    assert json.loads((tmp_path / "schema.json").read_text()) == schema


def test_info_table(capsys):
    assert main(["info", "specs/regnetx_200mf.yaml"]) == 0
    out = capsys.readouterr().out
    assert "199,040,872" in out and "2,684,792" in out and "res_bottleneck" in out


ODD = """name: odd
input: {channels: 3, size: 32}
num_classes: 10
stem: {type: simple, width: 20}
body:
  type: anynet
  stages:
    - {block: res_bottleneck, depth: 2, width: 36, stride: 2, group_width: 12, se_ratio: 0.25}
"""


def test_pass_option_reaches_the_pass(tmp_path, capsys):
    spec = tmp_path / "odd.yaml"
    spec.write_text(ODD)
    out = tmp_path / "odd.pt2"
    argv = ["build", str(spec), "-o", str(out), "--init", "random", "--explain",
            "--passes", "default,align_channels", "--pass-option", "align_channels.multiple=16"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "padded stem.conv: 20 -> 32 channels" in printed
    assert "s1.b1.f.se.reduce: padding would more than double the channels: 5 -> 16" in printed
    module = torch.export.load(str(out)).module()
    widths = {p.shape[0] for n, p in module.named_parameters() if n.endswith("weight")}
    assert widths == {32, 48, 16, 5, 10}  # 5: the skipped SE width; 10: the model output


def test_pass_option_for_a_pass_outside_the_pipeline(tmp_path, capsys):
    spec = tmp_path / "odd.yaml"
    spec.write_text(ODD)
    argv = ["build", str(spec), "-o", str(tmp_path / "o.pt2"), "--pass-option",
            "align_channels.multiple=16"]
    assert main(argv) == 2
    assert "pass 'align_channels' is not in the pipeline" in capsys.readouterr().err
    assert not (tmp_path / "o.pt2").exists()
