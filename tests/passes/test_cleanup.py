"""Cleanup passes (passes/cleanup.py): remove_identity, eliminate_dead_code, fold_constants."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from archc.passes import cleanup
from archc.rewrite.pipeline import PassContext, run_pipeline
from archc.rewrite.rules import apply_rules
from tests.helpers import TOLERANCE, run_randomized

SHAPE = (2, 4, 5, 5)


def _cleaned(model: nn.Module, passes: list[str], dtype=torch.float32):
    _, result, error = run_randomized(model, passes, SHAPE, dtype)
    assert error <= TOLERANCE[dtype]
    return result


def _kinds(result) -> set[str]:
    return {op for op, n in result.reports[-1].after.ops.items() if n}


def _reasons(result) -> list[str]:
    return [r.reason for report in result.reports for r in report.refusals]


class Identities(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.identity, self.drop = nn.Identity(), nn.Dropout(0.3)
        self.drop2d, self.alpha = nn.Dropout2d(0.5), nn.AlphaDropout(0.1)

    def forward(self, x):
        x = self.alpha(self.drop2d(self.drop(self.identity(self.conv(x)))))
        x = F.dropout(x, 0.2, self.training) + F.dropout2d(x, 0.2, training=False)
        x = ((x * 1) / 1 + 0 - 0.0) * 1.0
        x = 1 * torch.add(x, 0).mul(1) + 0
        return torch.relu(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_remove_identity(dtype):
    result = _cleaned(Identities(), ["remove_identity", "eliminate_dead_code"], dtype)
    assert _kinds(result) == {"Conv2d", "add", "relu"}
    assert result.reports[0].refusals == []
    assert "removed drop2d" in result.reports[0].rewrites
    second = run_pipeline(result.graph_module, ["remove_identity"], PassContext(input_shape=SHAPE))
    assert not second.modified


class FunctionalDropoutTraining(nn.Module):
    def forward(self, x):
        return F.dropout(x, 0.5) + F.dropout(x, 0.0, True)  # default training=True; p=0 is exact


class PromotesDtype(nn.Module):
    def forward(self, x):
        return (x > 0) + 0  # bool + 0 is int64


def test_functional_dropout_in_training_refused():
    model = FunctionalDropoutTraining().eval()
    result = run_pipeline(model, ["remove_identity"], PassContext(verify=False))
    assert _reasons(result) == [cleanup.FUNCTIONAL_TRAINING]
    assert result.reports[0].rewrites == ["removed dropout_1"]


def test_promoting_op_refused():
    result = _cleaned(PromotesDtype(), ["remove_identity"])
    assert _reasons(result) == [cleanup.CHANGES_DTYPE]


def test_unknown_dtype_refused():
    gm = torch.fx.symbolic_trace(lambda x: x * 1.0)
    result = run_pipeline(gm, ["remove_identity"], PassContext(verify=False))
    assert _reasons(result) == [cleanup.DTYPE_UNKNOWN]


def test_training_dropout_refused_by_the_rule():
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Dropout()).train())
    result = apply_rules(gm, cleanup.IDENTITY_RULES)
    assert not result.modified
    assert [r.reason for r in result.report.refusals] == [cleanup.TRAINING_DROPOUT]


class Dead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.unused, self.relu = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1), nn.ReLU(True)
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        self.unused(x) + self.scale  # dead: nothing reads it
        y = self.conv(x)
        z = y.clone()
        z.relu_()  # in place: result unused, mutation is not
        w = y.clone()
        self.relu(w)
        v = y.clone()
        F.relu(v, True)
        return z + w + v


def test_eliminate_dead_code_keeps_in_place_ops():
    result = _cleaned(Dead(), ["eliminate_dead_code"])
    rewrites = result.reports[0].rewrites
    assert rewrites == ["deleted nodes: unused, scale, add", "deleted submodules: unused",
                        "deleted attributes: scale"]
    assert _kinds(result) == {"Conv2d", "ReLU", "Tensor.clone", "Tensor.relu_", "relu", "add"}
    assert not run_pipeline(result.graph_module, ["eliminate_dead_code"],
                            PassContext(input_shape=SHAPE)).modified


class Constants(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))
        self.column, self.row = nn.Parameter(torch.ones(4, 1)), nn.Parameter(torch.ones(1, 4))

    def forward(self, x):
        x = x * (self.scale * 2 + 1).reshape(1, -1, 1, 1)
        return x.mean((2, 3)) @ torch.add(self.column, self.row)  # broadcast: 4 + 4 -> 16


def test_fold_constants():
    model = Constants()
    with torch.no_grad():
        model.scale.uniform_(0.5, 1.5)
    result = _cleaned(model, ["fold_constants", "eliminate_dead_code"])
    assert result.reports[0].rewrites == ["folded mul into constant _folded_mul",
                                          "folded add into constant _folded_add",
                                          "folded reshape into constant _folded_reshape"]
    assert _reasons(result) == [cleanup.GROWS]
    gm = result.graph_module
    assert isinstance(gm._folded_reshape, nn.Parameter)
    assert {name for name, _ in gm.named_parameters()} == {"_folded_reshape", "column", "row"}
    assert not run_pipeline(gm, ["fold_constants"], PassContext(input_shape=SHAPE)).modified
