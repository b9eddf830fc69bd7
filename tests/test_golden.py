"""Golden-output regression tests (see tests/golden_suite.py; regenerate only with
`python tests/golden/regenerate.py`). A change of numbers or of graph structure fails here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from archc.ir.verify import relative_error
from tests import golden_suite as suite

NAMES = suite.spec_names()


def assert_close(actual: np.ndarray, expected: np.ndarray, what: str, tolerance: float) -> None:
    error = relative_error(torch.from_numpy(expected), torch.from_numpy(actual))
    assert error <= tolerance, f"{what}: relative error {error:.3g} > {tolerance:.3g}"


def test_every_spec_has_a_golden():
    manifest = suite.manifest()
    assert sorted(manifest["specs"]) == NAMES, "run python tests/golden/regenerate.py"
    for name in NAMES:
        assert (suite.GOLDEN / f"{name}.npz").exists() and (suite.GOLDEN / f"{name}.json").exists()
    assert manifest["opset"] == suite.OPSET and manifest["seed"] == suite.SEED


def test_goldens_stay_small():
    total = sum(p.stat().st_size for p in suite.GOLDEN.iterdir())
    assert total < 8_000_000, f"golden data is {total / 1e6:.1f} MB"


@pytest.mark.parametrize("name", NAMES)
def test_train_and_deploy_outputs(name):
    arrays, structure = suite.load(name)
    spec, train = suite.train_model(name)
    x = suite.example_input(spec)
    assert suite.digest(x.numpy()) == suite.manifest()["specs"][name]["input_sha256_16"]
    np.testing.assert_array_equal(x.numpy(), arrays["input"])
    tolerance = suite.tolerance(train, x)
    with torch.no_grad():
        assert_close(train(x).numpy(), arrays["train"], f"{name}: train form", tolerance)
        deploy = suite.deploy_model(train, x)
        assert_close(deploy(x).numpy(), arrays["deploy"], f"{name}: deploy form", tolerance)
    assert suite.fx_histogram(deploy) == structure["deploy_fx_ops"], f"{name}: deploy graph ops"


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_onnx_outputs_and_structure(name):
    arrays, structure = suite.load(name)
    spec, train = suite.train_model(name)
    x = suite.example_input(spec)
    deploy = suite.deploy_model(train, x)
    output, ops = suite.onnx_run(deploy, x)
    assert_close(output, arrays["onnx"], f"{name}: ONNX Runtime", suite.tolerance(train, x))
    assert ops == structure["onnx_ops"], f"{name}: ONNX graph ops"


def test_a_broken_pass_fails_the_golden(monkeypatch):
    """BN folding with the wrong eps (1e-3 instead of the BN's own): the per-pass verification is
    switched off, as a user with --no-verify would; the golden comparison must catch it."""
    from archc.rewrite import weight_algebra

    real = weight_algebra.bn_affine

    def wrong_eps(mean, var, weight, bias, eps):
        return real(mean, var, weight, bias, 1e-3)

    monkeypatch.setattr(weight_algebra, "bn_affine", wrong_eps)
    name = "regnetx_200mf"
    arrays, _ = suite.load(name)
    spec, train = suite.train_model(name)
    x = suite.example_input(spec)
    with torch.no_grad():
        broken = suite.deploy_model(train, x, verify=False)(x).numpy()
    with pytest.raises(AssertionError, match="broken fold: relative error"):
        assert_close(broken, arrays["deploy"], "broken fold", suite.tolerance(train, x))
