"""`archc build`: ONNX, .pt and .pt2 outputs reproduce eager PyTorch (randomized BN statistics)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import archc
from archc.cli import main
from archc.export import load_checkpoint, relative_error
from archc.init import random_input

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
    assert (
        main(["build", SPEC, "-o", str(out), "--init", "random", "--seed", "3", "--dynamic-batch"])
        == 0
    )
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
    assert relative_error(y, torch.from_numpy(got))[1] <= 1e-5
    assert np.isfinite(got).all()


def test_pt_checkpoint_reloads_with_weights_only(tmp_path):
    out = tmp_path / "model.pt"
    assert main(["build", SPEC, "-o", str(out), "--init", "random", "--seed", "5"]) == 0
    payload = torch.load(out, weights_only=True)
    assert payload["format"] == "archc-checkpoint" and payload["spec"]["name"] == "regnetx_600mf"
    spec, gm = load_checkpoint(out)
    _, x, y = eager_reference(seed=5)
    with torch.no_grad():
        assert relative_error(y, gm(x))[1] == 0.0


def test_pt2_program_reloads(tmp_path):
    out = tmp_path / "model.pt2"
    assert (
        main(["build", SPEC, "-o", str(out), "--init", "random", "--seed", "7", "--dynamic-batch"])
        == 0
    )
    program = torch.export.load(str(out))
    _, x, y = eager_reference(seed=7, shape=(3, 3, 224, 224))
    with torch.no_grad():
        assert relative_error(y, program.module()(x))[1] <= 1e-5


@pytest.mark.parametrize(
    "passes, message",
    [
        ("none", "differs from eager PyTorch"),  # the emitted file fails its parity check
        ("default", "pass 'fold_bn' (after remove_identity): output changed"),  # a pass fails
    ],
)
def test_failed_verification_writes_nothing(passes, message, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    assert (
        main(
            [
                "build",
                SPEC,
                "-o",
                str(out),
                "--init",
                "random",
                "--rtol",
                "0",
                "--input-size",
                "64",
                "--passes",
                passes,
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_build_options_change_the_example_input(tmp_path, capsys):
    out = tmp_path / "small.onnx"
    assert (
        main(["build", SPEC, "-o", str(out), "--input-size", "96", "--batch", "2", "--opset", "20"])
        == 0
    )
    assert "3x96x96" in capsys.readouterr().out
    model = onnx.load(str(out))
    assert model.opset_import[0].version == 20
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [2, 3, 96, 96]
