"""`archc qat`: fake quantization that matches ONNX Runtime's int8 weights, activation ranges,
the fine-tuning of the deploy form and its int8 export; bad input is one line, exit 2."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from archc.backends.checkpoint import save_checkpoint
from archc.backends.export import export_onnx
from archc.cli.main import main
from archc.compress.qat import ActivationQuant, FakeQuant, fake_quantize_weight, unwrap
from archc.compress.quantize import quantize
from archc.frontend.loading import spec_from_mapping
from archc.frontend.lower import build
from archc.train.data import load_data
from archc.train.loop import TrainConfig, Trainer

REPVGG = {"name": "rep", "input": {"channels": 1, "size": 8}, "num_classes": 10,
          "stem": {"type": "none"},
          "body": {"type": "anynet", "stages": [{"block": "repvgg", "depth": 1, "width": 8},
                                                {"block": "repvgg", "depth": 2, "width": 16}]}}


@pytest.mark.slow
def test_fake_quantized_weights_are_the_weights_ort_ships(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(6 * 8 * 8, 10)).eval()
    with torch.no_grad():
        model[0].weight[2] *= 40  # channels of very different ranges
    gm = torch.fx.symbolic_trace(model)
    export_onnx(gm, tmp_path / "m.onnx", torch.zeros(1, 1, 8, 8), dynamic_batch=True)
    quantize(tmp_path / "m.onnx", "digits", tmp_path / "q.onnx", samples=16, latency_rounds=0)
    weights = {init.name: numpy_helper.to_array(init)
               for init in onnx.load(str(tmp_path / "q.onnx")).graph.initializer}
    for name, module in (("0", model[0]), ("3", model[3])):
        quantized = next(v for k, v in weights.items() if k.endswith(f"{name}.weight_quantized"))
        scale = next(v for k, v in weights.items() if k.endswith(f"{name}.weight_scale"))
        shipped = quantized.astype(np.float32) * scale.reshape(-1, *[1] * (quantized.ndim - 1))
        ours = fake_quantize_weight(module.weight).detach().numpy()
        assert np.allclose(shipped, ours, rtol=0, atol=1e-7), name


def test_activation_ranges_and_straight_through():
    quant = ActivationQuant(momentum=0.5).train()
    quant(torch.tensor([0.5, 2.0]))
    quant(torch.tensor([1.0, 4.0]))
    assert (float(quant.low), float(quant.high)) == (0.75, 3.0)  # EMA of batch min / max
    x = torch.linspace(-1, 5, 50, requires_grad=True)
    y = quant.eval()(x)
    step = 3.0 / 255
    assert torch.allclose(torch.round(y / step) * step, y, atol=1e-6)  # on the uint8 grid
    assert float(y.detach().min()) == 0.0 and float(y.detach().max()) == pytest.approx(3.0)
    y.sum().backward()
    inside = (x.detach() >= 0) & (x.detach() <= 3.0)
    assert torch.equal(x.grad, inside.float())  # gradient 1 inside the range, 0 outside


def test_wrap_and_unwrap_keep_the_graph():
    gm = build(spec_from_mapping(REPVGG), init="random")
    plugin = FakeQuant()
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        reference = gm(x)
        plugin.wrap(gm)
        for module in gm.modules():  # observe ranges; BN statistics stay as they are
            if isinstance(module, ActivationQuant):
                module.train()
        gm(x)
        fake = gm.eval()(x)
    assert all(float(m.high) > float(m.low) for m in gm.modules()
               if isinstance(m, ActivationQuant))
    assert plugin.wrapped == 7  # the 3x3 and 1x1 conv of 3 blocks, and the classifier
    assert 0 < (fake - reference).abs().max() < reference.abs().max()
    with torch.no_grad():
        assert torch.equal(unwrap(gm)(x), reference)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    spec = spec_from_mapping(REPVGG)
    model = Trainer(TrainConfig(epochs=1), progress=False).fit(
        build(spec), load_data("digits", 1, 8)).model
    path = tmp_path_factory.mktemp("qat") / "rep.pt"
    save_checkpoint(model, REPVGG, path, torch.rand(2, 1, 8, 8))
    return path


@pytest.mark.slow
def test_qat_fine_tunes_the_deploy_form_and_ships_integer_convs(checkpoint, tmp_path, capsys):
    out = tmp_path / "rep.int8.onnx"
    code = main(["qat", str(checkpoint), "--data", "digits", "-o", str(out), "--epochs", "1",
                 "--samples", "64", "--latency-rounds", "0", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)
    assert report["quantized_layers"] == 4  # the deploy form: 3 fused convs and the classifier
    assert report["quantized_ops"]["QLinearConv"] == 3 and report["float_convs"] == 0
    assert len(report["fake_quant_accuracy"]) == 1 and report["int8_accuracy"] > 50
    # QAT's int8 model against the deploy form's fp32, image by image on the same 360 images
    paired = report["qat_int8_vs_deploy_fp32"]
    assert paired["n"] == 360 and paired["test"] == "exact McNemar"
    assert 100 * paired["correct_a"] / 360 == pytest.approx(report["deploy_fp32_accuracy"])
    assert 100 * paired["correct_b"] / 360 == pytest.approx(report["int8_accuracy"])
    assert out.is_file()


@pytest.mark.slow
def test_qat_reads_a_program(checkpoint, tmp_path, capsys):
    """The train-form checkpoint as a torch.export program: the same deploy form (3 fused convs
    and the classifier) is fine-tuned and quantized."""
    from archc.backends.checkpoint import load_checkpoint
    from archc.backends.export import export_program

    program, out = tmp_path / "rep.pt2", tmp_path / "rep.int8.onnx"
    export_program(load_checkpoint(checkpoint)[1], program, torch.rand(2, 1, 8, 8),
                   dynamic_batch=True)
    code = main(["qat", str(program), "--data", "digits", "-o", str(out), "--epochs", "1",
                 "--samples", "64", "--latency-rounds", "0", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)
    assert report["source"] == str(program) and report["quantized_layers"] == 4
    assert report["quantized_ops"]["QLinearConv"] == 3 and report["int8_accuracy"] > 50
    assert out.is_file()


def test_qat_bad_input(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    out = tmp_path / "q.onnx"
    assert main(["qat", str(bad), "--data", "digits", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and not out.exists()
