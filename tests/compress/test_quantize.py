"""`archc quantize` and `build`/`fuse --int8`: post-training static int8 through ONNX Runtime,
measured against fp32 on held-out data; bad input is one line, exit 2, nothing written."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from archc.backends.export import export_onnx
from archc.cli.main import main
from archc.common.accuracy_stats import mcnemar_exact
from archc.compress.quantize import layer_losses, quantize, read_model, sqnr_db
from archc.frontend.loading import spec_from_mapping
from archc.frontend.lower import build
from archc.train.data import load_data
from archc.train.loop import TrainConfig, Trainer

TINY = {"name": "tiny", "input": {"channels": 1, "size": 8}, "num_classes": 10,
        "stem": {"type": "simple", "width": 8},
        "body": {"type": "anynet", "stages": [{"block": "res_basic", "depth": 1, "width": 8},
                                              {"block": "res_basic", "depth": 1, "width": 16}]}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small ResNet trained for two epochs on 8x8 digits, as fp32 ONNX (dynamic batch)."""
    folder = tmp_path_factory.mktemp("quantize")
    spec = spec_from_mapping(TINY)
    data = load_data("digits", 1, 8)
    model = Trainer(TrainConfig(epochs=2, batch_size=64), progress=False).fit(
        build(spec, seed=0), data).model
    gm = torch.fx.symbolic_trace(model) if not isinstance(model, torch.fx.GraphModule) else model
    path = folder / "tiny.onnx"
    export_onnx(gm, path, torch.zeros(1, 1, 8, 8), dynamic_batch=True)
    export_onnx(gm, folder / "tiny_batch4.onnx", torch.zeros(4, 1, 8, 8), dynamic_batch=False)
    return path


def run(capsys, *argv):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_sqnr():
    x = np.array([3.0, 4.0])
    assert sqnr_db(x, x) == math.inf
    assert sqnr_db(x, x + np.array([0.5, 0.0])) == pytest.approx(10 * math.log10(25 / 0.25))


def test_quantize_measures_and_writes_a_model_ort_runs(trained, tmp_path, capsys):
    out = tmp_path / "tiny.int8.onnx"
    code, text, err = run(capsys, "quantize", trained, "--calib", "digits", "-o", out,
                          "--samples", 128, "--latency-rounds", 3, "--json")
    assert code == 0, err
    report = json.loads(text)
    assert report["calibration_samples"] == 128 and report["held_out_samples"] == 360
    # every conv runs as an integer kernel after ORT's optimization
    assert report["quantized_ops"]["QLinearConv"] == 7 and report["float_convs"] == 0
    assert report["sqnr_db"] > 20 and report["top1_agreement"] > 90
    assert abs(report["int8_accuracy"] - report["fp32_accuracy"]) < 5
    assert report["layers"] and all(layer["sqnr_db"] > 10 for layer in report["layers"])
    drops = [layer["drop_db"] for layer in report["layers"]]
    assert drops == sorted(drops, reverse=True)
    assert report["latency_ratio"] > 0
    # the file holds int8 weights and QDQ pairs, and computes what the report says
    model = onnx.load(str(out))
    ops = {node.op_type for node in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    assert any(init.data_type == TensorProto.INT8 for init in model.graph.initializer)
    data = load_data("digits", 1, 8)
    fp32 = ort.InferenceSession(str(trained), providers=["CPUExecutionProvider"])
    int8 = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    a = fp32.run(None, {"input": data.val_x})[0]
    b = int8.run(None, {"input": data.val_x})[0]
    assert sqnr_db(a, b) == pytest.approx(report["sqnr_db"], abs=1e-6)
    assert 100 * np.mean(b.argmax(1) == data.val_y) == pytest.approx(report["int8_accuracy"])
    # int8 against fp32 image by image: the discordant counts of the exact McNemar test
    right_a, right_b = a.argmax(1) == data.val_y, b.argmax(1) == data.val_y
    paired = report["int8_vs_fp32"]
    assert (paired["n"], paired["only_a"], paired["only_b"]) == (
        360, int((right_a & ~right_b).sum()), int((right_b & ~right_a).sum()))
    assert paired["p_value"] == pytest.approx(mcnemar_exact(paired["only_a"], paired["only_b"]))
    assert not list(tmp_path.glob(".*partial"))


def test_fixed_batch_model(trained, tmp_path):
    """A model of fixed batch 4: 30 calibration and 360 held-out images run in padded chunks."""
    fixed = trained.with_name("tiny_batch4.onnx")
    assert read_model(fixed)[1].batch == 4
    report = quantize(fixed, "digits", tmp_path / "q.onnx", samples=30, latency_rounds=1)
    dynamic = quantize(trained, "digits", tmp_path / "d.onnx", samples=30, latency_rounds=0)
    assert report.fp32_accuracy == dynamic.fp32_accuracy  # padding never reaches the results
    assert report.top1_agreement > 90 and report.quantized_ops["QLinearConv"] == 7
    assert report.latency_ratio > 0


def test_text_report(trained, tmp_path, capsys):
    code, text, err = run(capsys, "quantize", trained, "--calib", "digits", "-o",
                          tmp_path / "q.onnx", "--samples", 64, "--latency-rounds", 1)
    assert code == 0, err
    for words in ("SQNR", "top-1 agreement", "accuracy: fp32", "exact McNemar: ",
                  "layers that lose most", "int8/fp32", "wrote"):
        assert words in text


def test_keep_float_first_and_last(trained, tmp_path):
    out = tmp_path / "kept.onnx"
    report = quantize(trained, "digits", out, samples=64, keep_float=["first", "last"],
                      latency_rounds=0)
    assert len(report.kept_float) == 2
    nodes = {node.name: node for node in onnx.load(str(out)).graph.node}
    for name in report.kept_float:  # its weight is the float initializer, not dequantized
        assert not nodes[name].input[1].endswith("_DequantizeLinear_Output")
    assert report.quantized_ops["QLinearConv"] == 6 and "QGemm" not in report.quantized_ops


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_histogram_calibration(trained, tmp_path, capsys, method):
    code, text, err = run(capsys, "quantize", trained, "--calib", "digits", "-o",
                          tmp_path / "m.onnx", "--method", method, "--samples", 64,
                          "--per-tensor", "--latency-rounds", 0, "--json")
    assert code == 0, err
    report = json.loads(text)  # stdout holds the report only, not ORT's calibration chatter
    assert report["method"] == method and not report["per_channel"]
    assert report["top1_agreement"] > 80


def test_layer_losses_see_a_float_layer_as_exact(trained, tmp_path):
    out = tmp_path / "kept.onnx"
    report = quantize(trained, "digits", out, samples=32, keep_float=["first"],
                      latency_rounds=0, layers=100)
    first = report.kept_float[0]
    conv = next(layer for layer in report.layers if layer.node == first)
    assert conv.sqnr_db == math.inf and conv.drop_db == 0.0
    _, model_input = read_model(trained)
    x = load_data("digits", 1, 8).val_x[:4]
    same = layer_losses(trained, trained, model_input, x)  # a model against itself: no loss
    assert same and all(layer.sqnr_db == math.inf and layer.drop_db == 0.0 for layer in same)


def _model_with_input(path, elem_type, shape):
    x = helper.make_tensor_value_info("x", elem_type, shape)
    y = helper.make_tensor_value_info("y", elem_type, None)
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def _bad_inputs(tmp_path, trained):
    not_onnx = tmp_path / "notes.onnx"
    not_onnx.write_text("not a model")
    empty = tmp_path / "empty.npz"
    np.savez(empty, x=np.zeros((0, 1, 8, 8), np.float32), y=np.zeros(0, np.int64))
    rgb = tmp_path / "rgb.npz"
    np.savez(rgb, x=np.zeros((10, 3, 8, 8), np.float32), y=np.arange(10) % 2)
    many = tmp_path / "many.npz"
    np.savez(many, x=np.zeros((40, 1, 8, 8), np.float32), y=np.arange(40) % 20)
    return {
        "not ONNX": (not_onnx, "digits", "not an ONNX model"),
        "missing": (tmp_path / "absent.onnx", "digits", "no such file"),
        "integer input": (_model_with_input(tmp_path / "int.onnx", TensorProto.INT64,
                                            [1, 1, 8, 8]), "digits", "INT64"),
        "not NCHW": (_model_with_input(tmp_path / "flat.onnx", TensorProto.FLOAT, [1, 64]),
                     "digits", "(N, C, H, W)"),
        "not square": (_model_with_input(tmp_path / "wide.onnx", TensorProto.FLOAT,
                                         [1, 1, 8, 16]), "digits", "square"),
        "channels differ": (trained, rgb, "channels"),
        "empty calibration set": (trained, empty, "no examples"),
        "more classes than outputs": (trained, many, "20 classes"),
        "not data": (trained, tmp_path / "nothing.txt", "not a data set"),
    }


def test_bad_input_one_line_exit_2_nothing_written(trained, tmp_path, capsys):
    for case, (model, data, words) in _bad_inputs(tmp_path, trained).items():
        out = tmp_path / "out" / "q.onnx"
        code, text, err = run(capsys, "quantize", model, "--calib", data, "-o", out,
                              "--latency-rounds", 0)
        assert code == 2, case
        assert err.count("\n") == 1 and err.startswith("error: ") and words in err, (case, err)
        assert not (tmp_path / "out").exists(), case


def test_bad_options(trained, tmp_path, capsys):
    out = tmp_path / "q.onnx"
    for argv, words in [(["--samples", "0"], "positive"), (["--method", "kl"], "invalid choice"),
                        (["--keep-float", "node_conv"], "did you mean"),
                        (["--keep-float", ","], "names no node")]:
        code, _, err = run(capsys, "quantize", trained, "--calib", "digits", "-o", out, *argv)
        assert code == 2 and words in err and err.count("\n") == 1, (argv, err)
        assert not out.exists()
    code, _, err = run(capsys, "quantize", trained, "--calib", "digits", "-o", trained)
    assert code == 2 and "replace its input" in err


def test_build_chain_options_are_checked_first(tmp_path, capsys):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(json.dumps(TINY))
    for argv, words in [(["-o", tmp_path / "m.onnx", "--int8"], "needs calibration data"),
                        (["-o", tmp_path / "m.onnx", "--calib", "digits"], "add --int8"),
                        (["-o", tmp_path / "m.pt2", "--int8", "--calib", "digits"],
                         "give an .onnx or .pte output")]:
        code, _, err = run(capsys, "build", spec, *argv)
        assert code == 2 and words in err, err
    assert not list(tmp_path.glob("m*"))


@pytest.mark.slow
def test_build_and_fuse_chain_int8(tmp_path, capsys):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(json.dumps(TINY))
    out = tmp_path / "m.onnx"
    code, text, err = run(capsys, "build", spec, "-o", out, "--int8", "--calib", "digits",
                          "--samples", 32, "--latency-rounds", 0, "--json")
    assert code == 0, err
    report = json.loads(text)
    assert report["int8"]["output"] == str(tmp_path / "m.int8.onnx")
    assert (tmp_path / "m.int8.onnx").is_file() and out.is_file()
    assert report["int8"]["quantized_ops"]["QLinearConv"] == 7
    checkpoint = tmp_path / "m.pt"
    assert run(capsys, "build", spec, "-o", checkpoint, "--init", "random")[0] == 0
    code, text, err = run(capsys, "fuse", checkpoint, "-o", tmp_path / "f.onnx", "--int8",
                          "--calib", "digits", "--samples", 32, "--latency-rounds", 0)
    assert code == 0, err
    assert "int8 QDQ" in text and (tmp_path / "f.int8.onnx").is_file()
