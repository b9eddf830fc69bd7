"""Layout passes: channel counts that suit tensor cores (docs/performance.md, GPU section).

`align_channels` (opt-in, function-preserving) zero-pads every internal channel group
(`archc.ir.channels`) to a multiple of N, its option `multiple` (default 8, for fp16/bf16 tensor
cores; 16 for int8). A group of C channels gets C' >= C; its old channel i moves to
position π(i) and the other C' - C positions are padding:

- producers (conv/Linear writing the group): W'[π(o)] = W[o], b'[π(o)] = b[o], zero rows and bias
  elsewhere, so a padded channel is exactly 0; a depthwise conv gets zero filters, C' groups;
- BN on the group: μ = 0, σ² = 1, γ = 0, β = 0 on padded channels, so BN(x) = 0 there (copied
  statistics would give β - μγ/σ, not 0);
- consumers (conv/Linear reading the group): W'[:, π(i)] = W[:, i], zero columns elsewhere, so
  Σ_i' W'[o, i'] x'_i' = Σ_i W[o, i] x_i whatever the padded channels hold;
- everything in between is elementwise and keeps padded channels finite (relu(0) = 0; an SE gate
  sigmoid(0) = 0.5 multiplies a 0 channel), and only zero columns ever read them.

Model inputs and outputs are fixed, so every output is unchanged (up to float summation order).
The layouts π:

- a leaf group pads at its end, π(i) = i. With grouped convs it is s = lcm(g) equal segments of
  p = C / s channels, each padded to p' = ceil(p / N) N: π(j p + i) = j p' + i, so every conv group
  keeps its own channels and every per-group width (s / g) p' is a multiple of N;
- a composite (cat, split, chunk or slice on dim 1) is the concatenation of its parts' layouts:
  segment boundaries move with the padding, cat needs nothing, splits and slices get new sizes.

A group is skipped, with a refusal that gives the numbers, when C' > 2 C (TVM's rule: more padding
than channels), when the analysis fixed it (its reason), and when a channel shuffle reorders it
(`SHUFFLED`: padding would have to keep the shuffle's segments in lockstep). The report gives
parameters and FLOPs before and after (`archc.ir.analysis`). Every group ends aligned or refused, so
a second run changes nothing.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Node

from archc.errors import PassError
from archc.ir.analysis import complexity_report
from archc.ir.channels import ChannelGraph, ChannelGroup, analyze_channels
from archc.ir.graph import attribute, describe, set_weights
from archc.ir.graph_edits import set_tensor
from archc.ir.shapes import has_shapes, node_value, propagate_shapes
from archc.rewrite import weight_algebra as wa
from archc.rewrite.pipeline import PassContext, PassOption, PassResult, register_pass
from archc.rewrite.rules import (
    Match,
    Plan,
    Refuse,
    Refused,
    Rule,
    Skip,
    apply_rules,
    whole_graph,
    without_plan,
)

NAME = "align_channels"
DOUBLES = "padding would more than double the channels"
SHUFFLED = "a channel shuffle reorders these channels (padding through it is not implemented)"
NEEDS_INPUTS = "needs example inputs (PassContext.example_inputs or input_shape) for the shapes"

Layouts = dict[int, tuple[int, Tensor]]  # group index -> (padded size C', π as a LongTensor)

MULTIPLE = PassOption("multiple", int, 8, "pad every channel group to a multiple of this "
                      "(8 for fp16/bf16 tensor cores, 16 for int8)",
                      lambda value: None if value >= 1 else f"must be positive, got {value}")


@dataclass(frozen=True)
class _Settings:
    multiple: int
    inputs: tuple[Tensor, ...]  # meta stand-ins of the graph's inputs, to propagate shapes again


@dataclass(frozen=True)
class _Padding:
    graph: ChannelGraph
    layouts: Layouts
    rewrites: list[str]


def _check(match: Match) -> Plan | Refused | Skip:
    graph = analyze_channels(match.gm)
    layouts, rewrites, refusals = plan(graph, match.memo.multiple)
    if not layouts:
        return without_plan(refusals)
    return Plan(_Padding(graph, layouts, rewrites), tuple(refusals))


def _pad(match: Match, padding: _Padding) -> list[str]:
    gm = match.gm
    before = complexity_report(gm).total
    apply_layouts(gm, padding.graph, padding.layouts)
    gm.recompile()
    propagate_shapes(gm, match.memo.inputs)  # channel counts changed everywhere
    after = complexity_report(gm).total
    return [*padding.rewrites, f"params {_growth(before.params, after.params)}, "
            f"flops {_growth(before.flops, after.flops)} per sample"]


RULES = (
    # x -> pad(x): zero filters and zero input columns, padded channels exactly 0 (docstring)
    Rule(NAME, whole_graph, _check, _pad, "W' = scatter(W); sum over padded channels adds 0"),
)


@register_pass(NAME, "zero-pad internal channel counts to a multiple of N (opt-in, GPU)", True,
               options=(MULTIPLE,))
def align_channels(gm: GraphModule, ctx: PassContext) -> PassResult:
    if not has_shapes(gm):
        raise PassError(NEEDS_INPUTS, NAME)
    inputs = tuple(node_value(n) for n in gm.graph.nodes if n.op == "placeholder")
    settings = _Settings(ctx.option(NAME, "multiple"), inputs)
    return apply_rules(gm, RULES, memo=lambda gm: settings)


def plan(graph: ChannelGraph, multiple: int) -> tuple[Layouts, list[str], list[Refuse]]:
    """The layout of every group that changes, what is padded and what is refused."""
    layouts: Layouts = {}
    rewrites: list[str] = []
    refusals: list[Refuse] = []
    shuffled = graph.shuffled()
    for group in sorted(graph.groups, key=lambda g: g.size):  # parts before their composites
        if group.index in shuffled:
            if group.size % multiple:
                refusals.append(Refuse(SHUFFLED, _names(graph, group)))
            continue
        if group.parts:
            if any(p.group in layouts for p in group.parts):
                layouts[group.index] = _concatenate(graph, group, layouts)
            continue
        if group.fixed:
            if group.size % multiple:
                refusals.append(Refuse(group.fixed, _names(graph, group)))
            continue
        segments = group.divisor
        width = group.size // segments
        padded = -(-width // multiple) * multiple
        if padded == width:
            continue
        split = f" ({segments} segments of {width} -> {padded})" if segments > 1 else ""
        if segments * padded > 2 * group.size:
            refusals.append(Refuse(f"{DOUBLES}: {group.size} -> {segments * padded}{split}",
                                   _names(graph, group)))
            continue
        index = (torch.arange(segments)[:, None] * padded + torch.arange(width)).flatten()
        layouts[group.index] = (segments * padded, index)
        rewrites.append(f"padded {', '.join(_names(graph, group))}: "
                        f"{group.size} -> {segments * padded} channels{split}")
    return layouts, rewrites, refusals


def _concatenate(graph: ChannelGraph, group: ChannelGroup, layouts: Layouts) -> tuple[int, Tensor]:
    """A composite's layout: its parts' layouts one after the other."""
    offset, pieces = 0, []
    for part in group.parts:
        size, index = _layout(graph.groups[part.group], layouts)
        pieces.append(index + offset)
        offset += size
    return offset, torch.cat(pieces)


def _layout(group: ChannelGroup, layouts: Layouts) -> tuple[int, Tensor]:
    return layouts.get(group.index, (group.size, torch.arange(group.size)))


def _names(graph: ChannelGraph, group: ChannelGroup) -> tuple[str, ...]:
    nodes = group.producers or group.tensors or group.consumers
    if nodes:
        return tuple(describe(n) for n in nodes[:3]) + (("...",) if len(nodes) > 3 else ())
    whole = next((g for g in graph.groups if any(p.group == group.index for p in g.parts)), None)
    return (f"part of {', '.join(_names(graph, whole))}",) if whole else (f"g{group.index}",)


def _growth(before: int, after: int) -> str:
    return f"{before:,} -> {after:,} (+{(after - before) / max(before, 1):.1%})"


# ---- rewriting the graph ----

def apply_layouts(gm: GraphModule, graph: ChannelGraph, layouts: Layouts) -> None:
    """Pad the layers and re-cut the splits of every group in `layouts`."""
    changed = [graph.groups[index] for index in layouts]
    layers = {n for g in changed for n in (*g.producers, *g.consumers, *g.channelwise)}
    for node in sorted(layers, key=lambda n: n.name):  # conv, Linear, BN modules; constants
        if node in graph.constants:  # a layer scale or bias: 0 on the padded channels
            size, index = _layout(graph.of(node), layouts)
            for name, axis, _ in graph.constants[node]:
                tensor = attribute(gm, name)
                moved = tensor.detach().movedim(axis, 0)
                padded = moved.new_zeros((size, *moved.shape[1:]))
                padded[index] = moved
                set_tensor(gm, name, padded.movedim(0, axis))
            continue
        module = gm.get_submodule(node.target)
        out_size, out_index = _layout(graph.of(node), layouts)
        in_size, in_index = _layout(graph.of(node.args[0]), layouts)
        if isinstance(module, nn.Linear):
            weight = wa.scatter_weight(module.weight, out_index, out_size, in_index, in_size, 1, 1)
            set_weights(module, weight, _scatter(module.bias, out_index, out_size))
            module.in_features, module.out_features = in_size, out_size
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            _pad_norm(module, out_size, out_index)
        else:
            _pad_conv(module, in_size, in_index, out_size, out_index)
    for node, whole in graph.cuts.items():
        if whole in layouts:
            _recut(node, graph.groups[whole], graph, layouts)


def _scatter(vector: Tensor | None, index: Tensor, size: int, fill: float = 0.0) -> Tensor | None:
    return None if vector is None else wa.scatter_vector(vector, index, size, fill)


def _pad_conv(conv: nn.Module, in_size: int, in_index: Tensor, out_size: int,
              out_index: Tensor) -> None:
    depthwise = conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels
    new_groups = out_size if depthwise else conv.groups
    weight = wa.scatter_weight(conv.weight, out_index, out_size, in_index, in_size, conv.groups,
                            new_groups)
    set_weights(conv, weight, _scatter(conv.bias, out_index, out_size))
    conv.in_channels, conv.out_channels, conv.groups = in_size, out_size, new_groups


def _pad_norm(norm: nn.Module, size: int, index: Tensor) -> None:
    """Padded channels: μ = 0, σ² = 1, γ = 0, β = 0, so BN gives exactly 0 there."""
    if norm.affine:
        set_weights(norm, _scatter(norm.weight, index, size), _scatter(norm.bias, index, size))
    if norm.running_mean is not None:
        norm.running_mean = _scatter(norm.running_mean, index, size)
        norm.running_var = _scatter(norm.running_var, index, size, fill=1.0)
    norm.num_features = size


def _recut(node: Node, whole: ChannelGroup, graph: ChannelGraph, layouts: Layouts) -> None:
    """Give a split, chunk or channel slice of a padded group its padded segment bounds."""
    sizes = [_layout(graph.groups[p.group], layouts)[0] for p in whole.parts]
    x = node.args[0]
    if node.target is not operator.getitem:  # chunk(n) -> split(sizes): pieces may differ
        node.target = "split" if node.op == "call_method" else torch.split
        node.args, node.kwargs = (x, sizes), {"dim": 1}
        return
    items = node.args[1]  # (batch slice, channel slice, ...)
    start = items[1].indices(whole.size)[0]
    part = next(i for i, p in enumerate(whole.parts) if p.offset == start)
    begin = sum(sizes[:part])
    node.args = (x, (items[0], slice(begin, begin + sizes[part]), *items[2:]))
