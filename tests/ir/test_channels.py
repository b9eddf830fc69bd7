"""Channel-dependency analysis (archc/ir/channels.py) on hand-built graphs and on RegNetY-200MF:
ties, producers/consumers, concat and split segments, grouped convs, SE, flatten -> Linear and
every reason a group is fixed."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

import archc
from archc.frontend.blocks.layers import channel_shuffle
from archc.ir import channels
from archc.ir.channels import analyze_channels, channel_groups
from archc.ir.shuffles import find_shuffles

X = (torch.randn(2, 3, 8, 8),)




def _graph(model: nn.Module, inputs=X):
    gm = torch.fx.symbolic_trace(model.eval())
    return gm, analyze_channels(gm, inputs)


def _group(gm, graph, target: str):
    """The group of the output of the node computing module `target` (or named `target`)."""
    node = next(n for n in gm.graph.nodes if n.target == target or n.name == target)
    return graph.of(node)


def _input_group(gm, graph, target: str):
    node = next(n for n in gm.graph.nodes if n.target == target)
    return graph.of(node.args[0])


def _names(nodes) -> list[str]:
    return [str(n.target) if n.op == "call_module" else n.name for n in nodes]


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.bn = nn.Conv2d(3, 20, 3, padding=1), nn.BatchNorm2d(20)
        self.b, self.proj = nn.Conv2d(20, 20, 3, padding=1), nn.Conv2d(3, 20, 1)
        self.c = nn.Conv2d(20, 4, 1)

    def forward(self, x):
        return self.c(F.relu(self.b(F.relu(self.bn(self.a(x)))) + self.proj(x)))


def test_residual_add_ties_both_branches():
    gm, graph = _graph(Residual())
    sum_group = _group(gm, graph, "b")
    assert sum_group is _group(gm, graph, "proj") is _input_group(gm, graph, "c")
    assert _names(sum_group.producers) == ["b", "proj"]
    assert _names(sum_group.consumers) == ["c"]
    inner = _group(gm, graph, "a")
    assert inner is _group(gm, graph, "bn") is _input_group(gm, graph, "b")
    assert _names(inner.channelwise) == ["bn"] and inner.size == 20 and not inner.fixed
    assert _input_group(gm, graph, "a") is _input_group(gm, graph, "proj")
    assert _input_group(gm, graph, "a").fixed == channels.MODEL_INPUT
    assert _group(gm, graph, "c").fixed == channels.MODEL_OUTPUT
    assert graph.groups == channel_groups(gm, X)
    assert "producers b, proj" in str(sum_group)


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 20, 1), nn.Conv2d(3, 12, 1)
        self.c = nn.Conv2d(32, 8, 1)

    def forward(self, x):
        return self.c(torch.cat([self.a(x), F.relu(self.b(x))], 1))


def test_concat_is_a_composite_of_its_inputs():
    gm, graph = _graph(Concat())
    whole = _input_group(gm, graph, "c")
    a, b = _group(gm, graph, "a"), _group(gm, graph, "b")
    assert whole.size == 32 and whole.producers == ()
    assert whole.parts == (channels.Part(a.index, 0, 20), channels.Part(b.index, 20, 12))
    assert graph.leaves(whole) == [a, b]
    assert _names(whole.consumers) == ["c"] and a.consumers == ()


class Split(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 1)
        self.a, self.b, self.c = nn.Conv2d(20, 4, 1), nn.Conv2d(12, 4, 1), nn.Conv2d(20, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        a, b = y.split([20, 12], 1)
        return self.a(a) + self.b(b) + self.c(y[:, :20])


def test_split_and_slice_cut_their_input():
    gm, graph = _graph(Split())
    whole = _group(gm, graph, "conv")
    a, b = _input_group(gm, graph, "a"), _input_group(gm, graph, "b")
    assert [(p.group, p.offset, p.size) for p in whole.parts] == [(a.index, 0, 20),
                                                                  (b.index, 20, 12)]
    assert _input_group(gm, graph, "c") is a  # same boundaries: the slice is the split's piece
    assert sorted(n.name for n in graph.cuts) == ["getitem_2", "split"]
    assert not whole.fixed and not a.fixed


class CatThenSplit(nn.Module):
    def __init__(self, sizes):
        super().__init__()
        self.sizes = sizes
        self.a, self.b = nn.Conv2d(3, 20, 1), nn.Conv2d(3, 12, 1)
        self.c, self.d = nn.Conv2d(sizes[0], 4, 1), nn.Conv2d(sizes[1], 4, 1)

    def forward(self, x):
        p, q = torch.split(torch.cat([self.a(x), self.b(x)], 1), self.sizes, dim=1)
        return self.c(p) + self.d(q)


def test_equal_boundaries_identify_pieces():
    gm, graph = _graph(CatThenSplit([20, 12]))
    assert _input_group(gm, graph, "c") is _group(gm, graph, "a")
    assert _input_group(gm, graph, "d") is _group(gm, graph, "b")


def test_different_boundaries_conflict():
    gm, graph = _graph(CatThenSplit([16, 16]))
    for group in (_group(gm, graph, "a"), _input_group(gm, graph, "c"),
                  graph.groups[graph.cuts[next(iter(graph.cuts))]]):
        assert group.fixed == channels.SEGMENT_CONFLICT


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 36, 1)
        self.b = nn.Conv2d(36, 24, 3, padding=1, groups=3)
        self.c = nn.Conv2d(36, 36, 1, groups=2)
        self.dw = nn.Conv2d(24, 24, 3, padding=1, groups=24)
        self.head = nn.Conv2d(60, 5, 1)

    def forward(self, x):
        y = self.a(x)
        return self.head(torch.cat([self.dw(self.b(y)), self.c(y)], 1))


def test_grouped_convs_constrain_segments_and_depthwise_ties():
    gm, graph = _graph(Grouped())
    y = _group(gm, graph, "a")
    assert y.groups == (2, 3) and y.divisor == 6
    b = _group(gm, graph, "b")
    assert b is _group(gm, graph, "dw") and b.groups == (3,)
    assert _names(b.channelwise) == ["dw"] and _names(b.producers) == ["b"]
    assert _group(gm, graph, "c").groups == (2,)


class GroupedOnConcat(nn.Module):
    def __init__(self, a=8, b=16):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, a, 1), nn.Conv2d(3, b, 1)
        self.c = nn.Conv2d(a + b, 8, 1, groups=2)

    def forward(self, x):
        return self.c(torch.cat([self.a(x), self.b(x)], 1))


def test_grouped_conv_on_a_composite_is_fixed():
    """cat([8, 16]) read by 2 groups of 12: the second group reads a and part of b."""
    gm, graph = _graph(GroupedOnConcat())
    assert _input_group(gm, graph, "c").fixed == channels.GROUPED_PARTS
    assert _group(gm, graph, "a").fixed == channels.GROUPED_PARTS  # parts follow the whole


def test_grouped_conv_whose_groups_read_whole_parts_ties_them():
    """cat([12, 12]) read by 2 groups of 12: each group reads one part; the parts are tied (the
    same channels go from each), so every conv group keeps as many."""
    gm, graph = _graph(GroupedOnConcat(12, 12))
    whole = _input_group(gm, graph, "c")
    assert not whole.fixed and [p.group for p in whole.parts] == [_group(gm, graph, "a").index] * 2
    assert _group(gm, graph, "a") is _group(gm, graph, "b")


class SE(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 20, 3, padding=1)
        self.reduce, self.expand = nn.Conv2d(20, 5, 1), nn.Conv2d(5, 20, 1)
        self.fc = nn.Linear(20, 7)

    def forward(self, x):
        y = self.conv(x)
        y = y * torch.sigmoid(self.expand(F.relu(self.reduce(F.adaptive_avg_pool2d(y, 1)))))
        return self.fc(torch.flatten(y.mean((2, 3), keepdim=True), 1))


def test_se_gate_and_flatten_to_linear_tie():
    gm, graph = _graph(SE())
    y = _group(gm, graph, "conv")
    assert _names(y.producers) == ["conv", "expand"]
    assert _names(y.consumers) == ["reduce", "fc"]
    hidden = _group(gm, graph, "reduce")
    assert hidden.size == 5 and _names(hidden.consumers) == ["expand"]
    assert _group(gm, graph, "fc").fixed == channels.MODEL_OUTPUT


class Opaque(nn.Module):
    """Every fixing rule but the input/output ones, each on its own 20-channel conv output."""

    KEYS = ("moves", "shuffle", "size", "view", "softmax", "shared")

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleDict({k: nn.Conv2d(3, 20, 1) for k in (*self.KEYS, "flat")})
        self.heads = nn.ModuleDict({k: nn.Conv2d(20, 4, 1) for k in self.KEYS})

    def forward(self, x):
        c, n = self.convs, x.size(0)
        z = c["size"](x)
        ys = {"moves": c["moves"](x).flatten(2).transpose(1, 2).reshape(n, -1, 8, 8),
              "shuffle": c["shuffle"](x).view(2, 2, 10, 8, 8).transpose(1, 2).reshape(2, 20, 8, 8),
              "size": z / z.size(1),
              "view": c["view"](x).view(n, n * 10, -1).view(n, -1, 8, 8),
              "softmax": torch.softmax(c["softmax"](x), 1),
              "shared": c["shared"](x) + c["shared"](2 * x)}
        out = sum(self.heads[k](ys[k]) for k in self.KEYS)
        return out, c["flat"](x).flatten(1)


def test_fixing_reasons():
    gm, graph = _graph(Opaque())
    reasons = {key: _group(gm, graph, f"convs.{key}").fixed
               for key in ("moves", "shuffle", "size", "view", "softmax", "flat")}
    assert reasons["moves"] == channels.MOVES_CHANNELS
    assert reasons["shuffle"] == channels.SHUFFLE_SIZES  # a shuffle with literal sizes
    assert reasons["size"] == channels.SIZE_READ
    assert reasons["view"] == channels.SIZE_READ  # view(n, n * 10, -1) computes the count
    assert reasons["softmax"].startswith(channels.UNSUPPORTED)
    assert "softmax" in reasons["softmax"]
    assert reasons["flat"] == channels.MOVES_CHANNELS  # [N, 20, 8, 8] -> [N, 1280]
    shared = next(n for n in gm.graph.nodes if n.target == "convs.shared")
    assert graph.of(shared).fixed == channels.SHARED_MODULE


def test_every_channel_tensor_has_a_group():
    """All but the inner nodes of a shuffle (their dim 1 is not a channel dim)."""
    gm, graph = _graph(Opaque())
    inner = {n for shuffle in find_shuffles(gm).values() for n in shuffle.nodes[:-1]}
    assert inner
    for node in gm.graph.nodes:
        shape = node.meta.get("tensor_meta")
        if node.op != "output" and hasattr(shape, "shape") and len(shape.shape) >= 2 \
                and node not in inner:
            assert graph.of(node).size == shape.shape[graph.dim(node)]


def test_regnety_groups():
    gm = archc.build("specs/regnety_200mf.yaml")
    graph = analyze_channels(gm, (torch.randn(1, 3, 32, 32),))
    fixed = [g for g in graph.groups if g.fixed]
    assert [g.fixed for g in fixed] == [channels.MODEL_INPUT, channels.MODEL_OUTPUT]
    assert not any(g.parts for g in graph.groups)
    for node in gm.graph.nodes:
        if node.op != "call_module" or not node.target.endswith("f.b.conv"):
            continue
        block = node.target[: -len("b.conv")]
        conv = gm.get_submodule(node.target)
        inner = graph.of(node)
        assert inner.groups == (conv.groups,) and inner.size == conv.out_channels
        assert _names(inner.producers) == [f"{block}b.conv", f"{block}se.expand"]
        assert _names(inner.consumers) == [f"{block}se.reduce", f"{block}c.conv"]
        assert graph.of(node.args[0]).groups == (conv.groups,)
    last = _input_group(gm, graph, "head.fc")
    assert last.size == 368 and "s4.b1.f.c.conv" in _names(last.producers)
    assert len({graph.index[n] for n in gm.graph.nodes if n.target == "s4.b1.f.c.conv"}) == 1


class Shuffles(nn.Module):
    """Three spellings of a shuffle, each between two convs."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 20, 1), nn.Conv2d(3, 20, 1), nn.Conv2d(3, 24, 1)
        self.shuffle = nn.ChannelShuffle(2)
        self.head_a, self.head_b = nn.Conv2d(20, 4, 1), nn.Conv2d(20, 4, 1)
        self.head_c = nn.Conv2d(24, 4, 1)

    def forward(self, x):
        return (self.head_a(torch.channel_shuffle(self.a(x), 2))
                + self.head_b(self.shuffle(self.b(x))) + self.head_c(channel_shuffle(self.c(x), 3)))


def test_shuffle_input_is_a_lockstep_group_and_its_output_interleaves_it():
    gm, graph = _graph(Shuffles())
    for conv, g in (("a", 2), ("b", 2), ("c", 3)):
        source, shuffled = _group(gm, graph, conv), _input_group(gm, graph, f"head_{conv}")
        m = source.size // g
        lockstep = {p.group for p in source.parts}
        assert len(lockstep) == 1 and [p.offset for p in source.parts] == [i * m for i in range(g)]
        assert [(p.group, p.offset, p.stride, p.size) for p in shuffled.parts] == [
            (*lockstep, i, g, m) for i in range(g)]
        assert not source.fixed and not shuffled.fixed and not graph.groups[lockstep.pop()].fixed
    # archc's own spelling reads x.size() and channels // groups: part of the shuffle
    assert not any(g.fixed == channels.SIZE_READ for g in graph.groups)


class ShuffleThenChunk(nn.Module):
    """ShuffleNetV2's pattern: cat, shuffle, chunk in halves, one half through a conv."""

    def __init__(self, width: int):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, width, 1), nn.Conv2d(3, width, 1)
        self.c, self.head = nn.Conv2d(width, width, 1), nn.Conv2d(2 * width, 4, 1)

    def forward(self, x):
        y = channel_shuffle(torch.cat([self.a(x), self.b(x)], 1), 2)
        left, right = y.chunk(2, dim=1)
        return self.head(torch.cat([left, self.c(right)], 1))


def test_a_cut_of_an_interleave_splits_the_lockstep_group():
    for width in (6, 5):  # the halves cut the interleave at 6 (even) and 5 (odd)
        gm, graph = _graph(ShuffleThenChunk(width))
        q = _group(gm, graph, "a")
        assert q is _group(gm, graph, "b") and not q.fixed  # the cat's halves: one group
        last_cat = [n for n in gm.graph.nodes if n.target is torch.cat][-1]
        left = graph.of(last_cat.args[0][0])
        right = _input_group(gm, graph, "c")
        # left = channels 0..width-1 of the interleave of q: q's first ceil(width / 2) channels
        # in segment 0 and first floor(width / 2) in segment 1
        assert sorted(c for p in left.parts for c in p.positions()) == list(range(width))
        assert sum(p.size for p in left.parts) == width == sum(p.size for p in right.parts)
        assert not left.fixed and not right.fixed


class GroupsInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 20, 1), nn.Conv2d(20, 4, 1)

    def forward(self, x, groups):
        return self.b(torch.channel_shuffle(self.a(x), groups))


class TwoShuffles(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 12, 1), nn.Conv2d(3, 12, 1), nn.Conv2d(12, 4, 1)

    def forward(self, x):
        return self.c(channel_shuffle(self.a(x), 2) + channel_shuffle(self.b(x), 3))


def test_shuffle_refusals():
    gm = torch.fx.symbolic_trace(GroupsInput().eval())
    graph = analyze_channels(gm, (X[0], 2))
    assert _group(gm, graph, "a").fixed == channels.SHUFFLE_GROUPS
    assert _input_group(gm, graph, "b").fixed == channels.SHUFFLE_GROUPS
    # two interleaves of one group that differ: shuffles of 2 and of 3 groups added
    gm, graph = _graph(TwoShuffles())
    added = graph.of(next(n for n in gm.graph.nodes if n.target is operator.add))
    assert added.fixed == channels.SEGMENT_CONFLICT
    assert all(leaf.fixed == channels.SEGMENT_CONFLICT
               for conv in ("a", "b") for leaf in graph.leaves(_group(gm, graph, conv)))
    # a shuffle between the grouped 1x1 convs of ShuffleNetV1: the grouped conv reads a composite
    gm = archc.build("specs/shufflenet_v1_g3.yaml")
    graph = analyze_channels(gm, (torch.randn(1, 3, 32, 32),))
    node = next(n for n in gm.graph.nodes if n.target == "s1.b2.c.conv")
    assert graph.of(node.args[0]).fixed == channels.GROUPED_PARTS


class Constants(nn.Module):
    """Per-channel constants: a layer scale and a shift (read per channel: channelwise members),
    one read twice (fixed) and a per-pixel one (a position embedding: a channelwise member)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)
        self.d, self.e = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)
        self.f, self.g = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)
        self.gamma = nn.Parameter(torch.rand(8, 1, 1))
        self.register_buffer("beta", torch.rand(1, 8, 1, 1))
        self.shared = nn.Parameter(torch.rand(8, 1, 1))
        self.pos = nn.Parameter(torch.rand(8, 8, 8))

    def forward(self, x):
        y = self.b(self.a(x) * self.gamma + self.beta)
        z = self.e(self.d(x) * self.shared + self.shared)
        w = self.g(self.f(x) + self.pos)
        return y + z + w


def test_per_channel_constants_are_channelwise_members():
    gm, graph = _graph(Constants())
    scaled = _group(gm, graph, "a")
    assert not scaled.fixed
    reads = [read for node in scaled.channelwise for read in graph.constants.get(node, ())]
    assert sorted(reads) == [("beta", 1, "shift"), ("gamma", 0, "scale")]
    assert _group(gm, graph, "d").fixed == (  # read twice
        f"{channels.UNSUPPORTED}: per-channel operand of a lower rank (mul at mul_1)")
    embedded = _group(gm, graph, "f")
    assert not embedded.fixed
    assert [read for node in embedded.channelwise for read in graph.constants.get(node, ())] \
        == [("pos", 0, "shift")]
