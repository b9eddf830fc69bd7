"""ExecuTorch programs (.pte, XNNPACK): built and fused models run in ExecuTorch's runtime within
the fp32 artifact tolerance of the float64 model; a program that disagrees writes nothing. int8
programs (`--int8 --calib`, XNNPACK's quantizer) run there within the int8 tolerance on held-out
images, with both accuracies reported; one beyond it writes no int8 file. Inputs whose strides are
not row-major (NHWC-transposed, one channel) reach ExecuTorch row-major."""

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
                 "--static-batch", "--json"]) == 0
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


def test_a_dynamic_batch_program_runs_every_batch_up_to_its_bound(tiny, tmp_path, capsys):
    out = tmp_path / "m.pte"
    assert main(["build", str(tiny), "-o", str(out), "--init", "random", "--json"]) == 0
    written = json.loads(capsys.readouterr().out)["output"]
    assert ("dynamic batch 1 to 8 (memory planned for 8), checked at 1, 3, 8"
            in written["notes"])
    assert written["relative_error"] <= written["tolerance"]
    model = archc.build(tiny, init="random").double()
    run = executorch_pte.runner(out.read_bytes())
    for batch in (1, 5, 8):
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            assert relative_error(model(x.double()), run(x).double()) <= written["tolerance"]
    with pytest.raises(RuntimeError):  # beyond the bound ExecuTorch planned memory for
        run(torch.randn(9, 3, 32, 32))


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


@pytest.fixture(scope="module")
def int8_program(tmp_path_factory):
    """tiny (random weights) to .pte with --int8, calibrated on 32 digits images."""
    folder = tmp_path_factory.mktemp("int8")
    spec = folder / "tiny.yaml"
    spec.write_text(TINY)
    out = folder / "m.pte"
    import contextlib
    import io

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["build", str(spec), "-o", str(out), "--init", "random", "--int8", "--calib",
                     "digits", "--samples", "32", "--json"])
    assert code == 0
    return folder, json.loads(stdout.getvalue())


@pytest.mark.slow
def test_int8_program_runs_in_executorch_within_the_int8_tolerance(int8_program):
    folder, report = int8_program
    int8 = report["int8"]
    assert int8["output"] == str(folder / "m.int8.pte") and int8["format"] == "pte"
    assert int8["calibration_samples"] == 32 and int8["per_channel"]
    assert 0 < int8["relative_error"] <= int8["tolerance"] == 0.1
    assert int8["xnnpack_delegate_calls"] >= 1
    assert 0 <= int8["int8_accuracy"] <= 100 and 0 <= int8["fp32_accuracy"] <= 100
    data = (folder / "m.int8.pte").read_bytes()
    assert len(data) == int8["bytes"] < (folder / "m.pte").stat().st_size  # int8 weights
    from archc.train.data import load_data

    images = torch.from_numpy(load_data("digits", 3, 32).val_x[:1])
    with torch.no_grad():
        exact = archc.build(folder / "tiny.yaml", init="random").double()(images.double())
    got = executorch_pte.runner(data)(images).double()
    assert 0 < relative_error(exact, got) <= 0.1  # int8: not the fp32 program


@pytest.mark.slow
def test_an_int8_program_beyond_the_int8_tolerance_writes_nothing(tiny, tmp_path, monkeypatch,
                                                                  capsys):
    from archc.compress import quantize_pte

    monkeypatch.setattr(quantize_pte, "INT8_TOLERANCE", 1e-6)  # below any int8 rounding
    out = tmp_path / "m.pte"
    argv = ["build", str(tiny), "-o", str(out), "--int8", "--calib", "digits", "--samples", "8"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "int8 program in ExecuTorch differs from the fp32 model on the held-out" in err
    assert out.exists() and not (tmp_path / "m.int8.pte").exists()


def test_calibration_batches_fill_the_static_batch_with_images_not_zeros():
    x = torch.arange(5.0).reshape(5, 1, 1, 1) + 1
    chunks = executorch_pte.calibration_batches(x, 2)
    assert [chunk.flatten().tolist() for chunk in chunks] == [[1, 2], [3, 4], [5, 1]]
    assert len(executorch_pte.calibration_batches(x[:1], 3)[0]) == 3


def test_a_transposed_one_channel_input_is_made_row_major():
    import numpy as np

    nhwc = np.arange(64, dtype=np.float32).reshape(1, 8, 8, 1)
    x = torch.from_numpy(nhwc.transpose(0, 3, 1, 2))
    assert x.is_contiguous() and x.stride() == (64, 1, 8, 1)
    fixed = executorch_pte.canonical(x)
    assert fixed.stride() == (64, 64, 8, 1) and torch.equal(fixed, x)
    same = torch.randn(2, 3, 4, 4)
    assert executorch_pte.canonical(same) is same
