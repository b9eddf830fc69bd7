"""`archc bench`: rows for the train form and each runtime asked for, ratios that read right, the
--json shape, and every reason a runtime is left out (not installed, disagrees with float64,
archc writes nothing for it); an unknown runtime name is a usage error."""

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


def bench_json(argv: list[str], capsys) -> dict:
    assert main(["bench", "--rounds", "2", "--threads", "1", "--json", *argv]) == 0
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
    argv = ["bench", str(tiny), "--runtimes", "ort,executorch", "--rounds", "2", "--threads", "1"]
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
