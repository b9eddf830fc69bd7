"""Parallel branch merging (passes/branch_merging.py): the train-form blocks of RepVGG, ACNet, DBB,
MobileOne, ReduceNet and layer-scale collapse to one conv through the default pipeline (numeric
and structural checks), one negative test per refusal reason, and a property test over random
multi-branch graphs (exact, idempotent, honest `modified`)."""

from __future__ import annotations

from collections import Counter

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from torch import nn

from archc.ir.init import random_input, randomize
from archc.ir.ops import op_kind
from archc.passes import branch_merging as bm
from archc.passes.pipelines import PIPELINES
from archc.rewrite import legality
from archc.rewrite import linear_chains as chains
from archc.rewrite.linear_chains import LinearReader
from archc.rewrite.pipeline import PassContext, run_pipeline
from tests.helpers import (
    TOLERANCE,
    BNAndPad,
    Fn,
    assert_default_pipeline_exact_idempotent_honest,
    run_randomized,
)

SHAPE = (2, 8, 9, 9)




def conv_bn(c_in, c_out, kernel, stride=1, padding=0, groups=1, dilation=1):
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, padding, dilation, groups,
                                   bias=False), nn.BatchNorm2d(c_out))


class RepVGG(nn.Module):
    """3x3+BN, 1x1+BN and an identity BN (stride 1, C_in = C_out), summed, then ReLU."""

    def __init__(self, c_in=8, c_out=8, stride=1, groups=1, dilation=1):
        super().__init__()
        self.dense = conv_bn(c_in, c_out, 3, stride, dilation, groups, dilation)
        self.one = conv_bn(c_in, c_out, 1, stride, 0, groups)
        self.identity = nn.BatchNorm2d(c_in) if c_in == c_out and stride == 1 else None

    def forward(self, x):
        out = self.dense(x) + self.one(x)
        if self.identity is not None:
            out = out + self.identity(x)
        return F.relu(out)


class ACNet(nn.Module):
    """Asymmetric convolution block: 3x3 + 1x3 + 3x1, each with BN."""

    def __init__(self, c=8, stride=1, dilation=1):
        super().__init__()
        d = dilation
        self.square = conv_bn(c, c, 3, stride, d, dilation=d)
        self.hor = conv_bn(c, c, (1, 3), stride, (0, d), dilation=d)
        self.ver = conv_bn(c, c, (3, 1), stride, (d, 0), dilation=d)

    def forward(self, x):
        return F.relu(self.square(x) + self.hor(x) + self.ver(x))


class DBB(nn.Module):
    """Diverse branch block with all six transformations: KxK, 1x1, 1x1 -> avg-pool, 1x1 -> KxK
    (both padding the intermediate with BNAndPad), 1xK and Kx1, each ending in a BN."""

    def __init__(self, c=8, k=3, stride=1, groups=1, dilation=1, avg=True):
        super().__init__()
        p = dilation * (k // 2)
        self.origin = conv_bn(c, c, k, stride, p, groups, dilation)
        self.one = conv_bn(c, c, 1, stride, 0, groups)
        self.avg = nn.Sequential(nn.Conv2d(c, c, 1, groups=groups, bias=False),
                                 BNAndPad(c, k // 2),  # the pool has no dilation
                                 nn.AvgPool2d(k, stride, 0), nn.BatchNorm2d(c)) if avg else None
        self.one_kxk = nn.Sequential(
            nn.Conv2d(c, c, 1, groups=groups, bias=False), BNAndPad(c, p),
            nn.Conv2d(c, c, k, stride, 0, dilation, groups, bias=False), nn.BatchNorm2d(c))
        self.hor = conv_bn(c, c, (1, k), stride, (0, p), groups, dilation)
        self.ver = conv_bn(c, c, (k, 1), stride, (p, 0), groups, dilation)

    def forward(self, x):
        out = self.origin(x) + self.one(x) + self.one_kxk(x) + self.hor(x) + self.ver(x)
        if self.avg is not None:
            out = out + self.avg(x)
        return F.relu(out)


class MobileOne(nn.Module):
    """k over-parameterized KxK conv+BN branches, a 1x1 conv+BN scale branch and an identity BN,
    accumulated as in MobileOne's forward."""

    def __init__(self, c=8, kernel=3, stride=1, groups=1, branches=4):
        super().__init__()
        self.skip = nn.BatchNorm2d(c) if stride == 1 else None
        self.scale = conv_bn(c, c, 1, stride, 0, groups) if kernel > 1 else None
        self.convs = nn.ModuleList(conv_bn(c, c, kernel, stride, kernel // 2, groups)
                                   for _ in range(branches))

    def forward(self, x):
        scale_out = 0 if self.scale is None else self.scale(x)
        identity_out = 0 if self.skip is None else self.skip(x)
        out = scale_out + identity_out
        for conv in self.convs:
            out += conv(x)
        return F.relu(out)


class ReduceNet(nn.Module):
    """`scaler * branch1(x) + branch2(x)` with linear branches; the scaler a float or a tensor."""

    def __init__(self, c=8, learnable=False):
        super().__init__()
        self.branch1, self.branch2 = conv_bn(c, c, 3, 1, 1), conv_bn(c, c, 1)
        self.scaler = nn.Parameter(torch.tensor(0.7)) if learnable else 0.3

    def forward(self, x):
        return F.relu(self.scaler * self.branch1(x) + self.branch2(x))


class LayerScale(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((c,), 0.1))

    def forward(self, x):
        return x * self.gamma.view(1, -1, 1, 1)


class LayerScaleBlock(nn.Module):
    """`x + gamma * branch(x)`, gamma per channel (a parameter [C, 1, 1] or a LayerScale)."""

    def __init__(self, c=8, module=False):
        super().__init__()
        self.branch = conv_bn(c, c, 3, 1, 1)
        self.scale = LayerScale(c) if module else None
        self.gamma = None if module else nn.Parameter(torch.linspace(0.1, 1, c).view(c, 1, 1))

    def forward(self, x):
        y = self.branch(x)
        return F.relu(x + (self.scale(y) if self.gamma is None else self.gamma * y))


class PostSumBN(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.a, self.b = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(self.bn(self.a(x) + self.b(x)))


class Concat(nn.Module):
    """R10: parallel 3x3 convs (with BN) on one input, concatenated on channels (a 1x1 would be
    embedded in 3x3 at a higher cost, which the cost rule refuses)."""

    def __init__(self, c=8):
        super().__init__()
        self.a, self.b = conv_bn(c, 4, 3, 1, 1), conv_bn(c, 6, 3, 1, 1)
        self.c = nn.Conv2d(c, 2, 3, padding="same")

    def forward(self, x):
        return F.relu(torch.cat([self.a(x), self.b(x), self.c(x)], dim=1))


class RepeatedConcat(nn.Module):
    """One branch tensor twice in a cat: `cat(y, b(x), y)`."""

    def __init__(self, c=8):
        super().__init__()
        self.a, self.b = conv_bn(c, 4, 3, 1, 1), nn.Conv2d(c, 2, 3, padding=1)

    def forward(self, x):
        y = self.a(x)
        return torch.cat([y, self.b(x), y], dim=-3)


class SignedSum(nn.Module):
    """`a - torch.add(b, x, alpha=0.5)` and `sum([...])`: subtraction, alpha, builtin sum."""

    def __init__(self, c=8):
        super().__init__()
        self.a, self.b, self.c = (nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 1),
                                  nn.Conv2d(c, c, 3, padding=1))

    def forward(self, x):
        y = self.a(x) - torch.add(self.b(x), x, alpha=0.5)
        return F.relu(sum([y, self.c(x), x.mul(2.0)]))


class Stack(nn.Sequential):
    """Blocks applied in order."""


BLOCKS = {
    "repvgg": (RepVGG, SHAPE),
    "repvgg_stride2_widen": (lambda: RepVGG(8, 16, stride=2), SHAPE),
    "repvgg_grouped": (lambda: RepVGG(groups=4), SHAPE),
    "repvgg_dilated": (lambda: RepVGG(dilation=2), SHAPE),
    "acnet": (ACNet, SHAPE),
    "acnet_stride2_dilated": (lambda: ACNet(stride=2, dilation=2), SHAPE),
    "dbb": (DBB, SHAPE),
    "dbb_5x5_stride2_grouped": (lambda: DBB(k=5, stride=2, groups=2), SHAPE),
    "dbb_dilated_no_avg": (lambda: DBB(dilation=2, avg=False), SHAPE),
    "mobileone": (MobileOne, SHAPE),
    "mobileone_depthwise": (lambda: MobileOne(groups=8), SHAPE),
    "mobileone_pointwise": (lambda: MobileOne(kernel=1), SHAPE),
    "mobileone_stride2": (lambda: MobileOne(stride=2, groups=8), SHAPE),
    "reducenet": (ReduceNet, SHAPE),
    "reducenet_learnable": (lambda: ReduceNet(learnable=True), SHAPE),
    "layer_scale_parameter": (LayerScaleBlock, SHAPE),
    "layer_scale_module": (lambda: LayerScaleBlock(module=True), SHAPE),
    "post_sum_bn": (PostSumBN, SHAPE),
    "concat": (Concat, SHAPE),
    "concat_repeated": (RepeatedConcat, SHAPE),
    "signed_sum": (SignedSum, SHAPE),
    "repvgg_stack": (lambda: Stack(RepVGG(), RepVGG(8, 16, 2), DBB(16), MobileOne(16)), SHAPE),
}


def _ops(gm) -> Counter:
    return Counter(op_kind(gm, n) for n in gm.graph.nodes if n.op not in ("placeholder", "output"))


def _reasons(result) -> list[str]:
    return [refusal.reason for report in result.reports for refusal in report.refusals]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_block_collapses_to_one_conv(name, dtype):
    build, shape = BLOCKS[name]
    model, result, error = run_randomized(build(), "default", shape, dtype)
    assert error <= TOLERANCE[dtype]
    assert result.max_error <= TOLERANCE[dtype]
    ops = _ops(result.graph_module)
    blocks = len(model) if isinstance(model, Stack) else 1
    assert ops["Conv2d"] == blocks, ops
    assert not {op for op in ops if op.startswith("BatchNorm")}
    assert not {"add", "sub", "mul", "cat", "pad", "AvgPool2d"} & set(ops), ops
    assert all(p.dtype == dtype for p in result.graph_module.parameters())


def test_report_states_the_merge_and_the_cost_decision():
    _, result, _ = run_randomized(RepVGG(groups=4), "default", SHAPE)
    merge = result.reports[PIPELINES["default"].index("merge_parallel_branches")]
    assert merge.rewrites == [
        "merged 3 branches (dense.0, one.0, identity) of x into merged (3x3 s1 p1 d1 g4; "
        "merged 144 vs unmerged 184 MACs per output pixel)"]
    _, result, _ = run_randomized(nn.Sequential(MobileOne(groups=8)), "default", SHAPE)
    assert "0.merged" in dict(result.graph_module.named_modules())


def test_partial_merge_keeps_the_other_operands():
    class Partial(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
            self.c = nn.Conv2d(8, 8, 1)

        def forward(self, x):
            return self.a(x) + F.relu(self.c(x)) + self.b(x)

    _, result, error = run_randomized(Partial(), "default", SHAPE)
    assert error <= 1e-5
    ops = _ops(result.graph_module)
    assert ops["Conv2d"] == 2 and ops["add"] == 1
    assert any(r.startswith(bm.NONLINEAR) for r in _reasons(result))


def test_dilated_dbb_keeps_only_its_avg_pool_branch_apart():
    # avg-pool taps are 1 apart, the dilated 3x3's 2 apart: the other five branches still merge
    _, result, error = run_randomized(DBB(dilation=2), "default", SHAPE)
    assert error <= 1e-5
    ops = _ops(result.graph_module)
    assert ops["Conv2d"] == 2 and ops["AvgPool2d"] == 1, ops  # merged + the avg branch's 1x1
    merge = result.reports[PIPELINES["default"].index("merge_parallel_branches")]
    assert len(merge.rewrites) == 1 and merge.rewrites[0].startswith("merged 5 branches")
    assert [r.reason for r in merge.refusals] == [bm.DILATION_MISMATCH]


def test_nested_sums_merge_through_a_bn():
    class Nested(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
            self.bn, self.c = nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            inner = self.a(x) + self.b(x)
            return self.bn(inner) + self.c(x) + inner

    _, result, error = run_randomized(Nested(), "default", SHAPE)
    assert error <= 1e-5
    assert _ops(result.graph_module) == Counter({"Conv2d": 1})


# ---- one negative test per refusal reason ----

class Sum(nn.Module):
    """`Σ branch_i(x)` over the given branches (modules or functions of x)."""

    def __init__(self, *branches):
        super().__init__()
        self.branches = nn.ModuleList(b if isinstance(b, nn.Module) else Fn(b) for b in branches)

    def forward(self, x):
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return out


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)

    def forward(self, x, y):
        return self.a(x) + self.b(y)


class OtherUser(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = self.a(x)
        return (y + self.b(x)) * y


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return self.a(x) + self.b(x) + self.a(F.relu(x))


def _conv(*args, **kwargs):
    return nn.Conv2d(*args, **kwargs)


REFUSED = {
    # 1x1 stride 2 and 3x3 stride 1 both map 4x4 to 2x2
    bm.STRIDE_MISMATCH: (lambda: Sum(_conv(8, 8, 1, stride=2), _conv(8, 8, 3)), (2, 8, 4, 4)),
    bm.DILATION_MISMATCH: (lambda: Sum(_conv(8, 8, 3, padding=1), _conv(8, 8, 3, padding=2,
                                                                         dilation=2)), SHAPE),
    # a 2x2 kernel has no centre in a 3x3 one
    bm.KERNEL_PARITY: (lambda: Sum(_conv(8, 8, 3, padding=1),
                                   nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), _conv(8, 8, 2))),
                       SHAPE),
    bm.GROUPS_MISMATCH: (lambda: Sum(_conv(8, 8, 3, padding=1, groups=8), _conv(8, 8, 1)), SHAPE),
    bm.MERGE_COST: (lambda: Sum(_conv(8, 8, (1, 3), padding=(0, 1)),
                                _conv(8, 8, (3, 1), padding=(1, 0))), SHAPE),
    bm.NONLINEAR: (lambda: Sum(_conv(8, 8, 3, padding=1),
                               nn.Sequential(_conv(8, 8, 1), nn.ReLU(), _conv(8, 8, 1))), SHAPE),
    legality.OTHER_USERS: (OtherUser, SHAPE),
    legality.SHARED_MODULE: (SharedConv, SHAPE),
    chains.AVG_POOL: (lambda: Sum(_conv(8, 8, 3, padding=1),
                              nn.AvgPool2d(3, 1, 1, count_include_pad=False)), SHAPE),
    bm.BROADCAST: (lambda: Sum(_conv(8, 8, 3, padding=1), _conv(8, 1, 1)), SHAPE),
    chains.BORDER: (lambda: Sum(_conv(8, 8, 3, padding=1), _conv(8, 8, 1),
                            nn.Sequential(_conv(8, 8, 1), _conv(8, 8, 3, padding=1))), SHAPE),
}


@pytest.mark.parametrize("reason", sorted(REFUSED), ids=lambda r: r[:30])
def test_refusal_is_reported(reason):
    build, shape = REFUSED[reason]
    _assert_refused(*run_randomized(build(), "default", shape)[1:], reason)


def _assert_refused(result, error, reason):
    assert error <= 1e-5
    merge = result.reports[PIPELINES["default"].index("merge_parallel_branches")]
    assert any(r.reason.startswith(reason) for r in merge.refusals), merge.refusals
    assert reason in result.format(explain=True)


def test_refusal_different_inputs():
    inputs = tuple(random_input(SHAPE, seed) for seed in (5, 6))
    result = run_randomized(TwoInputs(), "default", SHAPE, inputs=inputs)
    _assert_refused(*result[1:], bm.DIFFERENT_INPUTS)


def test_refusal_ceil_mode_avg_pool():
    model = Sum(_conv(8, 8, 3, stride=2, padding=1), nn.AvgPool2d(3, 2, 1, ceil_mode=True))
    _assert_refused(*run_randomized(model, "default", SHAPE)[1:], chains.AVG_POOL)


def test_refusal_padding_not_aligned_and_identity_mismatch():
    # Shapes that cannot run (the sum would fail): traced only, refused from the module shapes.
    cases = [
        (bm.PADDING_NOT_ALIGNED, Sum(_conv(8, 8, 3, padding=1), _conv(8, 8, 1, padding=1))),
        (bm.IDENTITY_MISMATCH, Sum(_conv(8, 16, 3, padding=1), lambda x: x)),  # channels
        (bm.IDENTITY_MISMATCH, Sum(_conv(8, 8, 3, 2, padding=1), lambda x: x)),  # stride
    ]
    for reason, model in cases:
        gm = torch.fx.symbolic_trace(randomize(model, 0))
        result = bm.merge_branches(gm)
        assert not result.modified
        assert [r.reason for r in result.report.refusals] == [reason]


def test_refusal_training_bn_and_unknown_shapes():
    gm = torch.fx.symbolic_trace(Sum(_conv(8, 8, 3, padding=1), nn.BatchNorm2d(8)).train())
    result = bm.merge_branches(gm)
    assert [r.reason for r in result.report.refusals] == [legality.TRAINING]
    gm = torch.fx.symbolic_trace(Sum(lambda x: x, nn.BatchNorm2d(8)).eval())
    result = bm.merge_branches(gm)
    assert [r.reason for r in result.report.refusals] == [legality.SHAPES_UNKNOWN]


def test_nothing_to_merge_is_unchanged():
    model = randomize(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()), 0)
    gm = torch.fx.symbolic_trace(model)
    code = gm.code
    result = run_pipeline(gm, ["merge_parallel_branches"], PassContext(input_shape=SHAPE))
    assert not result.modified and result.graph_module.code == code


# ---- property: random multi-branch graphs through the default pipeline ----

def _kernel_padding(kernel, dilation):
    kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
    return kernel, tuple(dilation * (k - 1) // 2 for k in kernel)


@st.composite
def branch_blocks(draw, channels):
    """One sum block of random linear branches on x, as (module, out channels)."""
    stride, dilation = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 1, 2]))
    groups = draw(st.sampled_from([1, 2, channels]))
    kinds = draw(st.lists(st.sampled_from(["conv", "conv", "conv_bn", "identity", "bn_identity",
                                           "avg", "scaled", "dbb", "nonlinear", "avg_exclude"]),
                          min_size=1, max_size=4))
    keeps_channels = stride == 1 and any(k in ("identity", "bn_identity") for k in kinds)
    out = channels if keeps_channels or any("avg" in k for k in kinds) else draw(
        st.sampled_from([channels, 2 * channels]))
    branches: list[nn.Module] = []
    for kind in kinds:
        kernel = draw(st.sampled_from([1, 3, 5, (1, 3), (3, 1)]))
        kernel, padding = _kernel_padding(kernel, dilation)
        g = draw(st.sampled_from([1, groups]))
        if kind in ("identity", "bn_identity") and stride == 1 and out == channels:
            branches.append(Fn(lambda x: x) if kind == "identity" else nn.BatchNorm2d(channels))
        elif kind in ("avg", "avg_exclude") and out == channels:
            branches.append(nn.AvgPool2d(3, stride, 1, count_include_pad=kind == "avg"))
        elif kind == "scaled":
            scale = draw(st.sampled_from([-0.5, 2.0]))
            conv = nn.Conv2d(channels, out, kernel, stride, padding, dilation, g)
            branches.append(nn.Sequential(conv, Fn(lambda y, s=scale: s * y)))
        elif kind == "dbb" and kernel == (3, 3):
            branches.append(nn.Sequential(
                nn.Conv2d(channels, out, 1, bias=False), BNAndPad(out, padding[0]),
                nn.Conv2d(out, out, 3, stride, 0, dilation), nn.BatchNorm2d(out)))
        elif kind == "nonlinear":
            branches.append(nn.Sequential(nn.Conv2d(channels, out, 1), nn.ReLU(),
                                          nn.Conv2d(out, out, kernel, stride, padding, dilation)))
        else:
            conv = nn.Conv2d(channels, out, kernel, stride, padding, dilation, g,
                             bias=draw(st.booleans()))
            branches.append(nn.Sequential(conv, nn.BatchNorm2d(out)) if kind == "conv_bn"
                            else conv)
    if not branches:
        branches.append(nn.Conv2d(channels, out, 3, stride, dilation, dilation))
    block = Sum(*branches)
    if draw(st.booleans()):
        block = nn.Sequential(block, nn.BatchNorm2d(out))
    return block, out


@st.composite
def networks(draw):
    channels = draw(st.sampled_from([4, 8]))
    shape = (2, channels, 11, 11)
    layers: list[nn.Module] = []
    for _ in range(draw(st.integers(1, 3))):
        block, channels = draw(branch_blocks(channels))
        layers += [block, nn.ReLU()] if draw(st.booleans()) else [block]
    return Stack(*layers), shape


@settings(max_examples=40, deadline=None)
@given(networks(), st.integers(0, 2**16))
def test_default_pipeline_is_exact_idempotent_and_honest(network, seed):
    model, shape = network
    model = randomize(model, seed)
    assert_default_pipeline_exact_idempotent_honest(model, shape, seed)


def test_sum_tree_reads_alpha_subtraction_and_constant_operands():
    gm = torch.fx.symbolic_trace(SignedSum())
    analysis = LinearReader(gm)
    node = {n.name: n for n in gm.graph.nodes}
    assert bm._sum_operands(analysis, node["add"]) == [(node["b"], 1.0), (node["x"], 0.5)]
    assert bm._sum_operands(analysis, node["sub"]) == [(node["a"], 1.0), (node["add"], -1.0)]
    assert bm._sum_operands(analysis, node["add_1"]) is None  # 0 + sub: a bias, not a branch
    adds, leaves = bm._sum_tree(analysis, node["sub"])
    assert adds == [node["sub"], node["add"]]
    assert leaves == {node["a"]: 1.0, node["b"]: -1.0, node["x"]: -0.5}
    _, result, error = run_randomized(SignedSum(), "merge_parallel_branches", SHAPE)
    assert error <= 1e-5 and _ops(result.graph_module) == Counter({"Conv2d": 1, "relu": 1})
