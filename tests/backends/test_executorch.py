"""ExecuTorch programs (.pte, XNNPACK): built and fused models run in ExecuTorch's runtime within
the fp32 artifact tolerance of the float64 model; a program that disagrees writes nothing."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("executorch", reason="the archc[executorch] extra is not installed")

import archc  # noqa: E402
from archc.backends import executorch_pte  # noqa: E402
from archc.cli.main import main  # noqa: E402
from archc.ir.verify import relative_error  # noqa: E402
from tests.cli.test_cli_usability import TINY  # noqa: E402


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


def test_a_spec_builds_to_a_program_run_in_executorch(tiny, tmp_path, capsys):
    out = tmp_path / "m.pte"
    assert main(["build", str(tiny), "-o", str(out), "--init", "random", "--batch", "2",
                 "--json"]) == 0
    written = json.loads(capsys.readouterr().out)["output"]
    assert written["reference"] == "float64 PyTorch"
    assert written["relative_error"] <= written["tolerance"] <= 1e-5
    assert "static batch 2" in written["notes"]
    delegation = next(n for n in written["notes"] if n.startswith("XNNPACK delegate calls: "))
    assert int(delegation.split(": ")[1].split(",")[0]) >= 1  # XNNPACK runs the convs
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        exact = archc.build(tiny, init="random").double()(x.double())
    got = executorch_pte.runner(out.read_bytes())(x)
    assert relative_error(exact, got.double()) <= written["tolerance"]


def test_fuse_writes_a_program(tiny, tmp_path, capsys):
    checkpoint = tmp_path / "tiny.pt"
    assert main(["build", str(tiny), "-o", str(checkpoint), "-q"]) == 0
    assert main(["fuse", str(checkpoint), "-o", str(tmp_path / "f.pte"), "-q"]) == 0
    assert (tmp_path / "f.pte").stat().st_size > 0


def test_a_program_that_disagrees_is_refused_and_nothing_written(tiny, tmp_path, monkeypatch,
                                                                 capsys):
    def wrong(data):
        run = runner(data)
        return lambda x: run(x) + 1

    runner = executorch_pte.runner
    monkeypatch.setattr(executorch_pte, "runner", wrong)
    assert main(["build", str(tiny), "-o", str(tmp_path / "m.pte")]) == 2
    assert "ExecuTorch runtime (XNNPACK) output differs" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.yaml"]
