"""BN folding (passes/bn_folding.py): numeric, structural, one negative test per refusal reason,
and a property test of the default pipeline over random conv/BN chains."""

from __future__ import annotations

import copy

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from torch import nn

import archc
from archc.errors import PassError
from archc.ir.init import random_input, randomize
from archc.ir.verify import relative_error
from archc.passes import bn_folding
from archc.passes.pipelines import PIPELINES
from archc.rewrite import weight_algebra
from archc.rewrite.pipeline import PassContext, run_pipeline
from archc.rewrite.rules import apply_rules
from tests.helpers import TOLERANCE, BNAndPad, assert_default_pipeline_exact_idempotent_honest


class Chain(nn.Sequential):
    """Modules applied in order; `bn(conv(x))` etc."""


def _fold(model: nn.Module, shape: tuple[int, ...], dtype=torch.float32, seed: int = 0,
          passes=("fold_bn", "eliminate_dead_code")):
    """Randomize, cast, run the passes; return (model, result, independent relative error)."""
    model = randomize(model, seed).to(dtype)
    ctx = PassContext(input_shape=shape, rtol=TOLERANCE[dtype], seed=seed, explain=True)
    result = run_pipeline(model, list(passes), ctx)
    x = random_input(shape, seed + 1, dtype)
    with torch.no_grad():
        error = relative_error([model(x)], [result.graph_module(x)])
    return model, result, error


def _ops(result) -> set[str]:
    return {op for op, count in result.reports[-1].after.ops.items() if count}


def _reasons(result) -> list[str]:
    return [refusal.reason for report in result.reports for refusal in report.refusals]


FOLDABLE = {
    "conv2d_bn": (lambda: Chain(nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6)), (2, 4, 7, 7)),
    "conv2d_nobias_grouped_strided_dilated_bn_eps": (
        lambda: Chain(nn.Conv2d(4, 8, 3, stride=2, dilation=2, groups=2, bias=False),
                      nn.BatchNorm2d(8, eps=1e-3)), (2, 4, 9, 9)),
    "depthwise_bn_not_affine": (
        lambda: Chain(nn.Conv2d(6, 6, 3, groups=6, padding=1), nn.BatchNorm2d(6, affine=False)),
        (2, 6, 5, 5)),
    "conv1d_bn": (lambda: Chain(nn.Conv1d(3, 5, 3), nn.BatchNorm1d(5, eps=1e-6)), (2, 3, 9)),
    "conv3d_bn": (lambda: Chain(nn.Conv3d(2, 4, 2, padding=1, padding_mode="replicate"),
                                nn.BatchNorm3d(4)), (2, 2, 4, 4, 4)),
    "conv_bn_bn": (lambda: Chain(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.BatchNorm2d(4)),
                   (2, 3, 4, 4)),
    "linear_bn1d": (lambda: Chain(nn.Linear(5, 7), nn.BatchNorm1d(7)), (3, 5)),
    "conv_transpose2d_grouped_bn": (
        lambda: Chain(nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2, padding=1),
                      nn.BatchNorm2d(6)), (2, 4, 5, 5)),
    "conv_transpose1d_bn": (lambda: Chain(nn.ConvTranspose1d(3, 4, 2, bias=False),
                                          nn.BatchNorm1d(4)), (2, 3, 6)),
    "bn_conv_grouped": (lambda: Chain(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, groups=2)),
                        (2, 4, 6, 6)),
    "bn_conv_reflect_padding": (
        lambda: Chain(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")),
        (2, 3, 5, 5)),
    "bn_conv_same_1x1": (lambda: Chain(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1, padding="same")),
                         (2, 3, 5, 5)),
    "bn1d_linear": (lambda: Chain(nn.BatchNorm1d(5), nn.Linear(5, 3, bias=False)), (4, 5)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", sorted(FOLDABLE))
def test_fold_is_exact_and_removes_bn(case, dtype):
    build, shape = FOLDABLE[case]
    _, result, error = _fold(build(), shape, dtype)
    assert error <= TOLERANCE[dtype]
    assert result.max_error <= TOLERANCE[dtype]
    assert not {op for op in _ops(result) if op.startswith("BatchNorm")}
    assert all(p.dtype == dtype for p in result.graph_module.parameters())


def test_fold_uses_the_eps_a_spec_gives():
    """A spec's `bn` eps (0.5 here, far from torch's 1e-5) is what the folded weights divide by:
    the fold is exact in float64, and the same network with torch's eps is another function."""
    spec = {"name": "eps", "input": {"size": 16}, "num_classes": 3,
            "bn": {"eps": 0.5, "momentum": 0.01},
            "body": {"type": "anynet", "stages": [
                {"block": "inverted_residual", "depth": 2, "width": 8, "stride": 1,
                 "expansion": 2}]}}
    model = archc.build(spec)
    _, result, error = _fold(model, (2, 3, 16, 16), torch.float64)
    assert error <= TOLERANCE[torch.float64]
    assert not {op for op in _ops(result) if op.startswith("BatchNorm")}
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.eps = 1e-5
    x = random_input((2, 3, 16, 16), 1, torch.float64)
    with torch.no_grad():
        assert relative_error([model(x)], [result.graph_module(x)]) > 1e-3


def test_fold_gives_a_bias_and_a_readable_report():
    model, result, _ = _fold(Chain(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)), (1, 3, 5, 5))
    assert model[0].bias is None and result.graph_module.get_submodule("0").bias is not None
    assert result.reports[0].rewrites == ["folded 1 into 0"]
    assert "BatchNorm2d 1->0" in result.format()


def test_conv_between_two_bns_prefers_the_exact_preceding_fold():
    # conv1 -> BN -> conv2(padded): the BN folds into conv1 (R1), never into the padded conv2.
    model = Chain(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1))
    _, result, error = _fold(model, (1, 3, 6, 6))
    assert error <= 1e-5
    assert result.reports[0].rewrites == ["folded 1 into 0"]


@pytest.mark.parametrize("verify", [True, False], ids=["float64-copy", "shared-tensors"])
def test_caller_module_and_tied_weights_are_untouched(verify):
    # BNAndPad's shift becomes a tensor constant that torch.fx would store on the module it traces
    model = randomize(Chain(nn.Conv2d(3, 4, 1, bias=False), BNAndPad(4, 1),
                            nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)), 0)
    state = copy.deepcopy(model.state_dict())
    attributes = set(vars(model))
    run_pipeline(model, PIPELINES["default"], PassContext(input_shape=(1, 3, 5, 5),
                                                          verify=verify))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert set(vars(model)) == attributes


class Functional(nn.Module):
    """`F.conv2d`/`F.linear`/`F.conv_transpose2d` and `F.batch_norm` on get_attr constants."""

    def __init__(self, layer: str, bn_first: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        shapes = {"conv": (6, 2, 3, 3), "linear": (6, 4), "transpose": (4, 3, 3, 3)}
        self.layer, self.bn_first = layer, bn_first
        self.weight = nn.Parameter(torch.randn(shapes[layer], generator=g) / 3)
        self.bias = nn.Parameter(torch.randn(6, generator=g) / 10) if layer != "conv" else None
        channels = 4 if bn_first else 6
        self.register_buffer("mean", torch.randn(channels, generator=g) * 0.3)
        self.register_buffer("var", torch.rand(channels, generator=g) * 1.5 + 0.5)
        self.gamma = nn.Parameter(torch.rand(channels, generator=g) + 0.5)
        self.beta = nn.Parameter(torch.randn(channels, generator=g) * 0.2)

    def forward(self, x):
        def bn(y):
            return F.batch_norm(y, self.mean, self.var, self.gamma, self.beta, False, 0.1, 1e-3)

        x = bn(x) if self.bn_first else x
        if self.layer == "conv":
            x = F.conv2d(x, self.weight, self.bias, 1, 0, 1, 2)
        elif self.layer == "linear":
            x = F.linear(x, self.weight, self.bias)
        else:
            x = F.conv_transpose2d(x, self.weight, self.bias, stride=2, groups=2)
        return x if self.bn_first else bn(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("layer, bn_first, shape", [
    ("conv", False, (2, 4, 6, 6)), ("conv", True, (2, 4, 6, 6)), ("linear", False, (3, 4)),
    ("linear", True, (3, 4)), ("transpose", False, (2, 4, 3, 3))])
def test_functional_fold(layer, bn_first, shape, dtype):
    model = Functional(layer, bn_first).eval().to(dtype)
    ctx = PassContext(input_shape=shape, rtol=TOLERANCE[dtype])
    result = run_pipeline(model, PIPELINES["default"], ctx)
    x = random_input(shape, 1, dtype)
    with torch.no_grad():
        assert relative_error([model(x)], [result.graph_module(x)]) <= TOLERANCE[dtype]
    assert not result.reports[-1].after.ops["batch_norm"]
    assert len(result.reports[1].rewrites) == 1
    assert len(result.graph_module.state_dict()) == 2  # the new weight and bias; BN is gone


class SharedConstant(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight, self.bn = nn.Parameter(torch.randn(3, 3, 1, 1)), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(F.conv2d(x, self.weight)) + F.conv2d(x, self.weight)


class ReadsConvWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv.weight.sum()


def test_functional_constant_read_twice_folds_into_a_new_constant():
    _, result, error = _fold(SharedConstant(), (2, 3, 4, 4))
    assert error <= 1e-5 and result.reports[0].rewrites == ["folded bn into conv2d"]
    assert "weight" in result.graph_module.state_dict()  # the other conv still reads it


def test_module_whose_weight_is_read_elsewhere_is_shared():
    _, result, _ = _fold(ReadsConvWeight(), (2, 3, 4, 4))
    assert _reasons(result) == [bn_folding.SHARED_MODULE]


class ComputedWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4, 3, 1, 1))
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(F.conv2d(x, self.weight * 2))


# ---- one negative test per refusal reason ----

class TwoUses(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x)


class OtherUser(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class StandardizedConv(nn.Conv2d):
    """Weight standardization: the forward normalizes W, so W * t is not what it computes."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / w.std((1, 2, 3), keepdim=True)
        return self._conv_forward(x, w, self.bias)


REFUSED = {
    bn_folding.NO_RUNNING_STATS: (
        lambda: Chain(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)),
        (2, 3, 4, 4)),
    bn_folding.SHARED_MODULE: (TwoUses, (2, 3, 4, 4)),
    bn_folding.OTHER_USERS: (OtherUser, (2, 3, 4, 4)),
    bn_folding.NOT_CONSTANT: (ComputedWeight, (2, 3, 4, 4)),
    bn_folding.PADDING: (lambda: Chain(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1)),
                         (2, 3, 5, 5)),
    # BatchNorm1d normalizes dim 1 (length 4), the Linear mixes the last dim (also 4)
    bn_folding.LINEAR_RANK: (lambda: Chain(nn.Linear(4, 4), nn.BatchNorm1d(4)), (2, 4, 4)),
    bn_folding.UNBATCHED: (lambda: Chain(nn.Conv1d(4, 4, 1), nn.BatchNorm1d(4)), (4, 4)),
    bn_folding.NO_NEIGHBOUR: (lambda: Chain(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.BatchNorm2d(4)),
                              (2, 3, 4, 4)),
}


@pytest.mark.parametrize("reason", sorted(REFUSED), ids=lambda r: r[:30])
def test_refusal_is_reported_and_bn_kept(reason):
    build, shape = REFUSED[reason]
    _, result, error = _fold(build(), shape)
    assert error <= 1e-5
    assert _reasons(result) == [reason]
    assert reason in result.format(explain=True)
    assert any(op.startswith("BatchNorm") for op in _ops(result))


def test_subclass_with_own_forward_refused():
    class KeepStandardizedConv(torch.fx.Tracer):
        def is_leaf_module(self, module, name):
            return isinstance(module, StandardizedConv) or super().is_leaf_module(module, name)

    model = randomize(Chain(StandardizedConv(3, 4, 3), nn.BatchNorm2d(4)), 0)
    gm = torch.fx.GraphModule(model, KeepStandardizedConv().trace(model))
    result = run_pipeline(gm, ["fold_bn"], PassContext(input_shape=(2, 3, 5, 5)))
    assert _reasons(result) == [bn_folding.SUBCLASS]


def test_linear_bn_refused_without_shapes():
    model = randomize(Chain(nn.Linear(4, 4), nn.BatchNorm1d(4)), 0)
    result = run_pipeline(model, ["fold_bn"], PassContext(verify=False))
    assert _reasons(result) == [bn_folding.LINEAR_RANK]


def test_training_bn_refused_by_the_rule():
    # The registered pass refuses training models outright (test_pipeline); the rule itself too.
    gm = torch.fx.symbolic_trace(Chain(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).train())
    result = apply_rules(gm, bn_folding.RULES)
    assert not result.modified
    assert [r.reason for r in result.report.refusals] == [bn_folding.TRAINING]


def test_channel_mismatch_refused():
    # Never executed (BN(4) after a conv writing 8 channels would fail at run time): tracing only.
    gm = torch.fx.symbolic_trace(Chain(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(4)).eval())
    result = apply_rules(gm, bn_folding.RULES)
    assert [r.reason for r in result.report.refusals] == [bn_folding.CHANNEL_MISMATCH]


def test_verify_catches_a_wrong_fold(monkeypatch):
    bn_affine = weight_algebra.bn_affine

    def wrong_eps(mean, var, weight, bias, eps):
        return bn_affine(mean, var, weight, bias, eps + 1e-2)

    monkeypatch.setattr(weight_algebra, "bn_affine", wrong_eps)
    model = randomize(Chain(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), 0)
    with pytest.raises(PassError, match=r"pass 'fold_bn' \(after remove_identity, "
                                        r"canonicalize\): output changed"):
        run_pipeline(model, PIPELINES["default"], PassContext(input_shape=(1, 3, 6, 6)))


# ---- property: the default pipeline over random conv/BN chains ----

@st.composite
def chains(draw):
    """A random Conv/BN/ReLU chain on a 4 or 8 channel input of side 12, with its input shape."""
    channels, side = draw(st.sampled_from([4, 8])), 12
    shape = (2, channels, side, side)
    layers: list[nn.Module] = []
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["conv", "conv", "bn", "bn", "relu"]))
        if kind == "bn":
            layers.append(nn.BatchNorm2d(channels, eps=draw(st.sampled_from([1e-5, 1e-3, 1e-6])),
                                         affine=draw(st.booleans())))
        elif kind == "relu":
            layers.append(nn.ReLU())
        else:
            out = draw(st.sampled_from([4, 8]))
            k, s, d = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
            p = draw(st.sampled_from([0, d * (k - 1) // 2]))
            if side + 2 * p - d * (k - 1) < 1:
                continue
            side = (side + 2 * p - d * (k - 1) - 1) // s + 1
            layers.append(nn.Conv2d(channels, out, k, stride=s, padding=p, dilation=d,
                                    groups=draw(st.sampled_from([1, 2, 4])),
                                    bias=draw(st.booleans())))
            channels = out
    return Chain(*layers), shape


@settings(max_examples=30, deadline=None)
@given(chains(), st.integers(0, 2**16))
def test_default_pipeline_is_exact_idempotent_and_honest(chain, seed):
    model, shape = chain
    model = randomize(model, seed)
    assert_default_pipeline_exact_idempotent_honest(model, shape, seed)


def test_fold_bn_requires_functional_batch_norm_as_modules():
    """fold_bn reads BatchNorm modules only: on a functional BN it names the pass to run first."""
    model = Functional("conv").eval()
    with pytest.raises(PassError, match=r"pass 'fold_bn': needs every eval-mode BatchNorm .* "
                                        r"run 'canonicalize' before it \(batch_norm"):
        run_pipeline(model, ["fold_bn"], PassContext(input_shape=(2, 4, 6, 6)))
    result = run_pipeline(model, ["canonicalize", "fold_bn"], PassContext(input_shape=(2, 4, 6, 6)))
    assert not result.reports[-1].after.ops["batch_norm"]
