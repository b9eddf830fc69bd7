"""archc's direct FX -> ONNX translation: every op of its vocabulary against eager PyTorch in ONNX
Runtime (at two batch sizes when the batch is dynamic), the fallback to torch.onnx for anything
else, and `--onnx-exporter archc` refusing in one line."""

from __future__ import annotations

import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from archc.backends.export import export_onnx
from archc.backends.onnx_direct import Untranslatable, translate
from archc.cli.main import main
from archc.ir.verify import relative_error


class Shuffle(nn.Module):
    """A channel shuffle the way ShuffleNet code writes it: sizes read from the tensor."""

    def forward(self, x):
        b, c, h, w = x.size()
        return x.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)


class Split(nn.Module):
    def forward(self, x):
        left, right = x.chunk(2, dim=1)
        return torch.cat([F.relu(left), torch.sigmoid(right) * 2.0], 1)


class Functional(nn.Module):
    def forward(self, x):
        y = F.silu(x) + F.gelu(x) - F.gelu(x, approximate="tanh")
        y = F.hardswish(y) / 3 + F.hardsigmoid(x)
        y = F.adaptive_avg_pool2d(y, 1)
        return torch.flatten(y, 1)


class Heads(nn.Module):
    """Linear on a 3-D tensor (MatMul + Add), mean over dims, permute, leaky ReLU."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.act = nn.LeakyReLU(0.1)

    def forward(self, x):
        tokens = x.flatten(2).permute(0, 2, 1)
        pooled = x.mean((2, 3), keepdim=False)
        return self.act(self.fc(tokens)).mean(dim=1) + pooled[:, 2:3] * pooled[0, 1]


def conv_stack() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(6, 12, 3, stride=2, padding=1, groups=3, bias=False), nn.BatchNorm2d(12),
        nn.ReLU6(), nn.Conv2d(12, 12, 3, padding=2, dilation=2), nn.Hardswish(),
        nn.MaxPool2d(3, 2, 1, ceil_mode=True), nn.AvgPool2d(2, 1, count_include_pad=False),
        nn.Hardtanh(-1.0, 2.0), nn.Dropout(0.5), nn.Identity(), nn.Tanh(),
        nn.AdaptiveAvgPool2d((3, 2)), nn.AdaptiveAvgPool2d(2), nn.AdaptiveAvgPool2d(5),
        nn.Flatten(), nn.Linear(300, 7),
    )


MODELS = {"conv stack": conv_stack, "shuffle": Shuffle, "split": Split,
          "functional": Functional}


def _randomized(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    return model.eval()


def _check(model: nn.Module, x: torch.Tensor, dynamic_batch: bool) -> None:
    gm = torch.fx.symbolic_trace(_randomized(model))
    proto = translate(gm, x, opset=18, dynamic_batch=dynamic_batch)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    batches = (x, torch.randn(3, *x.shape[1:])) if dynamic_batch else (x,)
    for inputs in batches:
        with torch.no_grad():
            expected = gm(inputs)
        (got,) = session.run(None, {"input": inputs.numpy()})
        assert relative_error(expected, torch.from_numpy(got)) < 1e-5


@pytest.mark.parametrize("dynamic_batch", [True, False])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_op_matches_eager(name, dynamic_batch):
    _check(MODELS[name](), torch.randn(2, 6, 9, 9), dynamic_batch)


def test_tokens_mean_and_permute():
    _check(Heads(), torch.randn(2, 6, 4, 4), True)


class Unknown(nn.Module):
    def forward(self, x):
        return torch.cumsum(x, 1)


@pytest.mark.parametrize("model, phrase", [
    (Unknown(), "function cumsum"),
    (nn.Sequential(nn.Upsample(scale_factor=2)), "module Upsample"),
    (nn.Sequential(nn.Conv2d(6, 6, 3, padding="same")), "padding 'same'"),
])
def test_outside_the_vocabulary_is_named(model, phrase):
    gm = torch.fx.symbolic_trace(model.eval())
    with pytest.raises(Untranslatable, match=phrase):
        translate(gm, torch.randn(1, 6, 9, 9), opset=18, dynamic_batch=False)


def test_auto_falls_back_to_torch_onnx_and_says_why(tmp_path):
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 4, 1), nn.Upsample(scale_factor=2)))
    report = export_onnx(gm.eval(), tmp_path / "m.onnx", torch.randn(1, 3, 8, 8),
                         simplify=False)
    assert any("torch.onnx" in note and "Upsample" in note for note in report.notes)
    assert report.relative_error <= 1e-5


def test_exporter_archc_refuses_in_one_line(tmp_path, capsys):
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Upsample(scale_factor=2)).eval()
    torch.save(model, tmp_path / "m.pt")
    argv = ["fuse", str(tmp_path / "m.pt"), "--trust-pickle", "--input-shape", "1,3,8,8",
            "-o", str(tmp_path / "m.onnx"), "--onnx-exporter", "archc"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no direct ONNX translation" in err[0] and "Upsample" in err[0]
    assert not (tmp_path / "m.onnx").exists()


def test_only_the_batch_stays_symbolic():
    """A shuffle reads every size from the tensor: with a dynamic batch only the batch is read at
    run time (Shape, Gather); the channel arithmetic c // 2 is a constant; with a static batch
    nothing is read."""
    gm = torch.fx.symbolic_trace(Shuffle())
    x = torch.randn(2, 6, 4, 4)
    kinds = [node.op_type for node in translate(gm, x, opset=18, dynamic_batch=True).graph.node]
    assert "Shape" in kinds and "Gather" in kinds and "Div" not in kinds
    kinds = [node.op_type for node in translate(gm, x, opset=18, dynamic_batch=False).graph.node]
    assert kinds == ["Reshape", "Transpose", "Reshape"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_initializers_are_what_numpy_helper_writes(dtype):
    """Initializers are written into the graph in place; each is the tensor onnx's own
    `numpy_helper.from_array` makes of its value, byte for byte."""
    from onnx import numpy_helper

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 2)).to(dtype)
    proto = translate(torch.fx.symbolic_trace(model.eval()), torch.randn(1, 3, 6, 6, dtype=dtype),
                      opset=18, dynamic_batch=False)
    weights = {t.name: t for t in proto.graph.initializer}
    assert len(weights) >= 4
    for name, tensor in weights.items():
        written = numpy_helper.from_array(numpy_helper.to_array(tensor), name)
        assert tensor.SerializeToString() == written.SerializeToString()
    assert (numpy_helper.to_array(weights["0.weight"]) == model[0].weight.detach().numpy()).all()
