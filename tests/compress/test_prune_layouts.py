"""Pruning networks whose blocks work channels last (tests/wild/channels_last.py: torchvision's and
timm's ConvNeXt blocks) or split their channels into attention heads (tests/wild/attention.py:
timm's LeViT): the channel analysis follows the channels through permutes and head reshapes,
LayerNorm and layer scales lose the removed entries, q, k and v lose the same dims in every head,
dead channels and head dims go exactly, `archc prune --macs` reaches its target through the
pickle and the torch.export route, and the pruned program prunes again."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from archc.backends.importers import canonical_graph, lift_aten_graph
from archc.cli.main import main
from archc.compress.pruning import PruneConfig, prune
from archc.ir import channels
from archc.ir.channels import analyze_channels
from archc.ir.init import random_input, randomize
from tests.helpers import kill_half
from tests.wild.attention import NETWORKS as ATTENTION
from tests.wild.channels_last import NETWORKS as CHANNELS_LAST
from tests.wild.channels_last import Permute
from tests.wild.hybrids import NETWORKS as HYBRIDS

SHAPE = (2, 3, 32, 32)
NETWORKS = {**CHANNELS_LAST, **ATTENTION, **HYBRIDS}


def _model(make):
    return randomize(make(), 0, calibration_input=random_input((4, *SHAPE[1:]), 1)).eval()


def _graph(model: nn.Module, route: str, example: torch.Tensor):
    if route == "trace":
        gm = torch.fx.symbolic_trace(model)
    else:
        gm = lift_aten_graph(torch.export.export(model, (example,)).module())
    return canonical_graph(gm, example)


def _shapes(gm, kind) -> dict[str, tuple]:
    return {name: tuple(m.weight.shape) for name, m in gm.named_modules() if type(m) is kind}


@pytest.mark.parametrize("name", list(NETWORKS))
@pytest.mark.parametrize("route", ["trace", "export"])
def test_dead_channels_and_head_dims_pruned_exactly(name, route):
    """Half of every group without a LayerNorm dead (the MLPs' hidden channels; in LeViT also the
    residual stream and half the dims of q, k and v in every head) -> removed exactly, in
    float64; the LayerNorm groups stay whole with keep_normalized."""
    example = random_input(SHAPE, 0).double()
    gm = _graph(_model(NETWORKS[name]).double(), route, example)
    kill_half(gm, example)
    result = prune(gm, example, PruneConfig(0.5, keep_normalized=True))
    assert result.macs[1] < 0.7 * result.macs[0]
    assert _shapes(result.graph_module, nn.LayerNorm) == _shapes(gm, nn.LayerNorm)
    if name in CHANNELS_LAST:
        assert any("normalized by a LayerNorm" in note and "left whole" in note
                   for note in result.notes)
    x = random_input(SHAPE, 5).double()
    torch.testing.assert_close(result.graph_module(x), gm(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(CHANNELS_LAST))
def test_layer_norms_and_layer_scales_lose_the_removed_channels(name):
    example = random_input(SHAPE, 0)
    gm = _graph(_model(CHANNELS_LAST[name]), "trace", example)
    result = prune(gm, example, PruneConfig(0.5))
    pruned = result.graph_module
    before, after = _shapes(gm, nn.LayerNorm), _shapes(pruned, nn.LayerNorm)
    assert before.keys() == after.keys() and len(before) >= 3
    assert all(after[n][0] == before[n][0] // 2 for n in before)
    # per-channel constants: layer scales; the original's hand-written LayerNorm's weight, bias
    read = {name for reads in analyze_channels(gm).constants.values() for name, _, _ in reads}
    scales = {n: p.numel() for n, p in gm.named_parameters() if n in read}
    assert any("gamma" in n or "scale" in n for n in scales)
    if name == "original_convnext":
        assert {"downsample_layers.0.1.weight", "downsample_layers.1.0.bias"} <= scales.keys()
    pruned_scales = {n: p.numel() for n, p in pruned.named_parameters() if n in scales}
    assert all(pruned_scales[n] == scales[n] // 2 for n in scales)
    assert any("not exact" in note for note in result.notes)
    assert pruned(random_input(SHAPE, 5)).shape == (2, 10)
    again = analyze_channels(pruned, (example,))  # the pruned graph reads as the original did
    assert sorted(g.size for g in again.groups) == sorted(
        g.size if g.fixed else g.size // 2 for g in analyze_channels(gm).groups)


def test_levit_attention_loses_the_same_dims_in_every_head():
    example = random_input(SHAPE, 0)
    gm = _graph(_model(ATTENTION["levit"]), "trace", example)
    scores = [g for g in analyze_channels(gm).groups if g.fixed == channels.HEADS]
    assert len(scores) == 2 and all(g.size == 2 for g in scores)  # one per head, 2 heads
    pruned = prune(gm, example, PruneConfig(0.5)).graph_module
    for block in ("stages.0.attn", "stages.1.attn"):
        qkv, proj = (pruned.get_submodule(f"{block}.{n}.linear") for n in ("qkv", "proj.1"))
        assert qkv.out_features == 2 * (4 + 4 + 8) and proj.in_features == 2 * 8
    views = [n for n in pruned.graph.nodes if n.target == "reshape" and len(n.args) > 3]
    assert views and all(n.args[-1] == 16 for n in views)  # reshape(B, N, heads * val_dim)
    assert pruned(random_input(SHAPE, 5)).shape == (2, 10)


def test_efficientvit_linear_attention_loses_the_same_dims_in_every_head():
    example = random_input(SHAPE, 0)
    gm = _graph(_model(ATTENTION["efficientvit"]), "trace", example)
    padded = [g for g in analyze_channels(gm).groups if g.fixed == channels.PADDED]
    assert [g.size for g in padded] == [1]  # v's ones channel
    pruned = prune(gm, example, PruneConfig(0.5)).graph_module
    attention = "stages.1.context_module.main"
    qkv, proj = (pruned.get_submodule(f"{attention}.{n}.conv") for n in ("qkv", "proj"))
    assert qkv.out_channels == 4 * 3 * 2 and proj.in_channels == 4 * 2  # 4 heads of 2 dims
    assert pruned(random_input(SHAPE, 5)).shape == (2, 10)


# pickles, exports, prunes (a MACs search), re-exports and verifies each network by both routes:
# 20-70 s each on the shared 2-core machine; one network per family (timm's ConvNeXt variants
# are checked through both graph routes above; MobileViT in test_prune_hybrids: its exported
# program bakes the batch size into the unfold's reshapes, so the pruned program cannot be
# re-exported with a dynamic batch)
@pytest.mark.slow
@pytest.mark.parametrize("name", ["torchvision_convnext", "original_convnext", *ATTENTION,
                                  "fastvit", "efficientformer"])
def test_prunes_to_the_macs_target_by_both_routes_and_again(tmp_path, capsys, name):
    model = _model(NETWORKS[name])
    pickled, program = tmp_path / "m.pt", tmp_path / "m.pt2"
    torch.save(model, pickled)
    torch.export.save(torch.export.export(model, (random_input(SHAPE, 0),)), str(program))
    outputs = []
    for source, extra in ((pickled, ["--trust-pickle", "--input-shape", "2,3,32,32"]),
                          (program, [])):
        out = tmp_path / f"{source.suffix[1:]}.pt2"
        assert main(["prune", str(source), *extra, "--macs", "0.5", "-o", str(out),
                     "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert 0.45 * report["macs"][0] <= report["macs"][1] <= 0.5 * report["macs"][0]
        outputs.append((out, report))
    out, report = outputs[1]
    assert main(["prune", str(out), "--ratio", "0.3", "-o", str(tmp_path / "again.pt2"),
                 "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["macs"][0] == report["macs"][1] and again["macs"][1] < report["macs"][1]


# ---- what the analysis still refuses, one line naming the op ----

class Block(nn.Module):
    """A conv, then `tail(self, y)`, then a 1x1 conv reading 8 channels."""

    def __init__(self, tail, norm=None):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)
        self.norm, self.tail = norm, tail

    def forward(self, x):
        return self.head(self.tail(self, self.conv(x)))


class _Bare(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Parameter(torch.randn(1, 8, 1, 1))


def _conv_group(model: nn.Module):
    gm = torch.fx.symbolic_trace(model.eval())
    graph = analyze_channels(gm, (torch.randn(2, 3, 8, 8),))
    return graph.of(next(n for n in gm.graph.nodes if n.target == "conv"))


@pytest.mark.parametrize("tail, norm, message", [
    (lambda m, y: y @ y, None, "matmul that mixes channels"),
    (lambda m, y: y.softmax(1), None, "softmax over the channels"),
    (lambda m, y: F.pad(y, (0, 0, 0, 0, -1, 1)), None, "pad that crops the channels"),
    (lambda m, y: F.pad(y, (1, 1, 1, 1), mode="reflect")[..., 1:-1, 1:-1], None, "pad"),
    (lambda m, y: m.norm(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), nn.LayerNorm([8, 8, 8]),
     "LayerNorm over more than the channels"),
    (lambda m, y: m.norm(y), nn.Linear(8, 8), "Linear over a dim that does not hold the channels"),
    (lambda m, y: m.norm(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), nn.BatchNorm2d(8),
     "BatchNorm2d on a tensor with its channels on dim 3"),
    (lambda m, y: m.norm(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), nn.GroupNorm(2, 8),
     "GroupNorm on a tensor with its channels on dim 3"),
    (lambda m, y: m.norm(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), nn.PReLU(8),
     "PReLU on a tensor with its channels on dim 3"),
    (lambda m, y: F.pixel_unshuffle(F.pixel_shuffle(y.permute(0, 2, 3, 1), 2), 2)
     .permute(0, 3, 1, 2), None, "pixel_shuffle on a tensor with its channels on dim 3"),
    (lambda m, y: y[:, None][:, 0], None, "indexing"),
    (lambda m, y: y + y.permute(0, 3, 1, 2), None, "operands with their channels on different"),
    (lambda m, y: m.norm(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), nn.Conv2d(8, 8, 1),
     "Conv2d on a tensor with its channels on dim 3"),
    (lambda m, y: torch.cat([y, y.permute(0, 2, 3, 1)], 1)[:, :8], None, "cat (cat)"),
    (lambda m, y: y / torch.sigmoid(y), None, "division by a tensor"),
    (lambda m, y: y * m.norm.c + m.norm.c, _Bare(), "constant tensor"),
    (lambda m, y: torch.cat(y.split(4, 1), 1), None, "split used as a whole"),
    (lambda m, y: y.split(8, 1)[0], None, "split into one or empty pieces"),
    (lambda m, y: torch.cat([y[:, 4:4], y], 1), None, "empty channel slice"),
    (lambda m, y: (y.flatten(2) @ torch.ones(64, 64)).view(2, 8, 8, 8), None,
     "matmul of these ranks"),
    (lambda m, y: y.mT.mT, None, "attribute mT"),
    (lambda m, y: torch.roll(y, 1, 1), None, "roll (roll)"),
    (lambda m, y: y - y.sum(1, keepdim=True), None, "reduction over the channels"),
    (lambda m, y: y * y.mean(1)[:, None], None, "reduction over the channels"),
    (lambda m, y: torch.stack([y.unbind(1)[i] for i in range(8)], 1), None,
     "unbind of the channels"),
    (lambda m, y: torch.stack(y.unbind(2), 2), None, "unbind used as a whole"),
])
def test_ops_the_analysis_cannot_follow_fix_their_channels(tail, norm, message):
    """Each reason names the op and its node, in one line: `...: what (op at node)`."""
    group = _conv_group(Block(tail, norm))
    assert group.fixed.startswith(channels.UNSUPPORTED) and message in group.fixed
    assert "\n" not in group.fixed and group.fixed.endswith(")")


@pytest.mark.parametrize("stats", [
    lambda y: (y.mean(1, keepdim=True), y.var(1, keepdim=True, unbiased=False)),
    lambda y: (torch.mean(y, dim=[1], keepdim=True), torch.std(y, 1, True, True) ** 2),
])
def test_a_hand_written_channels_first_norm_normalizes_its_group(stats):
    """ConvNeXt's channels-first LayerNorm written out: the mean and variance over dim 1 span the
    group (`normalized`, like a LayerNorm's), their one-channel results are fixed statistics."""
    def norm(m, y):
        u, s = stats(y)
        return (y - u) / torch.sqrt(s + 1e-6) * m.norm.g[:, None, None]
    gm = torch.fx.symbolic_trace(Block(norm, _Gamma()).eval())
    graph = analyze_channels(gm, (torch.randn(2, 3, 8, 8),))
    group = graph.of(next(n for n in gm.graph.nodes if n.target == "conv"))
    assert not group.fixed and len(group.normalized) == 2
    assert {g.fixed for g in graph.groups if g.size == 1} == {channels.STATISTIC}


def test_a_cat_of_a_list_the_graph_computes_is_refused():
    gm = torch.fx.symbolic_trace(Block(lambda m, y: torch.cat(y.split(4, 1), 1)).eval())
    graph = analyze_channels(gm, (torch.randn(2, 3, 8, 8),))
    cat = next(n for n in gm.graph.nodes if n.target is torch.cat)
    assert graph.of(cat).fixed == (f"{channels.UNSUPPORTED}: cat of a list computed in the graph "
                                   f"(cat at cat)")


def test_an_aten_op_of_a_program_is_named_in_its_refusal():
    model = Block(lambda m, y: torch.roll(y, 1, 1)).eval()
    example = torch.randn(2, 3, 8, 8)
    gm = lift_aten_graph(torch.export.export(model, (example,)).module())
    graph = analyze_channels(gm, (example,))
    roll = next(n for n in gm.graph.nodes if "roll" in n.name)
    assert graph.of(roll).fixed == f"{channels.UNSUPPORTED}: aten.roll.default ({roll.name})"


def test_a_reshape_that_merges_the_channels_with_other_dims_is_refused():
    """[N, C, H, W] -> [N, C H W]: the channels are the outer dim, not heads of the inner."""
    group = _conv_group(Block(lambda m, y: y.flatten(1).view(2, -1, 8, 8)))
    assert group.fixed == channels.MOVES_CHANNELS


def test_a_head_split_with_a_computed_head_size_is_refused():
    group = _conv_group(Block(lambda m, y: y.view(2, 2, y.size(0) * 2, 8, 8).relu()
                              .reshape(2, 8, 8, 8)))
    assert group.fixed == channels.SIZE_READ


def test_permutes_that_only_move_the_channels_are_followed():
    group = _conv_group(Block(lambda m, y: F.gelu(m.norm(y)).transpose(1, 3).transpose(2, 3),
                              Permute([0, 2, 3, 1])))
    assert not group.fixed


class _Gamma(nn.Module):
    def __init__(self):
        super().__init__()
        self.g = nn.Parameter(torch.randn(8))


@pytest.mark.parametrize("view", [lambda g: g, lambda g: g.view(1, 1, 1, -1),
                                  lambda g: g[None, None, None, :]])
def test_a_layer_scale_viewed_onto_the_last_dim_is_a_per_channel_constant(view):
    """gamma [C] times an NHWC tensor, directly or through views adding size-1 dims (the chain
    of `constant_chain` on the tensor's channel dim): pruned along gamma's own dim 0."""
    model = Block(lambda m, y: (y.permute(0, 2, 3, 1) * view(m.norm.g)).permute(0, 3, 1, 2),
                  _Gamma())
    gm = torch.fx.symbolic_trace(model.eval())
    graph = analyze_channels(gm, (torch.randn(2, 3, 8, 8),))
    group = graph.of(next(n for n in gm.graph.nodes if n.target == "conv"))
    assert not group.fixed
    assert list(graph.constants.values()) == [(("norm.g", 0, "scale"),)]
