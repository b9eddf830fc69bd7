"""Pruning the attention of more CNN hybrids (tests/wild/hybrids.py: timm's FastViT, MobileViT and
EfficientFormer; tests/wild/attention.py's EfficientViT with multi-scale aggregation) by its head
dims; the exactness and MACs checks of every network are in test_prune_layouts."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from torch import nn

from archc.compress.pruning import PruneConfig, prune, prune_to_macs
from archc.ir import channels
from archc.ir.channels import analyze_channels
from archc.ir.init import random_input, randomize
from tests.compress.test_prune_layouts import SHAPE, Block, _conv_group, _graph, _model
from tests.helpers import kill_half
from tests.wild.attention import NETWORKS as ATTENTION
from tests.wild.hybrids import NETWORKS as HYBRIDS


def _named(gm, target):
    return next(n for n in gm.graph.nodes if n.target == target)


def test_multiscale_linear_attention_keeps_one_conv_group_per_head_and_q_k_v():
    """The aggregation's 1x1 conv has 3 heads groups, one of q, k or v of one head each: q, k and
    v keep the same dims, so every group keeps as many channels."""
    example = random_input(SHAPE, 0)
    gm = _graph(_model(ATTENTION["efficientvit_multiscale"]), "trace", example)
    attention = "stages.1.context_module.main"
    graph = analyze_channels(gm, (example,))
    qkv = graph.of(_named(gm, f"{attention}.qkv.conv"))
    assert not qkv.fixed and len({g.index for g in graph.leaves(qkv)}) == 1
    pruned = prune(gm, example, PruneConfig(0.5)).graph_module
    qkv, grouped, proj = (pruned.get_submodule(f"{attention}.{n}") for n in
                          ("qkv.conv", "aggreg.0.1", "proj.conv"))
    assert qkv.out_channels == grouped.out_channels == 4 * 3 * 2  # 4 heads of 3 x 2 dims
    assert grouped.groups == 12 and grouped.in_channels == 24
    assert proj.in_channels == 2 * 4 * 2  # 8 heads (4 of them aggregated) of 2 dims
    assert pruned(random_input(SHAPE, 5)).shape == (2, 10)


@pytest.mark.parametrize("route", ["trace", "export"])
def test_fastvit_attention_loses_the_same_dims_of_q_k_v_in_every_head(route):
    """`reshape(B, N, 3, heads, head_dim)`: the 3 heads pieces of q, k and v keep the same dims.
    Traced, the heads merge with `reshape(B, N, C)`, C read from the block's input: the input's
    channels (the residual stream) and the merged heads keep one size, so they are one group; the
    exported program writes C as a literal, and the stream is free of the heads."""
    example = random_input(SHAPE, 0)
    gm = _graph(_model(HYBRIDS["fastvit"]), route, example)
    graph = analyze_channels(gm, (example,))
    heads = graph.leaves(graph.of(_named(gm, "blocks.0.token_mixer.qkv")))
    assert len(heads) == 6 and len({g.index for g in heads}) == 1 and heads[0].size == 16
    stream = graph.of(_named(gm, "stem.1.conv"))
    assert not stream.fixed and bool(stream.parts) == (route == "trace")
    pruned = prune(gm, example, PruneConfig(0.5)).graph_module
    for block in ("blocks.0", "blocks.1"):
        qkv, proj = (pruned.get_submodule(f"{block}.token_mixer.{n}") for n in ("qkv", "proj"))
        assert qkv.out_features == 3 * 2 * 8 and proj.in_features == 2 * 8  # 2 heads of 8 dims
    assert pruned(random_input(SHAPE, 5)).shape == (2, 10)


@pytest.mark.parametrize("route", ["trace", "export"])
def test_efficientformer_attention_loses_the_same_dims_in_every_head(route):
    """LeViT's split (`reshape(B, N, heads, -1)`, `split([key_dim, key_dim, val_dim], dim=3)`)
    on plain Linears; the attention biases, indexed by relative position, stay whole."""
    example = random_input(SHAPE, 0)
    gm = _graph(_model(HYBRIDS["efficientformer"]), route, example)
    pruned = prune(gm, example, PruneConfig(0.5)).graph_module
    qkv, proj = (pruned.get_submodule(f"stage1.token_mixer.{n}") for n in ("qkv", "proj"))
    assert qkv.out_features == 2 * (4 + 4 + 8) and proj.in_features == 2 * 8  # 2 heads
    assert pruned.get_submodule("stage1.token_mixer").attention_biases.shape == (2, 16)
    assert pruned(random_input(SHAPE, 5)).shape == (2, 10)


@pytest.mark.parametrize("route", ["trace", "export"])
def test_mobilevit_unfold_is_refused_in_one_line_and_the_rest_pruned_to_the_macs_target(route):
    """MobileViT's unfold `reshape(B * C * n_h, p_h, n_w, p_w)` merges the channels into the
    batch dim: the channels of its input and of the transformer stay whole; the MobileNetV2
    blocks, the MLP and (exported, where the heads merge with a literal count) the head dims
    are pruned, to 45-50% of the MACs, and the pruned graph prunes again."""
    example = random_input(SHAPE, 0)
    gm = _graph(_model(HYBRIDS["mobilevit"]), route, example)
    graph = analyze_channels(gm, (example,))
    unfolded = graph.of(_named(gm, "stages.2.conv_1x1"))
    assert unfolded.fixed.startswith(channels.MOVES_CHANNELS) and "\n" not in unfolded.fixed
    assert "merges the channels into the batch dim" in unfolded.fixed
    assert graph.of(_named(gm, "stages.2.transformer.0.attn.qkv")).fixed == ""
    result = prune_to_macs(gm, example, 0.5, PruneConfig)
    assert 0.45 * result.macs[0] <= result.macs[1] <= 0.5 * result.macs[0]
    mlp = result.graph_module.get_submodule("stages.2.transformer.0.mlp.0")
    assert mlp.out_features < 64
    again = prune(result.graph_module, example, PruneConfig(0.3))
    assert again.macs[1] < again.macs[0] == result.macs[1]


def test_a_reshape_that_merges_the_channels_into_the_batch_is_refused_naming_it():
    group = _conv_group(Block(lambda m, y: y.reshape(16, 4, 2, 8).reshape(2, 8, 8, 8)))
    assert group.fixed.startswith(channels.MOVES_CHANNELS)
    assert "a reshape merges the channels into the batch dim (reshape)" in group.fixed


class ReadCount(nn.Module):
    """`C = y.shape[1]` requested by reshapes: as their channel count, or elsewhere."""

    def __init__(self, where):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)
        self.where = where

    def forward(self, x):
        y = self.conv(x)
        B, C, H, W = y.shape
        y = y.reshape(B, C, H * W).transpose(1, 2)  # tokens [B, HW, C]
        y = y.reshape(B, H * W, C) if self.where == "channels" else y.reshape(B, H * W, -1)
        y = y.transpose(1, 2)
        return self.head(y.reshape(B, -1, H, W) if self.where == "channels" else
                         y.reshape(B, -1, C, W))  # C as the height (H = C here)


def test_a_read_channel_count_is_followed_as_a_reshapes_channel_count_only():
    x = torch.randn(2, 3, 8, 8)
    follows = torch.fx.symbolic_trace(ReadCount("channels").eval())
    assert not analyze_channels(follows, (x,)).of(_named(follows, "conv")).fixed
    other = torch.fx.symbolic_trace(ReadCount("height").eval())
    assert analyze_channels(other, (x,)).of(_named(other, "conv")).fixed == channels.SIZE_READ


class GroupedOverRuns(nn.Module):
    """Convs writing pieces of the given sizes, concatenated `runs` times over (each run its own
    convs), read by a depthwise conv and a conv with one group per run, or per piece
    (`per_piece`: the pieces of each place must then keep one size)."""

    def __init__(self, sizes, runs, per_piece):
        super().__init__()
        self.pieces = nn.ModuleList(nn.Sequential(nn.Conv2d(3, n, 1), nn.BatchNorm2d(n))
                                    for _ in range(runs) for n in sizes)
        total = runs * sum(sizes)
        self.dw = nn.Conv2d(total, total, 3, padding=1, groups=total)
        self.grouped = nn.Conv2d(total, total, 1, groups=runs * len(sizes) if per_piece
                                 else runs)
        self.head = nn.Conv2d(2 * total, 4, 1)

    def forward(self, x):
        y = torch.cat([p(x) for p in self.pieces], 1)
        return self.head(torch.cat([y, self.grouped(self.dw(y).relu())], 1))


@settings(max_examples=8, deadline=None)
@given(st.lists(st.integers(2, 4), min_size=1, max_size=3), st.integers(2, 3), st.booleans(),
       st.integers(0, 2 ** 16))
def test_a_grouped_conv_over_equal_runs_of_pieces_prunes_exactly(sizes, runs, per_piece, seed):
    """The pieces at one place of every run are tied (one group per place, or one for all when
    a group reads a single piece of equal sizes): dead channels removed exactly, in float64, and
    the grouped conv keeps its group count."""
    if per_piece:
        sizes = [sizes[0]] * len(sizes)
    example = random_input((2, 3, 6, 6), seed % 97).double()
    gm = torch.fx.symbolic_trace(randomize(GroupedOverRuns(sizes, runs, per_piece), seed)
                                 .double().eval())
    graph = analyze_channels(gm, (example,))
    grouped = graph.of(_named(gm, "dw"))
    assert not grouped.fixed and len({g.index for g in graph.leaves(grouped)}) == len(
        set(sizes) if per_piece else sizes)
    kill_half(gm, example)
    result = prune(gm, example, PruneConfig(0.5))
    pruned = result.graph_module
    assert pruned.get_submodule("grouped").groups == gm.get_submodule("grouped").groups
    assert result.macs[1] < result.macs[0]
    x = random_input((2, 3, 6, 6), 5).double()
    torch.testing.assert_close(pruned(x), gm(x), rtol=1e-12, atol=1e-12)
