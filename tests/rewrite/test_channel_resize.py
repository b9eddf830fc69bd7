"""The channel-resizing routine (archc/rewrite/channel_resize.py): its pure tensor functions against
the unrewritten computation in float64, every member handler on removal (of dead channels) and
padding (with zero channels), both at once on random maps, and the graph edits it records."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from archc.ir.channels import analyze_channels
from archc.ir.graph_edits import apply_edits, edits_of
from archc.rewrite.channel_resize import (
    NEW,
    ResizeError,
    composite_source,
    cut_bounds,
    gather,
    resize_channels,
    resize_weight,
    resized_groups,
)

TIGHT = {"rtol": 1e-12, "atol": 1e-12}


def _source(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


# ---- pure functions ----

def test_gather_removes_and_pads_along_a_dim():
    t = torch.arange(12, dtype=torch.float64).reshape(3, 4)
    torch.testing.assert_close(gather(t, _source([0, 2]), 0), t[[0, 2]])
    padded = gather(t, _source([0, NEW, 1, 2, NEW]), 0, fill=1.0)
    torch.testing.assert_close(padded[[0, 2, 3]], t)
    assert (padded[[1, 4]] == 1).all()
    torch.testing.assert_close(gather(t, _source([3, NEW, 1]), 1),
                               torch.stack([t[:, 3], torch.zeros(3, dtype=t.dtype), t[:, 1]], 1))


@pytest.mark.parametrize("groups", [1, 3])
def test_padded_weight_matches_the_unpadded_conv(groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(12, 6, 3, padding=1, groups=groups).double()
    x = torch.randn(2, 12, 5, 5, dtype=torch.double)
    c, o = 12 // groups, 6 // groups  # per group: c -> c + 4 inputs, o -> o + 1 outputs
    c_new, o_new = groups * (c + 4), groups * (o + 1)
    segments = torch.arange(groups)[:, None]
    in_index = (segments * (c + 4) + torch.arange(c)).flatten()
    out_index = (segments * (o + 1) + torch.arange(o)).flatten()
    in_source = torch.full((c_new,), NEW).index_put_((in_index,), torch.arange(12))
    out_source = torch.full((o_new,), NEW).index_put_((out_index,), torch.arange(6))
    assert resized_groups(groups, 12, 6, out_source) == groups
    weight = resize_weight(conv.weight, out_source, in_source, groups, groups)
    padded_x = torch.full((2, c_new, 5, 5), 7.0, dtype=torch.double)  # padding is never read
    padded_x[:, in_index] = x
    y = F.conv2d(padded_x, weight, None, 1, 1, 1, groups)
    torch.testing.assert_close(y[:, out_index], F.conv2d(x, conv.weight, None, 1, 1, 1, groups),
                               **TIGHT)
    assert y[:, [i for i in range(o_new) if i not in out_index]].abs().max() == 0


@pytest.mark.parametrize("groups, out_keep, in_keep, new_groups", [
    (1, [0, 3, 4], [1, 2, 5], 1),  # dense
    (3, [0, 2, 4], [1, 2, 5], 3),  # grouped, each group its own channels
    (3, [0, 1, 4, 5], [0, 1, 4, 5], 2),  # grouped, the middle group removed
    (6, [1, 2, 5], [1, 2, 5], 3),  # depthwise
])
def test_removed_weight_reads_the_kept_inputs_exactly(groups, out_keep, in_keep, new_groups):
    torch.manual_seed(1)
    conv = nn.Conv2d(6, 6, 3, padding=1, groups=groups).double()
    x = torch.randn(2, 6, 5, 5, dtype=torch.double)
    x[:, [i for i in range(6) if i not in in_keep]] = 0  # removed inputs are dead
    out_source, in_source = _source(out_keep), _source(in_keep)
    assert resized_groups(groups, 6, 6, out_source) == new_groups
    weight = resize_weight(conv.weight, out_source, in_source, groups, new_groups)
    y = F.conv2d(x[:, in_source], weight, conv.bias[out_source], 1, 1, 1, new_groups)
    torch.testing.assert_close(y, conv(x)[:, out_source], **TIGHT)


def test_a_linear_is_a_dense_conv():
    linear = nn.Linear(5, 4).double()
    x = torch.randn(3, 5, dtype=torch.double)
    x[:, 2] = 0
    weight = resize_weight(linear.weight, _source([0, NEW, 3]), _source([0, 1, NEW, 3, 4]), 1, 1)
    x_new = torch.stack([x[:, 0], x[:, 1], torch.full((3,), 5.0, dtype=x.dtype), x[:, 3],
                         x[:, 4]], 1)
    y = x_new @ weight.T
    torch.testing.assert_close(y[:, [0, 2]], (x @ linear.weight.T)[:, [0, 3]], **TIGHT)
    assert (y[:, 1] == 0).all()


def test_a_new_group_may_not_mix_old_groups():
    weight = torch.randn(4, 2, 1, 1)
    with pytest.raises(ValueError, match="mix or split"):  # rows of group 0, inputs of group 1
        resize_weight(weight, _source([0, 1]), _source([2, 3]), 2, 1)
    with pytest.raises(ValueError, match="divide"):
        resize_weight(weight, _source([0, 1, 2]), _source([0, 1, 2]), 2, 2)


def test_cut_bounds_follow_removal_and_padding():
    assert cut_bounds(_source([0, 2, 3, 5]), [0, 3, 6]) == [0, 2, 4]
    # pieces [0, 3) and [3, 5), each padded at its end: the padding stays with its piece
    assert cut_bounds(_source([0, 1, 2, NEW, 3, 4, NEW, NEW]), [0, 3, 5]) == [0, 4, 8]


def test_composite_sources():
    concatenation = composite_source([(0, 1, _source([0, 2, NEW])), (3, 1, _source([1]))])
    assert concatenation.tolist() == [0, 2, NEW, 4]
    # an interleave of one lockstep group (a shuffle with g = 2 of 2 x 3 channels): keep 0, 2
    interleave = composite_source([(0, 2, _source([0, 2])), (1, 2, _source([0, 2]))])
    assert interleave.tolist() == [0, 1, 4, 5]
    with pytest.raises(ValueError, match="shuffle"):
        composite_source([(0, 2, _source([0, NEW])), (1, 2, _source([0, NEW]))])


# ---- every handler on a graph: removal of dead channels and padding keep the function ----

class Members(nn.Module):
    """Every member kind: conv, BN, a layer scale and a shift, a grouped conv, a depthwise conv, a
    split, a slice, a cat, two producers of one group, flatten -> Linear, Linear -> Linear."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.a_bn = nn.BatchNorm2d(6)
        self.gamma = nn.Parameter(torch.rand(6, 1, 1) + 0.5)
        self.shift = nn.Parameter(torch.zeros(1, 6, 1, 1))
        self.grouped = nn.Conv2d(6, 6, 3, padding=1, groups=2)
        self.depthwise = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.b = nn.Conv2d(6, 5, 1)
        self.c = nn.Conv2d(8, 5, 1)
        self.d = nn.Conv2d(2, 5, 1)
        self.fc = nn.Linear(5, 7)
        self.out = nn.Linear(7, 2)

    def forward(self, x):
        x = F.relu(self.a_bn(self.a(x))) * self.gamma + self.shift
        y = F.relu(self.depthwise(self.grouped(x)))
        left, right = torch.split(self.b(y), [2, 3], 1)
        v = F.relu(self.c(torch.cat([x, left], 1)) + self.d(right[:, 1:]))
        return self.out(F.relu(self.fc(F.adaptive_avg_pool2d(v, 1).flatten(1))))


def _model() -> Members:
    torch.manual_seed(2)
    model = Members().double().eval()
    with torch.no_grad():
        model.a_bn.running_mean.uniform_(-1, 1)
        model.a_bn.running_var.uniform_(0.5, 2)
        model.a_bn.weight.uniform_(0.5, 1.5)
        model.a_bn.bias.uniform_(-1, 1)
        model.shift.uniform_(-1, 1)
    return model


def _kill(model: nn.Module, layers: dict[str, list[int]]) -> None:
    """Make channels dead (0 wherever read): zero rows and bias of conv/Linear, zero mean and
    bias of BN, zero shift."""
    with torch.no_grad():
        for name, channels in layers.items():
            layer = getattr(model, name)
            if isinstance(layer, nn.BatchNorm2d):
                layer.running_mean[channels] = 0
                layer.bias[channels] = 0
            elif isinstance(layer, nn.Parameter):
                layer[:, channels] = 0
            else:
                layer.weight[channels] = 0
                layer.bias[channels] = 0


def _resized(model: nn.Module, sources: dict[str, list[int]], shape=(2, 3, 6, 6)):
    """`model` resized (groups named by a node of theirs), checked against the original in
    float64, and rebuilt from the original by the recorded edits; the resized graph."""
    x = torch.randn(shape, dtype=torch.double, generator=torch.Generator().manual_seed(3))
    gm = torch.fx.symbolic_trace(copy.deepcopy(model))
    cg = analyze_channels(gm, (x,))
    nodes = {n.name: n for n in gm.graph.nodes}
    resize_channels(gm, cg, {cg.index[nodes[name]]: _source(source)
                             for name, source in sources.items()})
    torch.testing.assert_close(gm(x), model(x), **TIGHT)
    replayed = torch.fx.symbolic_trace(copy.deepcopy(model))
    apply_edits(replayed, edits_of(gm))
    replayed.load_state_dict(gm.state_dict(), strict=True, assign=True)
    replayed.eval()  # as a checkpoint loads
    torch.testing.assert_close(replayed(x), model(x), **TIGHT)
    return gm


# member kind -> (node naming the group, dead channels per layer, removal, padding)
CASES = {
    "conv, BN, constants, grouped input, cat": (
        "a", {"a": [1, 4], "a_bn": [1, 4], "shift": [1, 4]}, [0, 2, 3, 5],
        [0, 1, 2, NEW, 3, 4, 5, NEW]),
    "grouped output, depthwise": (
        "grouped", {"grouped": [0, 5], "depthwise": [0, 5]}, [1, 2, 3, 4],
        [0, 1, 2, NEW, NEW, 3, 4, 5, NEW, NEW]),
    "split": ("getitem", {"b": [1]}, [0], [0, 1, NEW]),
    "slice": ("getitem_2", {"b": [3]}, [1], [0, NEW, NEW, 1]),
    "two producers, flatten -> Linear": ("c", {"c": [0, 2], "d": [0, 2]}, [1, 3, 4],
                                         [NEW, 0, 1, 2, 3, 4, NEW, NEW]),
    "Linear -> Linear": ("fc", {"fc": [6]}, [0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5, 6, NEW]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_member_removal_and_padding(case):
    node, dead, removal, padding = CASES[case]
    model = _model()
    _resized(model, {node: padding})
    _kill(model, dead)
    gm = _resized(model, {node: removal})
    assert {e["op"] for e in edits_of(gm)} >= {"module"}


def test_edits_of_a_resize():
    gm = _resized(_model(), {"a": [0, 1, 2, NEW, 3, 4, 5, NEW], "getitem": [0, NEW, 1]})
    assert gm.gamma.shape[0] == gm.shift.shape[1] == 8
    assert gm.grouped.groups == 2 and gm.grouped.in_channels == 8
    edits = edits_of(gm)
    assert {e["name"] for e in edits if e["op"] == "module"} == {"a", "a_bn", "grouped", "b", "c"}
    assert {e["name"] for e in edits if e["op"] == "tensor"} == {"gamma", "shift"}
    assert [e["sizes"] for e in edits if e["op"] == "split"] == [[3, 3]]


def test_a_source_that_reorders_is_refused():
    gm = torch.fx.symbolic_trace(_model())
    cg = analyze_channels(gm, (torch.randn(1, 3, 6, 6, dtype=torch.double),))
    a = next(n for n in gm.graph.nodes if n.name == "a")
    with pytest.raises(ResizeError, match="in order"):
        resize_channels(gm, cg, {cg.index[a]: _source([1, 0, 2, 3, 4, 5])})


def test_padding_through_a_layer_norm_is_refused_and_removal_replays():
    """A LayerNorm over the channels (channels last, between Linears) keeps its statistics
    only without new channels; removal gathers its weight and bias and replays from the edits."""
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3)).double()
    analyzed = []
    for _ in range(2):
        gm = torch.fx.symbolic_trace(model)
        cg = analyze_channels(gm, (torch.randn(2, 4, dtype=torch.double),))
        hidden = cg.index[next(n for n in gm.graph.nodes if n.target == "0")]
        analyzed.append((gm, cg, hidden))
    gm, cg, hidden = analyzed[0]
    assert cg.groups[hidden].normalized
    with pytest.raises(ResizeError, match="LayerNorm's mean and variance"):
        resize_channels(gm, cg, {hidden: _source([0, 1, 2, 3, 4, 5, NEW])})
    gm, cg, hidden = analyzed[1]
    resize_channels(gm, cg, {hidden: _source([0, 2, 5])})
    norm = gm.get_submodule("1")
    assert norm.normalized_shape == (3,) and torch.equal(norm.weight, model[1].weight[[0, 2, 5]])
    rebuilt = torch.fx.symbolic_trace(copy.deepcopy(model))
    apply_edits(rebuilt, edits_of(gm))
    rebuilt.double().load_state_dict(gm.state_dict())
    x = torch.randn(2, 4, dtype=torch.double)
    torch.testing.assert_close(rebuilt(x), gm(x))


class LiteralView(nn.Module):
    """A channel count written as a literal in a reshape (an exported program's view)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.b(self.a(x).view(2, 8, 36).view(2, 8, 6, 6))


def test_a_literal_channel_count_follows_the_resize_and_replays():
    model = LiteralView().double()
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 6, 6, dtype=torch.double)
    cg = analyze_channels(gm, (x,))
    a = next(n for n in gm.graph.nodes if n.target == "a")
    assert len(cg.sizes) == 2 and not cg.of(a).fixed
    resize_channels(gm, cg, {cg.index[a]: _source([0, 2, 4, 6])})
    assert [n.args[2] for n in gm.graph.nodes if n.target == "view"] == [4, 4]
    edits = [e for e in edits_of(gm) if e["op"] == "reshape"]
    assert [(e["at"], e["size"]) for e in edits] == [(1, 4), (1, 4)]
    rebuilt = torch.fx.symbolic_trace(LiteralView())
    apply_edits(rebuilt, edits_of(gm))
    rebuilt.double().load_state_dict(gm.state_dict())
    torch.testing.assert_close(rebuilt(x), gm(x))


# ---- random maps: removal and padding at once ----

class Chain(nn.Module):
    """conv -> BN -> relu -> grouped conv (g groups of width >= 2: not depthwise) -> BN -> relu
    -> conv."""

    def __init__(self, groups: int, width: int):
        super().__init__()
        channels = groups * width
        self.a = nn.Conv2d(3, channels, 3, padding=1)
        self.a_bn = nn.BatchNorm2d(channels)
        self.g = nn.Conv2d(channels, channels, 3, padding=1, groups=groups)
        self.g_bn = nn.BatchNorm2d(channels)
        self.out = nn.Conv2d(channels, 2, 1)

    def forward(self, x):
        return self.out(F.relu(self.g_bn(self.g(F.relu(self.a_bn(self.a(x)))))))


@st.composite
def _segment_map(draw, groups: int, width: int, dropped: list[int]):
    """(source, removed channels): the segments in `dropped` removed whole, every other one
    keeps the same number of its channels and gets the same number of new ones, at random
    places inside it."""
    kept = draw(st.integers(1, width))
    new = draw(st.integers(0, 3))
    source, removed = [], []
    for segment in range(groups):
        channels = list(range(segment * width, (segment + 1) * width))
        if segment in dropped:
            removed += channels
            continue
        chosen = sorted(draw(st.permutations(channels))[:kept])
        removed += [c for c in channels if c not in chosen]
        for _ in range(new):
            chosen.insert(draw(st.integers(0, len(chosen))), NEW)
        source += chosen
    return source, removed


@settings(max_examples=40, deadline=None)
@given(data=st.data(), groups=st.sampled_from([1, 2, 3]), width=st.integers(2, 4),
       seed=st.integers(0, 99))
def test_random_maps_on_a_conv_bn_grouped_conv_chain(data, groups, width, seed):
    """Random removals (of dead channels) and insertions on both sides of a grouped conv, whole
    segments removed on both sides alike: the function is unchanged, the edits rebuild it."""
    torch.manual_seed(seed)
    model = Chain(groups, width).double().eval()
    with torch.no_grad():
        for bn in (model.a_bn, model.g_bn):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-1, 1)
    dropped = data.draw(st.lists(st.integers(0, groups - 1), max_size=groups - 1, unique=True))
    sources = {}
    for conv, bn in (("a", "a_bn"), ("g", "g_bn")):
        source, removed = data.draw(_segment_map(groups, width, dropped))
        _kill(model, {conv: removed, bn: removed})
        sources[conv] = source
    gm = _resized(model, sources, (2, 3, 5, 5))
    assert gm.g.groups == groups - len(dropped)
    assert gm.g.out_channels == len(sources["g"]) and gm.g.in_channels == len(sources["a"])
