"""`archc bench`: rows for the train form and each runtime asked for, ratios that read right, the
--json shape, and every reason a runtime is left out (not installed, disagrees with float64,
archc writes nothing for it, a precision it does not run in); the convolution ceiling (on a tiny
conv: its speed is not asserted) is the fastest runtime per precision and every row's fraction
reads against it; an unknown runtime name is a usage error."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from archc.backends import bench as bench_module
from archc.cli.main import main
from archc.common.extras import installed
from tests.cli.test_cli_usability import TINY

ROWS = ["ort", "torch", *(["openvino"] if installed("openvino") else [])]


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


@pytest.fixture
def tiny_ceiling(monkeypatch):
    """The ceiling's conv at 8 channels on 8x8, in ONNX Runtime and PyTorch only (cheap)."""
    monkeypatch.setattr(bench_module, "CEILING_CHANNELS", 8)
    monkeypatch.setattr(bench_module, "CEILING_SIDE", 8)
    monkeypatch.setattr(bench_module, "CEILING_RUNTIMES", ("ort", "torch"))


def bench_json(argv: list[str], capsys, ceiling: bool = False) -> dict:
    assert main(["bench", "--rounds", "2", "--threads", "1", "--json", *argv,
                 *([] if ceiling else ["--no-ceiling"])]) == 0
    return json.loads(capsys.readouterr().out)


def test_every_runtime_asked_for_gets_a_checked_row(tiny, capsys):
    report = bench_json([str(tiny), "--runtimes", ",".join(ROWS), "--batch", "2"], capsys)
    assert report["command"] == "bench" and report["input_shape"] == [2, 3, 32, 32]
    rows = {row["runtime"]: row for row in report["rows"]}
    assert set(rows) == {"torch (train form)", *ROWS} and report["left_out"] == {}
    assert report["reference"] == "float64 PyTorch" and report["rounds"] == 2
    assert len(report["load_average"]["before"]) == 3
    assert min(row["vs_fastest"] for row in rows.values()) == 1.0
    assert rows["torch (train form)"]["speedup_over_train_form"] == 1.0
    for row in rows.values():
        assert row["precision"] == "fp32" and row["min_ms"] <= row["median_ms"] <= row["max_ms"]
        assert 0 <= row["relative_error"] <= row["tolerance"] <= 1e-5
        assert row["speedup_over_train_form"] == pytest.approx(
            rows["torch (train form)"]["median_ms"] / row["median_ms"])


def test_the_table_names_every_row_and_why_one_is_left_out(tiny, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "executorch", None)  # what an install without it looks like
    argv = ["bench", str(tiny), "--runtimes", "ort,executorch", "--rounds", "2", "--threads", "1",
            "--no-ceiling"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "torch (train form)" in text and "\nort " in text and "vs fastest" in text
    assert ("left out: executorch: the executorch runtime needs executorch, which is not "
            "installed: pip install 'archc[executorch]'") in text


def test_a_runtime_that_disagrees_with_float64_is_left_out(tiny, capsys, monkeypatch):
    def wrong(onnx: bytes, threads: int):
        return bench_module.Prepared(lambda x: torch.zeros(x.shape[0], 10))

    monkeypatch.setattr(bench_module, "_ort", wrong)
    report = bench_json([str(tiny), "--runtimes", "ort,torch"], capsys)
    assert [row["runtime"] for row in report["rows"]] == ["torch (train form)", "torch"]
    assert report["left_out"]["ort"].startswith("disagrees with the float64 reference: "
                                                "relative error 1 > tolerance")


def test_a_runtime_that_is_not_installed_is_left_out_naming_the_extra(tiny, capsys,
                                                                      monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)
    report = bench_json([str(tiny), "--runtimes", "openvino"], capsys)
    assert [row["runtime"] for row in report["rows"]] == ["torch (train form)"]
    assert "pip install 'archc[openvino]'" in report["left_out"]["openvino"]


def test_a_runtime_that_fails_on_the_model_is_left_out(tiny, capsys, monkeypatch):
    def fails(x):
        raise RuntimeError("unsupported operation")

    monkeypatch.setattr(bench_module, "_ort", lambda onnx, threads: bench_module.Prepared(fails))
    report = bench_json([str(tiny), "--runtimes", "ort"], capsys)
    assert report["left_out"]["ort"] == ("fails to run the model: RuntimeError: unsupported "
                                         "operation")


def test_a_checkpoint_is_benched_like_a_spec(tiny, tmp_path, capsys):
    checkpoint = tmp_path / "tiny.pt"
    assert main(["build", str(tiny), "-o", str(checkpoint), "-q"]) == 0
    report = bench_json([str(checkpoint), "--runtimes", "torch"], capsys)
    assert report["name"] == "tiny" and report["input_shape"] == [1, 3, 32, 32]


@pytest.mark.slow
def test_torch_compile_is_timed_after_its_check(tiny, capsys):
    report = bench_json([str(tiny), "--runtimes", "torch-compile"], capsys)
    assert [row["runtime"] for row in report["rows"]] == ["torch (train form)", "torch-compile"]


def test_executorch_is_timed_after_its_check(tiny, capsys):
    pytest.importorskip("executorch", reason="the archc[executorch] extra is not installed")
    from executorch.extension.pybindings import portable_lib

    pool = portable_lib._threadpool_get_thread_count()
    report = bench_json([str(tiny), "--runtimes", "executorch", "--threads", "3"], capsys)
    assert portable_lib._threadpool_get_thread_count() == pool  # resized for the run only
    assert report["threads"] == 3
    rows = {row["runtime"]: row for row in report["rows"]}
    assert set(rows) == {"torch (train form)", "executorch"}
    assert rows["executorch"]["relative_error"] <= rows["executorch"]["tolerance"]


def test_the_ceiling_is_the_fastest_runtime_per_precision(tiny, tiny_ceiling, capsys):
    report = bench_json([str(tiny), "--runtimes", "ort,torch"], capsys, ceiling=True)
    ceiling = report["ceiling"]
    assert ceiling["conv"] == "3x3 conv 8->8 at 8x8, batch 1" and ceiling["left_out"] == {}
    rows = {row["runtime"]: row for row in ceiling["rows"]}
    assert set(rows) == {"ort fp32", "torch fp32", "torch bf16"}
    assert rows["torch bf16"]["precision"] == "bf16"
    for row in rows.values():  # 2 x (8 x 8 x 9 + 8 bias) multiply-adds x 64 pixels per run
        assert row["gflops"] == pytest.approx(2 * (8 * 8 * 9 + 8) * 64 / row["median_ms"] / 1e6)
        assert row["relative_error"] <= row["tolerance"]
    for precision in ("fp32", "bf16"):
        best = max((row for row in rows.values() if row["precision"] == precision),
                   key=lambda row: row["gflops"])
        assert ceiling["ceiling"][precision] == {"runtime": best["runtime"],
                                                 "gflops": best["gflops"]}
    fp32 = ceiling["ceiling"]["fp32"]["gflops"]
    for row in report["rows"]:
        assert row["fraction_of_ceiling"] == pytest.approx(row["gflops"] / fp32)


def test_the_table_states_the_ceiling_and_each_row_s_fraction(tiny, tiny_ceiling, capsys):
    assert main(["bench", str(tiny), "--runtimes", "torch", "--rounds", "2", "--threads",
                 "1"]) == 0
    text = capsys.readouterr().out
    assert "of ceiling" in text and "conv ceiling (3x3 conv 8->8 at 8x8, batch 1" in text
    torch_row = next(line for line in text.splitlines() if line.startswith("torch  "))
    assert torch_row.split()[9].endswith("%")  # the fraction column


def test_a_ceiling_runtime_that_disagrees_is_left_out_of_the_ceiling(tiny, tiny_ceiling, capsys,
                                                                      monkeypatch):
    def wrong(onnx: bytes, threads: int):
        return bench_module.Prepared(lambda x: torch.zeros(1, 8, 8, 8))

    monkeypatch.setattr(bench_module, "_ort", wrong)
    report = bench_json([str(tiny), "--runtimes", "torch"], capsys, ceiling=True)
    assert report["ceiling"]["left_out"]["ort fp32"].startswith("disagrees with the float64")
    assert report["ceiling"]["ceiling"]["fp32"]["runtime"] == "torch fp32"


def test_conv_ceiling_alone_measures_every_runtime_asked(monkeypatch):
    monkeypatch.setattr(bench_module, "CEILING_RUNTIMES", ("ort", "torch"))
    ceiling = bench_module.conv_ceiling(1, rounds=2, channels=4, side=6, dtypes=("fp32",))
    assert [row.runtime for row in ceiling.rows] == ["ort fp32", "torch fp32"]
    assert ceiling.shape == (1, 4, 6, 6) and ceiling.best("bf16") is None
    assert ceiling.fraction(ceiling.best("fp32")) == 1.0


def test_bf16_runs_where_the_runtime_computes_in_it_and_says_where_not(tiny, capsys):
    report = bench_json([str(tiny), "--runtimes", "ort,torch", "--dtype", "bf16"], capsys)
    rows = {row["runtime"]: row for row in report["rows"]}
    assert report["dtype"] == "bf16" and rows["torch"]["precision"] == "bf16"
    assert rows["torch (train form)"]["precision"] == "fp32"
    assert rows["torch"]["tolerance"] == pytest.approx(10 * torch.finfo(torch.bfloat16).eps)
    assert report["left_out"] == {"ort": "archc runs ort at fp32 only, not bf16"}


@pytest.mark.parametrize("runtimes, phrase", [
    ("openvno", "unknown runtime 'openvno' (did you mean 'openvino'?)"),
    ("ort,tensorrt", "unknown runtime 'tensorrt'"),
    (",", "name at least one runtime"),
])
def test_an_unknown_runtime_is_a_usage_error(runtimes, phrase, tiny, capsys):
    with pytest.raises(SystemExit) as raised:
        main(["bench", str(tiny), "--runtimes", runtimes])
    assert raised.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and phrase in err[0]


def test_the_runtime_names_parsing_knows_are_the_benchmark_s():
    from archc.cli.arguments import RUNTIME_NAMES

    assert RUNTIME_NAMES == bench_module.RUNTIMES
