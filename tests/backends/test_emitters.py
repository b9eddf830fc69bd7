"""Emitters: every spec emits .onnx, .pt2 and .py (and .xml where archc[openvino] is installed)
that reload and reproduce the eager output; deploy dtypes and channels_last are verified at their
own tolerance."""

from __future__ import annotations

import functools
import operator
import subprocess
import sys
import typing
from pathlib import Path

import onnxruntime as ort
import pytest
import torch
from torch import nn

import archc
import archc.passes  # noqa: F401 - registers the catalogue
from archc.backends.emit_python import emit_python
from archc.backends.export import deploy_form, export_program
from archc.cli.main import main
from archc.common.extras import installed
from archc.errors import ExportError
from archc.ir.init import randomize
from archc.ir.verify import relative_error
from archc.rewrite import pipeline
from archc.rewrite.pipeline import PassContext, resolve_pipeline, run_pipeline
from tests.golden_suite import input_side

ROOT = Path(__file__).resolve().parents[2]
SPECS = sorted(p.stem for p in (ROOT / "specs").glob("*.yaml"))
SIZE = 32

RUN_STANDALONE = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from model import load, prepare_input
x = torch.load(sys.argv[2], weights_only=True)
with torch.no_grad():
    y = load()(prepare_input(x)).float()
torch.save(y, sys.argv[3])
print(sorted(name for name in sys.modules if name.split(".")[0] in ("archc", "passes")))
"""


def reference(name: str, x: torch.Tensor) -> torch.Tensor:
    gm = archc.build(ROOT / "specs" / f"{name}.yaml", init="random", seed=2)
    with torch.no_grad():
        return gm(x)


def float64_reference(name: str, x: torch.Tensor) -> tuple[torch.fx.GraphModule, torch.Tensor,
                                                            float]:
    """The unfused model (float32), its output in float64, and the tolerance an fp32 artifact is
    held to: ten times the model's own fp32 rounding (floored at 1e-6)."""
    gm = archc.build(ROOT / "specs" / f"{name}.yaml", init="random", seed=2)
    with torch.no_grad():
        exact = gm.double()(x.double())
        rounding = relative_error(exact, gm.float()(x).double())
    return gm, exact, max(10 * rounding, 1e-6)


@functools.cache
def side(name: str) -> int:
    """The golden suite's input side: SIZE, or larger where the network needs it (AlexNet)."""
    return input_side(archc.load_spec(ROOT / "specs" / f"{name}.yaml"))


def example(name: str) -> torch.Tensor:
    spec = archc.load_spec(ROOT / "specs" / f"{name}.yaml")
    return torch.randn(2, spec.input.channels, side(name), side(name))


def build(name: str, out: Path, *extra: str) -> None:
    argv = [
        "build",
        str(ROOT / "specs" / f"{name}.yaml"),
        "-o",
        str(out),
        "--init",
        "random",
        "--seed",
        "2",
        "--input-size",
        str(side(name)),
        "--batch",
        "2",
        *extra,
    ]
    assert main(argv) == 0


def run_standalone(folder: Path, x: torch.Tensor) -> tuple[torch.Tensor, str]:
    torch.save(x, folder / "x.pt")
    result = subprocess.run(
        [
            sys.executable,
            "-I",
            "-B",
            "-c",
            RUN_STANDALONE,
            str(folder),
            str(folder / "x.pt"),
            str(folder / "y.pt"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return torch.load(folder / "y.pt", weights_only=True), result.stdout.strip()


@pytest.mark.slow
@pytest.mark.parametrize("name", SPECS)
def test_every_spec_emits_every_format(name, tmp_path, capsys):
    """`archc build` to ONNX end to end; the same deploy graph through the .pt2, .py and (where
    the extra is installed: tests/backends/test_openvino.py skips with the reason where not)
    OpenVINO emitters (the pipeline run once more, without its float64 checks: the build above
    made them)."""
    x = example(name)
    gm, y, tolerance = float64_reference(name, x)
    build(name, tmp_path / "model.onnx")
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert relative_error(y, torch.from_numpy(got).double()) <= tolerance
    deploy = run_pipeline(gm, resolve_pipeline("default"),
                          PassContext(example_inputs=(x,), verify=False)).graph_module
    export_program(deploy, tmp_path / "model.pt2", x, dynamic_batch=True, rtol=tolerance)
    with torch.no_grad():
        got = torch.export.load(str(tmp_path / "model.pt2")).module()(x)
    assert relative_error(y, got.double()) <= tolerance
    emit_python(deploy, tmp_path / "model.py", x, model_name=name, source=name, rtol=tolerance)
    got, imported = run_standalone(tmp_path, x)
    assert relative_error(y, got.double()) <= tolerance and imported == "[]"
    if installed("openvino"):
        from archc.backends import openvino_ir

        report = openvino_ir.export_openvino(deploy, tmp_path / "model.xml", x,
                                             dynamic_batch=True, rtol=tolerance)
        compiled, used = openvino_ir.compile_cpu(
            openvino_ir.require().Core().read_model(str(tmp_path / "model.xml")))
        got = openvino_ir.runner(compiled)(x)
        assert report.precision == used == "fp32"
        assert relative_error(y, got.double()) <= tolerance


@pytest.mark.parametrize("dtype, tolerance", [("fp16", 1e-2), ("bf16", 8e-2)])
def test_half_precision_channels_last_python(dtype, tolerance, tmp_path, capsys):
    name = "regnety_200mf"
    x = example(name)
    build(name, tmp_path / "model.py", "--dtype", dtype, "--channels-last")
    source = (tmp_path / "model.py").read_text()
    assert "MEMORY_FORMAT = torch.channels_last" in source
    assert f"DTYPE = torch.{'float16' if dtype == 'fp16' else 'bfloat16'}" in source
    got, _ = run_standalone(tmp_path, x)
    assert relative_error(reference(name, x), got) <= tolerance


def test_channels_last_program(tmp_path, capsys):
    name = "repvgg_a0"
    x = example(name)
    build(name, tmp_path / "model.pt2", "--channels-last")
    program = torch.export.load(str(tmp_path / "model.pt2")).module()
    got = program(x.to(memory_format=torch.channels_last))
    assert relative_error(reference(name, x), got) <= 1e-5
    assert "channels_last" in capsys.readouterr().out


def test_fp16_onnx(tmp_path, capsys):
    name = "regnetx_200mf"
    x = example(name)
    build(name, tmp_path / "model.onnx", "--dtype", "fp16")
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(float16)"
    (got,) = session.run(None, {session.get_inputs()[0].name: x.half().numpy()})
    assert relative_error(reference(name, x), torch.from_numpy(got).float()) <= 1e-2


def test_fp16_of_a_model_whose_outputs_underflow(tmp_path, capsys):
    """pycls' initialisation gives a MobileNetV2 logits of about 1e-9, which fp16 flushes to zero:
    the fp16 form is judged by the model's own fp16 rounding, and the note says why it is large."""
    argv = ["build", str(ROOT / "specs/mobilenet_v2.yaml"), "-o", str(tmp_path / "m.onnx"),
            "--input-size", str(SIZE), "--dtype", "fp16"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "the model's own fp16 rounding: 1.0e+00" in out
    assert "below float16's smallest normal number 6.1e-05" in out


def test_fp16_build_still_refuses_a_wrong_rewrite(monkeypatch, tmp_path, capsys):
    """The same underflowing model with a pass that negates the output: float64 sees it."""
    monkeypatch.setattr(pipeline, "_PASSES", dict(pipeline._PASSES))

    @pipeline.register_pass("test_negate_output", "claims to preserve the function", True)
    def negate_output(gm, ctx):
        output = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(output):
            output.args = (gm.graph.call_function(operator.neg, (output.args[0],)),)
        return pipeline.PassResult(gm, True)

    argv = ["build", str(ROOT / "specs/mobilenet_v2.yaml"), "-o", str(tmp_path / "m.onnx"),
            "--input-size", str(SIZE), "--dtype", "fp16", "--passes", "fold_bn,test_negate_output"]
    assert main(argv) == 2
    assert "pass 'test_negate_output' (after fold_bn): output changed: relative error 2" in (
        capsys.readouterr().err)
    assert not (tmp_path / "m.onnx").exists()


class _Scaled(nn.Module):
    """`conv(x)` computed as `(1e5 conv)(x) * 1e-5`: the same function, out of fp16's range."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size)
        with torch.no_grad():
            self.conv.weight.copy_(conv.weight * 1e5)
            self.conv.bias.copy_(conv.bias * 1e5)

    def forward(self, x):
        return self.conv(x) * 1e-5


def test_fp16_refuses_a_cast_worse_than_the_models_own_rounding():
    source = randomize(nn.Sequential(nn.Conv2d(3, 8, 3)), 0)
    x = torch.randn(1, 3, 8, 8)
    fine = deploy_form(torch.fx.symbolic_trace(source), x, dtype="fp16", source=source)
    assert fine.cast_error <= 1e-2
    scaled = torch.fx.symbolic_trace(_Scaled(source[0]).eval())
    assert relative_error(source(x), scaled(x)) <= 1e-6  # equal in float32
    with pytest.raises(ExportError, match=r"the fp16 model differs from float32 by relative "
                                          r"error inf > tolerance 0.00977; the model's own fp16 "
                                          r"rounding: \d\.\de-04$"):
        deploy_form(scaled, x, dtype="fp16", source=source)


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--channels-last",), "ONNX is NCHW"),
        (("--dtype", "bf16"), "no bfloat16 Conv"),
    ],
)
def test_onnx_refuses_what_it_cannot_verify(extra, message, tmp_path, capsys):
    argv = [
        "build",
        str(ROOT / "specs/regnetx_200mf.yaml"),
        "-o",
        str(tmp_path / "m.onnx"),
        "--input-size",
        str(SIZE),
        *extra,
    ]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_refuses_deploy_options(tmp_path, capsys):
    argv = [
        "build",
        str(ROOT / "specs/regnetx_200mf.yaml"),
        "-o",
        str(tmp_path / "m.pt"),
        "--dtype",
        "fp16",
    ]
    assert main(argv) == 2
    assert "float32 (train) form" in capsys.readouterr().err


def _small_program(tmp_path: Path, seed: int) -> tuple[Path, nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()).eval()
    x = torch.randn(2, 3, 8, 8)
    path = tmp_path / f"small{seed}.pt2"
    torch.export.save(torch.export.export(model, (x,)), str(path), extra_files={"note": "hi"})
    return path, model, x


def test_load_program_is_torch_export_load_with_the_hints_cached(monkeypatch, tmp_path):
    """`load_program` reads the same program (graph, tensors, extra files) as torch.export.load,
    and leaves torch's deserializer as it found it, also after a failed load."""
    from torch._export.serde import serialize

    from archc.backends.export import load_program

    path, model, x = _small_program(tmp_path, 0)
    extra = {"note": ""}
    ours, theirs = load_program(str(path), extra), torch.export.load(str(path))
    assert extra["note"] == "hi"
    assert str(ours.graph) == str(theirs.graph)
    assert ours.state_dict.keys() == theirs.state_dict.keys()
    assert all(torch.equal(ours.state_dict[k], theirs.state_dict[k]) for k in ours.state_dict)
    torch.testing.assert_close(ours.module()(x), model(x), rtol=0, atol=0)

    def failing(source, extra_files=None):
        assert serialize.typing is not typing  # the cache is in place during the load
        raise ValueError("corrupt")

    monkeypatch.setattr(torch.export, "load", failing)
    with pytest.raises(ValueError, match="corrupt"):
        load_program(str(path))
    assert serialize.typing is typing


def test_export_program_refuses_a_reloaded_program_that_differs(monkeypatch, tmp_path):
    """The reload check of a written .pt2 still compares what the (cached-hints) loader reads
    back with eager: a loader that returns another model's program is refused, nothing written."""
    import archc.backends.export as export

    path, _, _ = _small_program(tmp_path, 1)
    monkeypatch.setattr(export, "load_program", lambda source, extra=None: torch.export.load(
        str(path)))
    torch.manual_seed(2)
    gm = torch.fx.symbolic_trace(
        nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()).eval())
    with pytest.raises(ExportError, match="differs from eager"):
        export_program(gm, tmp_path / "out.pt2", torch.randn(2, 3, 8, 8))
    assert not (tmp_path / "out.pt2").exists()
