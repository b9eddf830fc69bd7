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

`plan` gives each padded leaf group its layout as the sources of
`archc.rewrite.channel_resize.resize_channels` (s[π(i)] = i, `NEW` on the padding), which rewrites
every member by the rules above and records the changes as graph edits.

A group is skipped, with a refusal that gives the numbers, when C' > 2 C (TVM's rule: more padding
than channels), when the analysis fixed it (its reason), when a channel shuffle reorders it
(`SHUFFLED`: padding would have to keep the shuffle's segments in lockstep; a pixel shuffle's
interleave too), when a LayerNorm normalizes it (`NORMALIZED`: a zero channel would change its mean
and variance) and when a GroupNorm normalizes it (`NORMED`). The report gives parameters and
FLOPs before and after (`archc.ir.analysis`). Every group ends aligned or refused, so
a second run changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.fx import GraphModule

from archc.errors import PassError
from archc.ir.analysis import complexity_report
from archc.ir.channels import ChannelGraph, ChannelGroup, analyze_channels
from archc.ir.graph import describe
from archc.ir.shapes import has_shapes, node_value, propagate_shapes
from archc.rewrite.channel_resize import NEW, Sources, resize_channels
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
SHUFFLED = ("a channel or pixel shuffle interleaves these channels (padding through it is not "
            "implemented)")
NORMALIZED = "a LayerNorm normalizes these channels: a zero channel would change its statistics"
NORMED = "a GroupNorm normalizes these channels (zero channels would change its statistics)"
NEEDS_INPUTS = "needs example inputs (PassContext.example_inputs or input_shape) for the shapes"

Layouts = Sources  # leaf group index -> the source of each padded channel (NEW: padding)

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
    resize_channels(gm, padding.graph, padding.layouts)
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
    """The layout of every leaf group that changes (its composites follow), what is padded and
    what is refused."""
    layouts: Layouts = {}
    rewrites: list[str] = []
    refusals: list[Refuse] = []
    shuffled = graph.shuffled()
    for group in sorted(graph.groups, key=lambda g: g.size):  # the report's order
        if group.index in shuffled:
            if group.size % multiple:
                refusals.append(Refuse(SHUFFLED, _names(graph, group)))
            continue
        if group.parts:  # its parts' layouts, one after the other (`resize_channels`)
            continue
        if group.fixed or group.normalized or group.norm_groups:
            if group.size % multiple:
                refusals.append(Refuse(group.fixed or (NORMALIZED if group.normalized else NORMED),
                                       _names(graph, group)))
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
        layouts[group.index] = torch.full((segments * padded,), NEW).index_put_(
            (index,), torch.arange(group.size))
        rewrites.append(f"padded {', '.join(_names(graph, group))}: "
                        f"{group.size} -> {segments * padded} channels{split}")
    return layouts, rewrites, refusals


def _names(graph: ChannelGraph, group: ChannelGroup) -> tuple[str, ...]:
    nodes = group.producers or group.tensors or group.consumers
    if nodes:
        return tuple(describe(n) for n in nodes[:3]) + (("...",) if len(nodes) > 3 else ())
    whole = next((g for g in graph.groups if any(p.group == group.index for p in g.parts)), None)
    return (f"part of {', '.join(_names(graph, whole))}",) if whole else (f"g{group.index}",)


def _growth(before: int, after: int) -> str:
    return f"{before:,} -> {after:,} (+{(after - before) / max(before, 1):.1%})"
