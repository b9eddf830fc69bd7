"""canonicalize (passes/canonical.py): one test per rule (shape queries and guards, constant ops,
satisfied asserts, functional / aten batch norm and layer norm, batch-free reshapes, parameter
views, in-place ops), each checked in float64 on random weights with randomized BN statistics,
idempotent; one negative test per refusal reason."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule

from archc.ir.init import random_input, randomize
from archc.passes import canonical
from archc.rewrite.pipeline import PassContext, run_pipeline
from tests.helpers import TOLERANCE, run_randomized

SHAPE = (2, 3, 8, 8)
F64 = torch.float64


class ConvThen(nn.Module):
    """A conv (every tensor after it is fresh, computed in the graph), then `tail(self, y, x)`."""

    def __init__(self, tail, channels: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.tail = tail

    def forward(self, x):
        return self.tail(self, self.conv(x), x)


def _by_hand(tail) -> GraphModule:
    """ConvThen's graph written node by node (for what tracing would evaluate or rewrite):
    `tail(graph, conv_output, x)` adds the nodes after the conv and returns the output."""
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    graph.output(tail(graph, graph.call_module("conv", (x,)), x))
    return GraphModule(ConvThen(None), graph).eval()


def _canonicalize(model: nn.Module, shape=SHAPE):
    """Run canonicalize on `model` randomized in float64, check the output independently of the
    pipeline's own check, run it again on its result and check that nothing changes; return the
    first run's graph and report."""
    model, result, error = run_randomized(model, ["canonicalize"], shape, F64)
    assert error <= TOLERANCE[F64] and result.max_error <= TOLERANCE[F64]
    again = run_pipeline(result.graph_module, ["canonicalize"],
                         PassContext(input_shape=shape, explain=True))
    assert not again.reports[0].modified and again.graph_module.code == result.graph_module.code
    return result.graph_module, result.reports[0]


def _targets(gm) -> list:
    return [node.target for node in gm.graph.nodes if node.op in ("call_function", "call_method")]


def _reasons(report) -> list[str]:
    return [refusal.reason for refusal in report.refusals]


# ---- shape queries, constants, asserts ----

def test_rank_query_becomes_the_rank():
    model = ConvThen(lambda m, y, x: y.flatten(y.ndim - 3) + y.dim())
    gm, report = _canonicalize(model)
    assert report.fired["rank_query"] == 2 and report.fired["constant_op"] == 1
    assert getattr not in _targets(gm) and "dim" not in _targets(gm)


def test_guard_queries_constant_ops_and_satisfied_asserts_disappear():
    def guarded(m, y, x):
        torch._assert(x.shape[1] == 3, "three input channels")
        torch._assert(y.size(1) == 4, "four channels")
        torch._assert(y.numel() > 0, "not empty")
        return y

    gm, report = _canonicalize(ConvThen(guarded))
    assert report.fired["guard_query"] == 3 and report.fired["true_assert"] == 3
    assert report.fired["constant_op"] >= 4  # getitem, ==, ==, >
    assert _targets(gm) == []  # only the conv is left


def test_a_size_that_feeds_a_reshape_stays_a_query():
    gm, report = _canonicalize(ConvThen(lambda m, y, x: y.view(y.size(0), -1)))
    assert not report.modified and "size" in _targets(gm)


def test_constant_op_on_python_constants():
    gm, report = _canonicalize(_by_hand(lambda graph, y, x: graph.call_function(
        operator.mul, (y, graph.call_function(operator.add, (2, 3))))))
    assert report.fired["constant_op"] == 1 and _targets(gm) == [operator.mul]
    assert next(node for node in gm.graph.nodes if node.target is operator.mul).args[1] == 5


def test_a_failing_constant_op_is_left_for_the_model_to_raise():
    gm = _by_hand(lambda graph, y, x: graph.call_function(
        operator.mul, (y, graph.call_function(operator.truediv, (1, 0)))))
    result = run_pipeline(gm, ["canonicalize"], PassContext(verify=False))
    assert not result.reports[0].modified and operator.truediv in _targets(result.graph_module)


# ---- batch norm written as a function ----

def _functional_bn(m, y, x):
    bn = m.bn
    return F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.1,
                        bn.eps)


def _aten_bn(m, y, x):
    bn = m.bn
    return torch.ops.aten.batch_norm.default(y, bn.weight, bn.bias, bn.running_mean,
                                             bn.running_var, False, 0.1, bn.eps, False)


def _torch_bn(m, y, x):
    bn = m.bn
    return torch.batch_norm(y, bn.weight, bn.bias, bn.running_mean, bn.running_var, False, 0.1,
                            bn.eps, False)


@pytest.mark.parametrize("tail", [_functional_bn, _aten_bn, _torch_bn],
                         ids=["F.batch_norm", "aten.batch_norm", "torch.batch_norm"])
def test_functional_batch_norm_becomes_a_module(tail):
    gm, report = _canonicalize(ConvThen(tail))
    assert report.fired["functional_bn"] == 1
    norms = [module for module in gm.modules() if isinstance(module, nn.BatchNorm2d)]
    assert len(norms) == 1 and not norms[0].training
    assert all(node.op != "call_function" for node in gm.graph.nodes)  # no BN function left


def test_batch_norm_without_affine_parameters():
    def plain(m, y, x):
        return F.batch_norm(y, m.bn.running_mean, m.bn.running_var, None, None, False, 0.1, 1e-3)

    gm, report = _canonicalize(ConvThen(plain))
    norm = next(module for module in gm.modules() if isinstance(module, nn.BatchNorm2d))
    assert report.fired["functional_bn"] == 1 and not norm.affine and norm.eps == 1e-3


def test_batch_norm_1d_on_features():
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.bn = nn.Linear(3 * 8 * 8, 5), nn.BatchNorm1d(5)

        def forward(self, x):
            bn = self.bn
            return F.batch_norm(self.fc(x.flatten(1)), bn.running_mean, bn.running_var,
                                bn.weight, bn.bias, False, 0.1, bn.eps)

    gm, report = _canonicalize(Head())
    assert report.fired["functional_bn"] == 1
    assert any(isinstance(module, nn.BatchNorm1d) for module in gm.modules())


class ActivatedNorm(nn.BatchNorm2d):
    """A BatchNorm subclass whose forward re-implements BN with an activation and dropout tail
    (as some libraries write their norm-act layers)."""

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False,
                         0.0, self.eps)
        return F.dropout(F.silu(x), 0.1, self.training)


def test_a_batch_norm_subclass_becomes_the_module_and_its_tails():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), ActivatedNorm(4))
    gm, report = _canonicalize(model)
    assert report.fired["functional_bn"] == 1
    assert F.batch_norm not in _targets(gm) and F.silu in _targets(gm)
    called = [gm.get_submodule(node.target) for node in gm.graph.nodes
              if node.op == "call_module"]
    assert [type(module) for module in called] == [nn.Conv2d, nn.BatchNorm2d]


def test_computed_statistics_are_refused():
    def computed(m, y, x):
        bn = m.bn
        return F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight * 2.0, bn.bias, False,
                            0.1, bn.eps)

    gm, report = _canonicalize(ConvThen(computed))
    assert not report.fired["functional_bn"] and F.batch_norm in _targets(gm)
    assert _reasons(report) == [canonical.STATISTICS]
    assert report.refusals[0].rule == "functional_bn"


def test_training_mode_batch_norm_is_left_to_fold_bn():
    def training(m, y, x):
        return F.batch_norm(y, m.bn.running_mean, m.bn.running_var, training=True)

    traced = torch.fx.symbolic_trace(ConvThen(training).eval())
    result = run_pipeline(traced, ["canonicalize"], PassContext(verify=False))
    assert not result.reports[0].modified and not result.reports[0].refusals


# ---- reshapes that spell the batch size ----

def test_batch_free_reshape_accepts_any_batch():
    gm, report = _canonicalize(ConvThen(lambda m, y, x: y.view(2, 4 * 8 * 8) + 0.5
                                        + torch.reshape(y, (2, 4, 64)).sum(2).sum(1, True)))
    assert report.fired["batch_free_reshape"] == 2
    with torch.no_grad():
        assert gm(random_input((5, 3, 8, 8), 1, F64)).shape == (5, 256)


def test_a_batch_and_minus_one_reshape_accepts_any_batch():
    """view(N, -1), as `x.view(x.size(0), -1)` is recorded by a program exported at batch N:
    the -1 takes the recorded size, the batch becomes -1."""
    gm, report = _canonicalize(ConvThen(lambda m, y, x: y.view(2, -1) * 2.0))
    assert report.fired["batch_free_reshape"] == 1
    with torch.no_grad():
        assert gm(random_input((5, 3, 8, 8), 1, F64)).shape == (5, 256)


@pytest.mark.parametrize("reshape", [lambda y: y.view(4, 2, 64), lambda y: y.view(4, -1)])
def test_a_reshape_whose_first_size_is_not_the_batch_is_kept(reshape):
    gm, report = _canonicalize(ConvThen(lambda m, y, x: reshape(y)))
    assert not report.fired["batch_free_reshape"]


# ---- layer norm written as a function ----

class LayerNorm2d(nn.LayerNorm):
    """timm's and torchvision's NCHW LayerNorm: a LayerNorm subclass permuting around
    F.layer_norm."""

    def forward(self, x):
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                         self.eps)
        return x.permute(0, 3, 1, 2)


def test_functional_layer_norm_becomes_a_module():
    gm, report = _canonicalize(nn.Sequential(nn.Conv2d(3, 4, 1), LayerNorm2d(4, eps=1e-6)))
    assert report.fired["functional_ln"] == 1 and F.layer_norm not in _targets(gm)
    norm = next(m for m in gm.modules() if type(m) is nn.LayerNorm)
    assert norm.normalized_shape == (4,) and norm.eps == 1e-6


def test_layer_norm_over_several_dims_is_left_as_it_is():
    gm, report = _canonicalize(ConvThen(lambda m, y, x: F.layer_norm(y, y.shape[2:])))
    assert not report.fired["functional_ln"] and F.layer_norm in _targets(gm)


def test_computed_layer_norm_weight_is_refused():
    class Scaled(nn.LayerNorm):
        def forward(self, x):
            return F.layer_norm(x, self.normalized_shape, self.weight * 2.0, self.bias)

    gm, report = _canonicalize(nn.Sequential(nn.Linear(8, 4), Scaled(4)), (2, 8))
    assert not report.fired["functional_ln"] and F.layer_norm in _targets(gm)
    assert _reasons(report) == [canonical.LN_AFFINE]


def test_a_parameter_view_follows_the_parameter():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.gamma = nn.Conv2d(3, 4, 1), nn.Parameter(torch.rand(4))

        def forward(self, x):
            return self.conv(x) * self.gamma.view(1, 4, 1, 1)

    gm, report = _canonicalize(Scale())
    assert report.fired["parameter_view"] == 1
    view = next(n for n in gm.graph.nodes if n.target == "view")
    assert list(view.args[1:]) == [1, -1, 1, 1]


# ---- in-place ops ----

IN_PLACE = {
    "method": lambda m, y, x: y.add_(1.0) * 2,
    "method_read_later": lambda m, y, x: (y.mul_(0.5), y + 1)[1],
    "aten": lambda m, y, x: torch.ops.aten.add_.Tensor(y, m.bn(y)) - 1,
    "relu_": lambda m, y, x: y.relu_() + y,
    "inplace=True": lambda m, y, x: F.relu(y, inplace=True) + y,
    "leaky_relu inplace": lambda m, y, x: F.leaky_relu(y, 0.2, True) * y,
}


def _iadd(graph, y, x):
    """`y += bn(y); return y * 2` as an exported or scripted graph spells it (tracing a `+=`
    records an `operator.add`)."""
    total = graph.call_function(operator.iadd, (y, graph.call_module("bn", (y,))))
    return graph.call_function(operator.mul, (y, total))


@pytest.mark.parametrize("case", [*sorted(IN_PLACE), "operator.iadd"])
def test_in_place_ops_become_out_of_place(case):
    model = _by_hand(_iadd) if case == "operator.iadd" else ConvThen(IN_PLACE[case])
    gm, report = _canonicalize(model)
    assert report.fired["in_place"] == 1 and not report.refusals
    for node in gm.graph.nodes:
        if node.op == "call_method":
            assert not node.target.endswith("_"), node.format_node()
        assert node.target not in (operator.iadd, torch.ops.aten.add_.Tensor)
        assert node.kwargs.get("inplace") is not True, node.format_node()


def test_an_in_place_write_into_the_input_is_refused():
    model = randomize(ConvThen(lambda m, y, x: x.mul_(2.0).mean() + y), 0)
    # not verified: the model writes into its caller's input, so no two runs see the same x
    result = run_pipeline(model, ["canonicalize"], PassContext(verify=False))
    report = result.reports[0]
    assert not report.fired["in_place"] and _reasons(report) == [canonical.NOT_FRESH]
    assert "mul_" in _targets(result.graph_module)


def test_an_in_place_write_into_a_view_is_refused():
    gm, report = _canonicalize(ConvThen(lambda m, y, x: y.flatten(1).add_(1.0) * 2))
    assert not report.fired["in_place"] and _reasons(report) == [canonical.NOT_FRESH]


def test_a_view_read_after_the_write_is_refused():
    def aliased(m, y, x):
        flat = y.view(2, -1)
        y.add_(1.0)
        return flat * 2  # reads the written values through the view

    gm, report = _canonicalize(ConvThen(aliased))
    assert not report.fired["in_place"] and _reasons(report) == [canonical.VIEW_READ]
    assert "add_" in _targets(gm)


def test_a_view_read_only_before_the_write_is_no_obstacle():
    def earlier(m, y, x):
        total = y.view(2, -1).sum(1)
        y.add_(1.0)
        return y.mean((1, 2, 3)) + total

    gm, report = _canonicalize(ConvThen(earlier))
    assert report.fired["in_place"] == 1 and not report.refusals
