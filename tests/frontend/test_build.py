"""`archc build`: ONNX, .pt and .pt2 outputs reproduce eager PyTorch (randomized BN statistics)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import archc
from archc.backends import export
from archc.backends.checkpoint import load_checkpoint
from archc.cli.main import main
from archc.ir.init import random_input
from archc.ir.verify import relative_error
from archc.rewrite import weight_algebra

SPEC = "specs/regnetx_600mf.yaml"


def eager_reference(seed: int, shape=(2, 3, 224, 224)):
    gm = archc.build(SPEC, seed=seed, init="random")
    x = random_input(shape, seed=seed + 101)
    with torch.no_grad():
        return gm, x, gm(x)


def test_randomized_model_is_non_degenerate():
    gm, x, y = eager_reference(seed=3)
    assert 0.1 < y.abs().max().item() < 1e3  # O(1) logits, not the 1e-9 of a default init
    bns = [m for m in gm.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all((bn.running_var - 1).abs().max() > 1e-3 for bn in bns)


@pytest.mark.slow
def test_onnx_build_matches_eager(tmp_path, capsys):
    out = tmp_path / "model.onnx"
    assert main(["build", SPEC, "-o", str(out), "--init", "random", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert "6,196,040 params" in printed and "relative" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # one file, no .data
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    assert model.opset_import[0].version == 18
    _, x, y = eager_reference(seed=3)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert relative_error(y, torch.from_numpy(got)) <= 1e-5
    assert np.isfinite(got).all()


def test_pt_checkpoint_reloads_with_weights_only(tmp_path):
    out = tmp_path / "model.pt"
    assert main(["build", SPEC, "-o", str(out), "--init", "random", "--seed", "5"]) == 0
    payload = torch.load(out, weights_only=True)
    assert payload["format"] == "archc-checkpoint" and payload["spec"]["name"] == "regnetx_600mf"
    spec, gm = load_checkpoint(out)
    _, x, y = eager_reference(seed=5)
    with torch.no_grad():
        assert relative_error(y, gm(x)) == 0.0


def test_pt2_program_reloads(tmp_path):
    out = tmp_path / "model.pt2"
    assert main(["build", SPEC, "-o", str(out), "--init", "random", "--seed", "7"]) == 0
    program = torch.export.load(str(out))
    _, x, y = eager_reference(seed=7, shape=(3, 3, 224, 224))
    with torch.no_grad():
        assert relative_error(y, program.module()(x)) <= 1e-5


def _perturbed_onnx_runtime(monkeypatch):
    """ONNX Runtime's output 1% off: the emitted file fails its parity check."""
    session = export._onnxruntime_session
    monkeypatch.setattr(export, "_onnxruntime_session",
                        lambda data: lambda x: session(data)(x) * 1.01)


def _fold_with_wrong_eps(monkeypatch):
    """BN folding with eps 1e-3 instead of the BN's own: the float64 check of fold_bn fails."""
    affine = weight_algebra.bn_affine
    monkeypatch.setattr(weight_algebra, "bn_affine",
                        lambda mean, var, weight, bias, eps: affine(mean, var, weight, bias, 1e-3))


@pytest.mark.parametrize(
    "passes, break_it, message",
    [
        ("none", _perturbed_onnx_runtime, "differs from eager PyTorch"),
        ("default", _fold_with_wrong_eps,
         "pass 'fold_bn' (after remove_identity, canonicalize): output changed"),
    ],
)
def test_failed_verification_writes_nothing(passes, break_it, message, tmp_path, capsys,
                                            monkeypatch):
    break_it(monkeypatch)
    out = tmp_path / "model.onnx"
    args = ["build", SPEC, "-o", str(out), "--init", "random", "--input-size", "64",
            "--passes", passes]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_build_options_change_the_example_input(tmp_path, capsys):
    out = tmp_path / "small.onnx"
    args = ["build", SPEC, "-o", str(out), "--input-size", "96", "--batch", "2", "--opset", "20"]
    assert main([*args, "--static-batch"]) == 0
    assert "3x96x96" in capsys.readouterr().out
    model = onnx.load(str(out))
    assert model.opset_import[0].version == 20
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [2, 3, 96, 96]


def test_build_keeps_the_batch_free_by_default(tmp_path):
    out = tmp_path / "free.onnx"
    assert main(["build", SPEC, "-o", str(out), "--input-size", "64", "--batch", "2"]) == 0
    batch, *rest = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim
    assert batch.dim_param and not batch.dim_value
    assert [d.dim_value for d in rest] == [3, 64, 64]
