"""Sequential conv merging (passes/sequential_merging.py): R6, R7, R8 through the default pipeline
(numeric and structural checks, the cost decision both ways), one negative test per refusal
reason, and the chain algebra (`chain_convs`, `merge_sequential_grouped`) against real convs."""

from __future__ import annotations

import re
from collections import Counter

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from torch import nn

from archc.ir.init import randomize
from archc.ir.ops import op_kind
from archc.ir.verify import relative_error
from archc.passes import sequential_merging as sm
from archc.passes.pipelines import PIPELINES
from archc.rewrite import legality
from archc.rewrite import linear_chains as chains
from archc.rewrite import weight_algebra as wa
from archc.rewrite.pipeline import PassContext, run_pipeline
from tests.helpers import TOLERANCE, BNAndPad, Fn, run_randomized

SHAPE = (2, 8, 10, 10)
MERGE = PIPELINES["default"].index("merge_sequential_convs")




class Chain(nn.Sequential):
    """Modules applied in order."""


def _conv(*args, **kwargs):
    return nn.Conv2d(*args, **kwargs)


MERGED = {
    # R7: KxK (any stride, dilation, groups) then 1x1
    "r7_3x3_s2_d2_then_1x1": (lambda: Chain(_conv(8, 8, 3, 2, 2, 2), _conv(8, 8, 1)), "R7"),
    "r7_grouped_bn_between": (lambda: Chain(_conv(8, 8, 3, 1, 1, groups=2), nn.BatchNorm2d(8),
                                            _conv(8, 8, 1, groups=2)), "R7"),
    "r7_1x1_strided_second": (lambda: Chain(_conv(8, 8, 3, 1, 1), _conv(8, 8, 1, stride=2)),
                              "R7"),
    "r7_scale_and_bias_between": (lambda: Chain(_conv(8, 8, (1, 3), 1, (0, 1)),
                                                Fn(lambda y: 0.5 * y + 1.0), _conv(8, 8, 1)),
                                  "R7"),
    # R6: 1x1 then KxK, exact without bias, without padding, or with DBB's BNAndPad
    "r6_no_bias_padded": (lambda: Chain(_conv(8, 8, 1, bias=False), _conv(8, 8, 3, 1, 1)), "R6"),
    "r6_bias_unpadded_strided": (lambda: Chain(_conv(8, 8, 1, stride=2), _conv(8, 8, 3, 2, 0, 2)),
                                 "R6"),
    "r6_bnandpad": (lambda: Chain(_conv(8, 8, 1, bias=False), BNAndPad(8, 1),
                                  _conv(8, 8, 3, 1, 0), nn.BatchNorm2d(8)), "R6"),
    "r6_zero_pad_module": (lambda: Chain(_conv(8, 8, 1, bias=False), nn.ZeroPad2d(1),
                                         _conv(8, 8, 3)), "R6"),
    # R8: only when the merged conv is no costlier (few outer channels, many inner ones)
    "r8_stem": (lambda: Chain(_conv(8, 32, 3, 1, 1), _conv(32, 2, 3)), "R8"),
    "r8_strided_dilated": (lambda: Chain(_conv(8, 32, 3, 2, 2, 2), _conv(32, 2, 3, 1, 0, 2)),
                           "R8"),
    "r8_grouped": (lambda: Chain(_conv(8, 32, 3, 1, 1, groups=2), _conv(32, 4, 3, groups=2)),
                   "R8"),
    "three_1x1": (lambda: Chain(_conv(8, 8, 1), _conv(8, 8, 1), _conv(8, 8, 1)), "R7"),
}


def _ops(gm) -> Counter:
    return Counter(op_kind(gm, n) for n in gm.graph.nodes if n.op not in ("placeholder", "output"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", sorted(MERGED))
def test_chain_merges_into_one_conv(name, dtype):
    build, rule = MERGED[name]
    _, result, error = run_randomized(build(), "default", SHAPE, dtype)
    assert error <= TOLERANCE[dtype] and result.max_error <= TOLERANCE[dtype]
    assert _ops(result.graph_module) == Counter({"Conv2d": 1})
    rewrites = result.reports[MERGE].rewrites
    assert rewrites and all(f"({rule}" in r for r in rewrites[:1]), rewrites


def test_report_gives_the_cost_both_ways():
    _, result, _ = run_randomized(Chain(_conv(8, 32, 3, 1, 1), _conv(32, 2, 3)), "default", SHAPE)
    # merged 5x5: 25 * 8 * 2; unmerged: 9 * 8 * 32 + 9 * 32 * 2
    assert result.reports[MERGE].rewrites == [
        "merged 0 -> 1 into 1 (R8 KxK -> KxK; 5x5 s1 p1 d1 g1; "
        "merged 400 vs unmerged 2880 MACs per output pixel)"]
    _, result, _ = run_randomized(Chain(_conv(8, 8, 3, 1, 1), _conv(8, 8, 3)), "default", SHAPE)
    assert [r.reason for r in result.reports[MERGE].refusals] == [
        f"{sm.COST}: merged 1600 vs unmerged 1152 MACs per output pixel"]


# ---- one negative test per refusal reason ----

class OtherUser(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = _conv(8, 8, 3, 1, 1), _conv(8, 8, 1)

    def forward(self, x):
        y = self.a(x)
        return self.b(y) * y


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = _conv(8, 8, 3, 1, 1), _conv(8, 8, 1)

    def forward(self, x):
        return self.b(self.a(x)) + self.a(x)


class Standardized(nn.Conv2d):
    """Weight standardization: the forward normalizes W."""

    def forward(self, x):
        w = self.weight
        return self._conv_forward(x, (w - w.mean()) / w.std(), self.bias)


REFUSED = {
    chains.BORDER: lambda: Chain(_conv(8, 8, 1), _conv(8, 8, 3, 1, 1)),
    sm.COST: lambda: Chain(_conv(8, 8, 3, 1, 1), _conv(8, 2, 1), _conv(2, 8, 1)),
    chains.GROUPS_MISMATCH: lambda: Chain(_conv(8, 6, 3, 1, 1, groups=2), _conv(6, 6, 1, groups=3)),
    legality.OTHER_USERS: OtherUser,
    legality.SHARED_MODULE: Shared,
    chains.DILATION: lambda: Chain(_conv(8, 32, 3, 1, 2, 2), _conv(32, 2, 3)),
    sm.NONLINEAR: lambda: Chain(_conv(8, 8, 3, 1, 1), nn.ReLU(), _conv(8, 8, 1)),
    chains.PADDING_MODE: lambda: Chain(_conv(8, 8, 3, 1, 1, padding_mode="reflect"),
                                       _conv(8, 8, 1)),
    chains.ASYMMETRIC: lambda: Chain(_conv(8, 8, 1, bias=False), nn.ZeroPad2d((1, 0, 1, 0)),
                                 _conv(8, 8, 2)),
}


@pytest.mark.parametrize("reason", sorted(REFUSED), ids=lambda r: r[:30])
def test_refusal_is_reported(reason):
    _, result, error = run_randomized(REFUSED[reason](), "default", SHAPE)
    assert error <= 1e-5
    refusals = result.reports[MERGE].refusals
    assert any(r.reason.startswith(reason) for r in refusals), refusals
    assert reason in result.format(explain=True)
    assert _ops(result.graph_module)["Conv2d"] >= 2


def test_refusal_subclass_training_and_channels():
    class KeepStandardized(torch.fx.Tracer):
        def is_leaf_module(self, module, name):
            return isinstance(module, Standardized) or super().is_leaf_module(module, name)

    model = randomize(Chain(Standardized(8, 8, 3), _conv(8, 8, 1)), 0)
    gm = torch.fx.GraphModule(model, KeepStandardized().trace(model))
    assert [r.reason for r in sm.merge_convs(gm).report.refusals] == [legality.SUBCLASS]
    gm = torch.fx.symbolic_trace(Chain(_conv(8, 8, 3), nn.BatchNorm2d(8), _conv(8, 8, 1)).train())
    assert [r.reason for r in sm.merge_convs(gm).report.refusals] == [legality.TRAINING]
    # Never run (a conv writing 6 channels into one reading 8): traced only.
    gm = torch.fx.symbolic_trace(Chain(_conv(8, 6, 1), _conv(8, 8, 1)).eval())
    assert [r.reason for r in sm.merge_convs(gm).report.refusals] == [chains.CHANNELS]


def test_bias_pad_mismatch_is_the_border_trap():
    # Padding the intermediate with a value other than the first conv's bias stays refused.
    model = Chain(_conv(8, 8, 1), Fn(lambda y: F.pad(y, [1, 1, 1, 1], value=0.25)),
                  _conv(8, 8, 3))
    _, result, error = run_randomized(model, "default", SHAPE)
    assert error <= 1e-5
    assert [r.reason for r in result.reports[MERGE].refusals] == [chains.BORDER]


def test_nothing_to_merge_is_unchanged():
    gm = torch.fx.symbolic_trace(randomize(Chain(_conv(8, 8, 3), nn.ReLU(), _conv(8, 8, 3)), 0))
    code = gm.code
    result = run_pipeline(gm, ["merge_sequential_convs"], PassContext(input_shape=SHAPE))
    assert not result.modified and result.graph_module.code == code


# ---- the chain algebra against real convs (float64) ----

def _apply(x, conv: chains.UnpaddedConv, pads):
    pad = [side for before_after in reversed(pads) for side in before_after]
    return F.conv2d(F.pad(x, pad), conv.weight, conv.bias, conv.stride, 0, conv.dilation,
                    conv.groups)


@st.composite
def conv_pairs(draw):
    groups = draw(st.sampled_from([1, 2]))
    channels = [groups * draw(st.integers(1, 3)) for _ in range(3)]
    convs = []
    for c_in, c_out in zip(channels, channels[1:]):
        kernel = draw(st.sampled_from([(1, 1), (3, 3), (1, 3), (3, 1), (2, 2)]))
        stride = draw(st.sampled_from([(1, 1), (2, 2), (1, 2)]))
        dilation = draw(st.sampled_from([(1, 1), (2, 2), (2, 1)]))
        g = draw(st.sampled_from([1, groups]))
        weight = torch.randn(c_out, c_in // g, *kernel, dtype=torch.float64,
                             generator=torch.Generator().manual_seed(draw(st.integers(0, 999))))
        bias = torch.randn(c_out, dtype=torch.float64)
        convs.append(chains.UnpaddedConv(weight, bias, stride, dilation, g))
    return convs


@settings(max_examples=40, deadline=None)
@given(conv_pairs())
def test_chain_convs_matches_two_unpadded_convs(pair):
    first, second = pair
    x = torch.randn(2, first.weight.shape[1] * first.groups, 13, 13, dtype=torch.float64)
    try:
        merged = chains.chain_convs(first, second)
    except chains.Unmergeable as refusal:
        assert refusal.reason in (chains.DILATION, chains.GROUPS_MISMATCH)
        return
    no_pad = ((0, 0), (0, 0))
    reference = _apply(_apply(x, first, no_pad), second, no_pad)
    out = _apply(x, merged, no_pad)
    assert relative_error([reference], [out]) <= 1e-12


@st.composite
def step_chains(draw):
    """(input channels, 1 to 4 steps): convs of random geometry, affines, average pools."""
    groups = draw(st.sampled_from([1, 2, 4]))
    channels = in_channels = groups * draw(st.integers(1, 2))
    steps = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["conv", "conv", "affine", "pool"]))
        if kind == "affine":
            value = torch.ones(draw(st.sampled_from([(), (channels,)])), dtype=torch.float64)
            steps.append(chains.ChannelAffine(value, value))
        elif kind == "pool":
            steps.append(chains.AvgPool(draw(st.sampled_from([(2, 2), (3, 1)])),
                                        draw(st.sampled_from([(1, 1), (2, 2)])), None))
        else:
            g = draw(st.sampled_from([1, groups]))
            out = g * draw(st.integers(1, 3))
            kernel = draw(st.sampled_from([(1, 1), (3, 3), (1, 3), (2, 2)]))
            weight = torch.ones(out, channels // g, *kernel, dtype=torch.float64)
            steps.append(chains.UnpaddedConv(
                weight, torch.zeros(out, dtype=torch.float64),
                draw(st.sampled_from([(1, 1), (2, 2), (1, 2)])),
                draw(st.sampled_from([(1, 1), (2, 2), (2, 1)])), g))
            channels = out
    return in_channels, steps


@settings(max_examples=60, deadline=None)
@given(step_chains())
def test_chain_costs_from_shapes_equal_the_composed_conv(chain):
    """The cost rule's numbers come before composing: they must be the composed conv's."""
    channels, steps = chain
    start = chains.ComposedConv.identity(channels, 2, torch.float64)
    try:
        state = start.then_all(steps)
    except chains.Unmergeable as refusal:
        with pytest.raises(chains.Unmergeable, match=re.escape(refusal.reason)):
            chains.chain_costs(channels, 2, steps)
        return
    assert chains.chain_costs(channels, 2, steps) == (state.conv.weight.numel(), state.macs())


def test_merge_sequential_grouped_matches_per_group_convs():
    gen = torch.Generator().manual_seed(0)
    w1, b1 = torch.randn(8, 2, 3, 3, dtype=torch.float64, generator=gen), torch.randn(8).double()
    w2, b2 = torch.randn(6, 4, 3, 3, dtype=torch.float64, generator=gen), torch.randn(6).double()
    x = torch.randn(1, 4, 11, 11, dtype=torch.float64, generator=gen)
    reference = F.conv2d(F.conv2d(x, w1, b1, 2, groups=2), w2, b2, groups=2)
    weight, bias = wa.merge_sequential_grouped(w1, b1, 2, w2, b2, groups=2)
    assert weight.shape == (6, 2, 7, 7)
    out = F.conv2d(x, weight, bias, 2, groups=2)
    assert relative_error([reference], [out]) <= 1e-12
    with pytest.raises(ValueError, match="3 groups do not divide"):
        wa.merge_sequential_grouped(w1, b1, 1, w2, b2, groups=3)


def test_pad_moves_before_a_zero_bias_1x1_only():
    one = torch.ones((), dtype=torch.float64)
    start = chains.ComposedConv.identity(4, 2, torch.float32)
    conv = chains.UnpaddedConv(torch.randn(4, 4, 1, 1, dtype=torch.float64),
                               torch.zeros(4).double(), (2, 2), (1, 1), 1)
    moved = start.then_all([conv, chains.ZeroPad(((1, 0), (0, 2)))])
    assert moved.pads == ((2, 0), (0, 4))  # the 1x1's stride 2 doubles the pad
    with pytest.raises(chains.Unmergeable, match="border"):
        start.then_all([conv, chains.ChannelAffine(one, one), chains.ZeroPad(((1, 1), (1, 1)))])
