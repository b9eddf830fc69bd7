"""OpenVINO IR (.xml + .bin): built and fused models run in OpenVINO's CPU plugin within the
tolerance of the precision OpenVINO reports, with a dynamic batch; a wrong conversion writes
nothing. Every shipped spec converts and verifies at fp32 in tests/backends/test_emitters.py
(slow), beside its other formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

openvino = pytest.importorskip("openvino", reason="the archc[openvino] extra is not installed")

import archc  # noqa: E402
import archc.passes  # noqa: E402, F401 - registers the catalogue
from archc.backends import openvino_ir  # noqa: E402
from archc.cli.main import main  # noqa: E402
from archc.errors import ExportError  # noqa: E402
from archc.ir.verify import relative_error  # noqa: E402
from tests.cli.test_cli_usability import TINY  # noqa: E402


@pytest.fixture
def tiny(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


def build_json(argv: list[str], capsys) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def run_ir(path: Path, x: torch.Tensor, dtype: str = "fp32") -> tuple[torch.Tensor, str]:
    """The written IR read by a fresh OpenVINO Core, compiled at `dtype`, run on `x`."""
    compiled, used = openvino_ir.compile_cpu(openvino.Core().read_model(str(path)), dtype)
    return openvino_ir.runner(compiled)(x), used


def test_a_spec_builds_to_ir_verified_at_fp32_with_a_dynamic_batch(tiny, tmp_path, capsys):
    out = tmp_path / "m.xml"
    report = build_json(["build", str(tiny), "-o", str(out), "--init", "random"], capsys)
    assert out.exists() and out.with_suffix(".bin").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin", "m.xml", "tiny.yaml"]
    written = report["output"]
    assert written["precision"] == "fp32" and written["reference"] == "float64 PyTorch"
    assert written["relative_error"] <= written["tolerance"] <= 1e-5
    model = openvino.Core().read_model(str(out))
    assert model.inputs[0].partial_shape[0].is_dynamic
    gm = archc.build(tiny, init="random")
    for batch in (1, 5):
        x = torch.randn(batch, 3, 32, 32)
        got, used = run_ir(out, x)
        with torch.no_grad():
            exact = gm.double()(x.double())
        assert used == "fp32" and relative_error(exact, got) <= written["tolerance"]


def test_static_batch_fixes_the_batch(tiny, tmp_path, capsys):
    out = tmp_path / "m.xml"
    build_json(["build", str(tiny), "-o", str(out), "--batch", "2", "--static-batch"], capsys)
    shape = openvino.Core().read_model(str(out)).inputs[0].partial_shape
    assert shape.is_static and shape.to_shape()[0] == 2


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_reduced_precision_reports_the_precision_openvino_used(dtype, tiny, tmp_path, capsys):
    """The CPU may or may not have native bf16 / fp16: the report must state what OpenVINO read
    back, and the tolerance must be that precision's."""
    out = tmp_path / "m.xml"
    report = build_json(["build", str(tiny), "-o", str(out), "--dtype", dtype], capsys)["output"]
    _, used = run_ir(out, torch.randn(1, 3, 32, 32), dtype)
    assert report["precision"] == used
    assert report["verified_with"] == f"OpenVINO CPU ({used})"
    expected = openvino_ir.precision_tolerance(used, 1e-5)
    assert report["tolerance"] == pytest.approx(expected)
    if used != "fp32":
        assert expected == 10 * torch.finfo(openvino_ir.DEPLOY_DTYPES[used]).eps
    assert any(f"precision {used}" in note for note in report["notes"])
    assert any(f"(asked {dtype})" in note for note in report["notes"]) == (used != dtype)
    assert report["relative_error"] <= report["tolerance"]


def test_the_fp32_default_is_asked_for_explicitly(tiny, tmp_path, capsys):
    """OpenVINO would pick bf16 on a CPU that has it; archc's compile asks for f32."""
    out = tmp_path / "m.xml"
    build_json(["build", str(tiny), "-o", str(out)], capsys)
    compiled, used = openvino_ir.compile_cpu(openvino.Core().read_model(str(out)))
    hint = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    assert used == "fp32" and hint == "f32"


def test_fuse_writes_ir(tiny, tmp_path, capsys):
    checkpoint = tmp_path / "tiny.pt"
    assert main(["build", str(tiny), "-o", str(checkpoint), "-q"]) == 0
    out = tmp_path / "fused.xml"
    report = build_json(["fuse", str(checkpoint), "-o", str(out)], capsys)
    assert report["output"]["precision"] == "fp32" and out.with_suffix(".bin").exists()


def test_ir_that_disagrees_is_refused_and_nothing_written(tiny, tmp_path, monkeypatch, capsys):
    def wrong(compiled):
        run = runner(compiled)
        return lambda x: run(x) * 1.01

    runner = openvino_ir.runner
    monkeypatch.setattr(openvino_ir, "runner", wrong)
    assert main(["build", str(tiny), "-o", str(tmp_path / "m.xml")]) == 2
    assert "OpenVINO CPU (fp32) output differs" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.yaml"]


def test_a_model_openvino_cannot_convert_is_refused(tiny, tmp_path, monkeypatch):
    def fails(*args, **kwargs):
        raise RuntimeError("Check failed: unsupported operation")

    monkeypatch.setattr(openvino, "convert_model", fails)
    gm = archc.build(tiny, init="random")
    with pytest.raises(ExportError, match="OpenVINO could not convert"):
        openvino_ir.export_openvino(gm, tmp_path / "m.xml", torch.randn(1, 3, 32, 32))
    assert not (tmp_path / "m.xml").exists()

