"""Whole attention heads as pruning units (`ChannelGraph.heads`, `PruneConfig.heads`) on the
LeViT-style and EfficientViT-style networks of tests/wild/attention.py, through both graph
routes: dead heads (zero value rows, or zero output-projection columns) are removed exactly in
float64, `heads="heads"` removes whole heads by the ratio and rewrites the literal head count,
and the pruned graph prunes again with fewer heads."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from archc.cli.main import main
from archc.compress.pruning import PruneConfig, head_source, prune, prune_to_macs
from archc.ir import channels
from archc.ir.channels import analyze_channels
from archc.ir.init import random_input
from tests.compress.test_prune_layouts import SHAPE, _graph, _model
from tests.helpers import kill_half
from tests.wild.attention import NETWORKS as ATTENTION
from tests.wild.attention import EfficientVit, Levit
from tests.wild.hybrids import NETWORKS as HYBRIDS

NETWORKS = {"levit": lambda: Levit(num_heads=4), "efficientvit": EfficientVit}  # 4 heads each


def _heads(gm):
    graph = analyze_channels(gm)
    assert len(graph.heads) >= 1 and all(not h.fixed for h in graph.heads)
    return graph


def _kill_heads(gm, dead_values: int, dead_columns: int) -> None:
    """Head `dead_values` of every attention: its value rows 0 (and its BN maps 0 to 0); head
    `dead_columns`: the output projection's columns reading it 0."""
    graph = _heads(gm)
    with torch.no_grad():
        for heads in graph.heads:
            for index in heads.wholes:
                group = graph.groups[index]
                width = group.size // heads.count
                if group.producers:  # the split's input: q, k, v of every head
                    merge = next(graph.groups[w] for w in heads.wholes
                                 if not graph.groups[w].producers)
                    value = graph.groups[merge.parts[0].group].size  # v dims of one head
                    rows = torch.arange((dead_values + 1) * width - value,
                                        (dead_values + 1) * width)
                    for node in group.producers:
                        gm.get_submodule(node.target).weight[rows] = 0
                    for node in group.channelwise:
                        bn = gm.get_submodule(node.target)
                        bn.weight[rows], bn.bias[rows] = 0, 0
                else:
                    columns = torch.arange(dead_columns * width, (dead_columns + 1) * width)
                    for node in group.consumers:
                        gm.get_submodule(node.target).weight[:, columns] = 0


def _head_count(gm) -> list[int]:
    dtype = next(gm.parameters()).dtype
    return [h.count for h in analyze_channels(gm, (random_input(SHAPE, 0, dtype),)).heads]


@pytest.mark.parametrize("name", list(NETWORKS))
@pytest.mark.parametrize("route", ["trace", "export"])
def test_dead_heads_are_removed_exactly(name, route):
    example = random_input(SHAPE, 0).double()
    gm = _graph(_model(NETWORKS[name]).double(), route, example)
    kill_half(gm, example)  # half the head dims (and other channels) dead too
    _kill_heads(gm, 1, 2)
    result = prune(gm, example, PruneConfig(0.5, keep_normalized=True))
    heads = [(g.before, g.after) for g in result.groups if g.policy == "heads"]
    assert heads and all(h == (4, 2) for h in heads)
    assert _head_count(result.graph_module) == [2] * len(heads)
    x = random_input(SHAPE, 5).double()
    torch.testing.assert_close(result.graph_module(x), gm(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(NETWORKS))
@pytest.mark.parametrize("route", ["trace", "export"])
def test_whole_heads_pruned_by_the_ratio_and_again(name, route):
    example = random_input(SHAPE, 0)
    gm = _graph(_model(NETWORKS[name]), route, example)
    before = {n: m.weight.shape for n, m in gm.named_modules() if "qkv" in n and
              isinstance(m, (nn.Linear, nn.Conv2d))}
    pruned = prune(gm, example, PruneConfig(0.5, heads="heads")).graph_module
    after = {n: m.weight.shape for n, m in pruned.named_modules() if n in before}
    assert all(after[n][0] == before[n][0] // 2 for n in before)  # 2 of 4 heads, dims whole
    assert _head_count(pruned) == [2] * len(before)
    assert pruned(random_input(SHAPE, 5)).shape == (2, 10)
    again = prune(pruned, example, PruneConfig(0.5, heads="heads")).graph_module
    assert {n: m.weight.shape[0] for n, m in again.named_modules() if n in before} == {
        n: shape[0] // 4 for n, shape in before.items()}  # one head left: no head split now
    assert _head_count(again) == []
    assert again(random_input(SHAPE, 5)).shape == (2, 10)


@pytest.mark.parametrize("name", list(NETWORKS))
def test_whole_heads_reach_the_macs_target(name):
    example = random_input(SHAPE, 0)
    gm = _graph(_model(NETWORKS[name]), "export", example)
    result = prune_to_macs(gm, example, 0.5, lambda r: PruneConfig(r, heads="heads"))
    assert 0.45 * result.macs[0] <= result.macs[1] <= 0.5 * result.macs[0]
    assert result.graph_module(random_input(SHAPE, 5)).shape == (2, 10)


def test_levit_attention_biases_lose_the_removed_heads():
    example = random_input(SHAPE, 0)
    gm = _graph(_model(NETWORKS["levit"]), "trace", example)
    graph = _heads(gm)
    assert sorted(name for reads in graph.constants.values() for name, _, _ in reads) == [
        f"stages.{i}.attn.attention_biases" for i in range(2)]
    pruned = prune(gm, example, PruneConfig(0.5, heads="heads")).graph_module
    kept = [pruned.get_parameter(f"stages.{i}.attn.attention_biases") for i in range(2)]
    assert all(b.shape[0] == 2 for b in kept)
    original = gm.get_parameter("stages.0.attn.attention_biases")
    assert any(torch.equal(kept[0], original[list(pair)])
               for pair in [(a, b) for a in range(4) for b in range(a + 1, 4)])


@settings(max_examples=50, deadline=None)
@given(st.data())
def test_head_source_keeps_the_kept_heads_dims(data):
    """A group of h heads of d channels whose every head keeps dims D (lockstep) and whose heads
    K are kept: the source is i d + j for i in K, j in D, in order."""
    h, d = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 6))
    dims = sorted(data.draw(st.sets(st.integers(0, d - 1), min_size=1)))
    kept = sorted(data.draw(st.sets(st.integers(0, h - 1), min_size=1)))
    source = torch.tensor([i * d + j for i in range(h) for j in dims])
    expected = [i * d + j for i in kept for j in dims]
    assert head_source(source, d, torch.tensor(kept)).tolist() == expected


class _Attention(nn.Module):
    """Tokens of a conv stem through one multi-head attention with a per-head temperature on
    the scores ([h, 1, 1]), heads of 4 dims each of q, k and v."""

    def __init__(self, heads=3, computed=False):
        super().__init__()
        self.heads, self.computed = heads, computed
        self.embed, self.head = nn.Conv2d(3, 6, 2, 2), nn.Linear(6, 5)
        self.qkv, self.proj = nn.Linear(6, 12 * heads), nn.Linear(4 * heads, 6)
        self.temperature = nn.Parameter(torch.rand(heads, 1, 1) + 0.5)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        b, n, _ = x.shape
        heads = self.heads + 0 * b if self.computed else self.heads
        q, k, v = self.qkv(x).view(b, n, heads, -1).permute(0, 2, 1, 3).chunk(3, dim=-1)
        attn = ((q @ k.transpose(-1, -2)) * self.temperature).softmax(-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(b, n, -1))
        return self.head(x.mean(1))


@settings(max_examples=15, deadline=None)
@given(st.integers(2, 4), st.data())
def test_removing_dead_heads_is_exact(heads, data):
    """A random attention whose heads in a random set are dead (value rows and bias 0): removing
    them (heads="dims" removes exactly the dead ones) keeps its output in float64, and the
    temperature loses their entries."""
    dead = sorted(data.draw(st.sets(st.integers(0, heads - 1), max_size=heads - 1)))
    torch.manual_seed(heads)
    model = _Attention(heads).double().eval()
    with torch.no_grad():
        for i in dead:
            rows = slice(i * 12 + 8, i * 12 + 12)
            model.qkv.weight[rows], model.qkv.bias[rows] = 0, 0
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    result = prune(gm, x, PruneConfig(0.01))
    assert result.graph_module.temperature.shape[0] == heads - len(dead)
    keep = [i for i in range(heads) if i not in dead]
    torch.testing.assert_close(result.graph_module.temperature, model.temperature[keep])
    torch.testing.assert_close(result.graph_module(x), model(x), rtol=1e-12, atol=1e-12)


class _ShiftedValues(_Attention):
    """v + beta with beta [4] per head dim (the same in every head): a dead value row is not 0."""

    def __init__(self):
        super().__init__()
        self.beta = nn.Parameter(torch.rand(4) + 0.5)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, self.heads, -1).permute(0, 2, 1, 3).chunk(3, dim=-1)
        attn = ((q @ k.transpose(-1, -2)) * self.temperature).softmax(-1)
        x = x + self.proj((attn @ (v + self.beta)).transpose(1, 2).reshape(b, n, -1))
        return self.head(x.mean(1))


def test_zero_value_rows_under_a_shift_are_not_a_dead_head():
    model = _ShiftedValues().double().eval()
    with torch.no_grad():
        model.qkv.weight[8:12], model.qkv.bias[8:12] = 0, 0  # head 0's value rows
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    result = prune(gm, x, PruneConfig(0.01))
    assert [(g.before, g.after) for g in result.groups if g.policy == "heads"] == [(3, 3)]
    torch.testing.assert_close(result.graph_module(x), model(x), rtol=1e-12, atol=1e-12)


def _heads_kept_whole(model: nn.Module, reason: str):
    """Traced: the one attention's heads are fixed for `reason`, and pruning by whole heads
    leaves them (the report says why); the pruned result."""
    gm = torch.fx.symbolic_trace(model.eval())
    graph = analyze_channels(gm, (torch.randn(2, 3, 4, 4),))
    assert [h.fixed for h in graph.heads] == [reason]
    result = prune(gm, torch.randn(2, 3, 4, 4), PruneConfig(0.5, heads="heads"))
    assert not any(g.policy == "heads" for g in result.groups)
    assert any(reason.split(" (")[0] in note for note in result.notes)
    return result


def test_a_computed_head_count_is_refused():
    _heads_kept_whole(_Attention(computed=True), f"{channels.HEAD_COUNT} (view)")


class _ScaledQuery(_Attention):
    """The temperature [h, 1, 1] scales q, whose channel dim is its head dims: not per head."""

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, self.heads, -1).permute(0, 2, 1, 3).chunk(3, dim=-1)
        attn = ((q * self.temperature) @ k.transpose(-1, -2)).softmax(-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(b, n, -1))
        return self.head(x.mean(1))


def test_a_constant_not_indexed_by_the_heads_keeps_them():
    result = _heads_kept_whole(_ScaledQuery(), f"{channels.HEAD_CONSTANT} (mul)")
    assert result.graph_module(torch.randn(2, 3, 4, 4)).shape == (2, 5)


class _TwoCounts(nn.Module):
    """Head dims of 8 in 2 heads and in 4 heads, tied by an add after summing over the heads."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Conv2d(3, 6, 2, 2), nn.Linear(8, 5)
        self.a, self.b = nn.Linear(6, 16), nn.Linear(6, 32)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        b, n, _ = x.shape
        y = self.a(x).view(b, n, 2, -1).sum(2) + self.b(x).view(b, n, 4, -1).sum(2)
        return self.head(y.mean(1))


def test_linked_head_splits_with_different_counts_keep_their_heads():
    _heads_kept_whole(_TwoCounts(), f"{channels.SEGMENT_CONFLICT} (head counts [2, 4])")


@pytest.mark.parametrize("route", ["trace", "export"])
def test_a_grouped_conv_over_the_heads_keeps_them(route):
    """EfficientViT's multi-scale aggregation: its 1x1 conv groups q, k and v of every head on its
    own, so removing a head would cut conv groups its aggregated twin still reads."""
    example = random_input(SHAPE, 0).double()
    gm = _graph(_model(ATTENTION["efficientvit_multiscale"]).double(), route, example)
    graph = analyze_channels(gm)
    assert [h.fixed.split(" (")[0] for h in graph.heads] == [channels.HEAD_GROUPED]
    result = prune(gm, example, PruneConfig(0.5, heads="heads"))
    assert not any(g.policy == "heads" for g in result.groups)
    assert any(channels.HEAD_GROUPED in note for note in result.notes)
    assert result.graph_module(example).shape == (2, 10)


@pytest.mark.parametrize("route", ["trace", "export"])
def test_heads_split_over_several_dims_stay_whole(route):
    """FastViT's `reshape(B, N, 3, heads, head_dim)`: its 3 h segments are not h heads."""
    example = random_input(SHAPE, 0).double()
    gm = _graph(_model(HYBRIDS["fastvit"]).double(), route, example)
    assert analyze_channels(gm).heads and all(h.fixed for h in analyze_channels(gm).heads)
    result = prune(gm, example, PruneConfig(0.5, heads="heads"))
    assert not any(g.policy == "heads" for g in result.groups)
    assert result.graph_module(example).shape == (2, 10)


def test_an_unknown_heads_policy_is_refused():
    with pytest.raises(Exception, match="unknown heads policy"):
        PruneConfig(0.5, heads="tokens")


def test_dims_policy_keeps_live_heads():
    """With every head alive, "dims" removes no head."""
    example = random_input(SHAPE, 0)
    gm = _graph(_model(NETWORKS["levit"]), "export", example)
    result = prune(gm, example, PruneConfig(0.5))
    assert [(g.before, g.after) for g in result.groups if g.policy == "heads"] == [(4, 4)] * 2
    assert _head_count(result.graph_module) == [4, 4]


# pickles, exports, prunes (a MACs search) and re-exports each network by both routes: 20-70 s
# each on the shared 2-core machine
@pytest.mark.slow
@pytest.mark.parametrize("name", list(NETWORKS))
def test_cli_prunes_whole_heads_to_the_macs_target_and_again(tmp_path, capsys, name):
    model = _model(NETWORKS[name])
    pickled, program = tmp_path / "m.pt", tmp_path / "m.pt2"
    torch.save(model, pickled)
    torch.export.save(torch.export.export(model, (random_input(SHAPE, 0),)), str(program))
    for source, extra in ((pickled, ["--trust-pickle", "--input-shape", "2,3,32,32"]),
                          (program, [])):
        out = tmp_path / f"{source.suffix[1:]}.pt2"
        assert main(["prune", str(source), *extra, "--macs", "0.5", "--heads", "heads", "-o",
                     str(out), "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert 0.45 * report["macs"][0] <= report["macs"][1] <= 0.5 * report["macs"][0]
        heads = [(g["before"], g["after"]) for g in report["groups"] if g["policy"] == "heads"]
        assert heads and all(after < before for before, after in heads)
    assert main(["prune", str(out), "--ratio", "0.3", "--heads", "heads", "-o",
                 str(tmp_path / "again.pt2"), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["macs"][0] == report["macs"][1] and again["macs"][1] < report["macs"][1]
    assert [g["before"] for g in again["groups"] if g["policy"] == "heads"] == [
        after for _, after in heads if after > 1]
