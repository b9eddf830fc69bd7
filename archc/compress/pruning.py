"""Structured channel pruning over the channel groups of `archc.ir.channels`.

A free leaf group (not `fixed`, not a composite) is the unit of pruning: removing its channels K
deletes rows K of every producer (conv/Linear weight and bias), columns K of every consumer,
entries K of every channelwise member (BN statistics and affine, depthwise filters), and the
leaf's places of K in every composite that contains it (channel t of a part (offset o, stride s)
is the composite's o + s t: concatenations, splits, a shuffle's input and output); splits and
slices are re-cut to the new sizes (a piece [a, b) keeps the whole's kept channels in [a, b)).
A group the analysis cut into pieces for a shuffle (`refined`) is one unit over its channels, each
piece keeping at least one (no tensor left empty). Residual adds, SE gates, depthwise convs,
flatten -> Linear and the lockstep segments of a shuffle are ties inside a group, so they stay
consistent by construction; groups the analysis fixes (model inputs/outputs, shared modules,
shuffles it refuses) are left alone.

Channels-last blocks (ConvNeXt) prune the same way: the analysis follows the channels through
permutes, so a Linear on the last dim is a producer/consumer like a 1x1 conv, and a LayerNorm over
the channels and a layer scale gamma [C] are channelwise members (weight, bias and gamma lose the
removed entries); so are the per-channel weight and bias of a LayerNorm written out by hand over
dim 1 (the original ConvNeXt's `x.mean(1, keepdim=True)` ...), whose statistics normalize the group
as a LayerNorm's do. A LayerNorm's mean and variance run over all the channels of its group
(`ChannelGroup.normalized`), so removing any of them, even a dead one, changes its output: such
groups are pruned as Torch-Pruning prunes them (the note says how many; fine-tune afterwards), or
left whole with `keep_normalized`, and exactness holds for every other group.

The removal is `archc.rewrite.channel_resize.resize_channels` with each group's kept channels as
its sources (no new channels), and a candidate's MACs are counted by `archc.ir.analysis`'s
per-layer formula at the kept counts. A model archc did not build is first brought to the
canonical form the analysis reads (`archc.backends.importers.canonical_graph`).

Scores (one per channel of a group, higher is kept):
- `l1` / `l2`: the L1 / L2 norm of the channel's rows in every producer (summed over producers,
  e.g. both branches of a residual add), each through the gain |γ| / sqrt(var + eps) of a
  BatchNorm that alone reads the producer: the norm of the row that folding the BN would give,
  since a BN divides the row's own scale back out (w and its BN (a w, a μ, a² σ²) compute the
  same function and score alike);
- `bn-scale`: |gamma| summed over the group's BatchNorms (network slimming, Liu et al. 2017);
  groups without a BN are not pruned by this criterion;
- `random`: seeded uniform scores, the control.
A *dead* channel (every producer row and bias exactly 0, every BN mapping 0 to 0, every depthwise
bias 0, every Embedding's column 0) is exactly 0 wherever it is read, so removing it preserves the
output exactly; every criterion ranks dead channels first.

How many to keep: per layer, each group keeps ceil((1 - ratio) * size) channels; with
`global_threshold` the scores are normalized per group (l1/l2 divided by the group's largest,
bn-scale and random taken as they are) and one threshold over all groups removes `ratio` of all
prunable channels. Every group keeps at least one unit, and its kept count is rounded up to a
multiple of `round_to` (and of the grouped convs' segment count); a composite follows its leaves,
so a pixel shuffle's fine side, r² channels per kept coarse one, is a multiple too.
`prune_to_macs` with `round_to` > 1 then fills the rounded counts back up towards the MACs
target, one step at a time.

GroupNorm (G groups of C/G channels) is pruned by whole groups, its group count decreasing: a
channel removed from inside a group would change that group's mean and variance, so only removing
whole groups keeps the others' outputs (and removing a group whose channels are dead and whose β
is 0 is exact). A group with GroupNorms is one unit of G segments (several GroupNorms: the gcd of
their group counts) scored by the sum of each segment's channel scores; `round_to` applies to
the kept channel count in steps of whole groups. GroupNorm on a group with grouped convs is left
as it is. PReLU with one slope per channel has its slopes pruned with the channels.

Grouped convs (g groups, not depthwise) read and write g equal segments:
- `keep-count`: the group count stays g; each segment keeps the same number k of channels, its own
  top-k (not the same indices in every segment), so the group width becomes k;
- `keep-width`: whole segments are removed: the grouped conv's input and output groups (tied
  through that conv) lose the same segments, scored by the sum of their channels' scores; the
  conv keeps its group width and has fewer groups. A set of groups mixing different group counts
  falls back to keep-count.

Attention heads (`ChannelGraph.heads`) are units of their own, as in Michel et al. 2019 ("Are
Sixteen Heads Really Better than One?", which prunes whole heads by importance): removing head i
removes its segment of q, k, v (the rows of the projection writing them), of the merged output
(the columns of the output projection), its scores channel and its rows of per-head constants
(LeViT's attention biases); the resize rewrites a literal head count in the split's reshape.
A head is *dead* when every value channel it reads is dead or every column the output
projection reads of it is 0: it contributes nothing, and removing it is exact. `heads` chooses:
- `dims` (the default): the head dims are pruned by the ratio (every head keeps the same dims) and
  only dead heads go, so the pruning stays as fine-grained as the channels and exact where dead;
- `heads`: the heads are pruned by the ratio (ceil((1 - ratio) h) kept, at least one, by the
  sum of the criterion's norms of their q, k and v rows, dead heads first) and the head dims
  are left whole.

The result is the spec's graph plus `archc.ir.graph_edits` edits, saved as an archc checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from networkx.utils import UnionFind
from torch import Tensor, nn
from torch.fx import GraphModule, Node

from archc.errors import ArchcError
from archc.ir.analysis import complexity_report, module_complexity, module_macs
from archc.ir.channels import STATISTIC, ChannelGraph, ChannelGroup, Heads, analyze_channels
from archc.ir.graph import attribute, copy_module
from archc.ir.ops import BN_MODULES, CONV_MODULES
from archc.ir.shapes import has_shapes, node_shape, node_value, propagate_shapes
from archc.rewrite.channel_resize import (
    Sources,
    complete_sources,
    resize_channels,
    resized_groups,
    resized_layers,
)

CRITERIA = ("l1", "l2", "bn-scale", "random")
GROUP_POLICIES = ("keep-count", "keep-width")
HEAD_POLICIES = ("dims", "heads")


class PruneError(ArchcError):
    """Nothing can be pruned, or pruning options that do not fit the model."""


@dataclass(frozen=True)
class PruneConfig:
    ratio: float  # fraction of the prunable channels to remove, in (0, 1)
    criterion: str = "l1"
    global_threshold: bool = False
    round_to: int = 1
    group_policy: str = "keep-count"
    seed: int = 0  # for the random criterion
    # per layer: the ratio of the groups grouped convs cut into segments (their counts move in
    # steps of a segment count); None: `ratio`
    grouped_ratio: float | None = None
    # leave the groups a LayerNorm normalizes whole (their pruning is never exact)
    keep_normalized: bool = False
    # attention: prune the head dims and only dead heads ("dims"), or whole heads ("heads")
    heads: str = "dims"

    def __post_init__(self):
        for name in ("ratio", "grouped_ratio"):
            value = getattr(self, name)
            if value is not None and not 0 < value < 1:
                raise PruneError(f"the pruning {name.replace('_', ' ')} must be in (0, 1), "
                                 f"not {value}")
        if self.criterion not in CRITERIA:
            raise PruneError(f"unknown criterion {self.criterion!r}; one of {', '.join(CRITERIA)}")
        if self.group_policy not in GROUP_POLICIES:
            raise PruneError(f"unknown group policy {self.group_policy!r}; one of "
                             f"{', '.join(GROUP_POLICIES)}")
        if self.heads not in HEAD_POLICIES:
            raise PruneError(f"unknown heads policy {self.heads!r}; one of "
                             f"{', '.join(HEAD_POLICIES)}")
        if self.round_to < 1:
            raise PruneError("round_to must be at least 1")


@dataclass
class GroupChange:
    label: str
    before: int
    after: int
    policy: str  # "channels", "keep-count", "keep-width" or "norm-groups" (whole GroupNorm groups)
    macs_before: int = 0  # of the layers reading, writing or scaling these channels
    macs_after: int = 0
    params_before: int = 0
    params_after: int = 0


@dataclass
class PruneResult:
    graph_module: GraphModule
    params: tuple[int, int]  # before, after
    macs: tuple[int, int]
    groups: list[GroupChange] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def format(self) -> str:
        lines = [f"{'group':<28} {'channels':>11} {'params':>21} {'MACs':>23}  policy"]
        for g in self.groups:
            lines.append(f"{g.label[:28]:<28} {g.before:>5}->{g.after:<5} "
                         f"{g.params_before:>10,}->{g.params_after:<10,} "
                         f"{g.macs_before:>11,}->{g.macs_after:<11,} {g.policy}")
        (p0, p1), (m0, m1) = self.params, self.macs
        lines.append(f"total params {p0:,} -> {p1:,} ({100 * p1 / p0:.1f}%), MACs {m0:,} -> "
                     f"{m1:,} ({100 * m1 / m0:.1f}%) per sample")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


# ---- which channels: units, scores, counts ----

@dataclass
class _Unit:
    """Groups pruned together: one leaf group, or (keep-width) the in/out groups of grouped convs
    that lose the same whole segments."""

    groups: list[ChannelGroup]
    segments: int  # equal segments every decision respects (1: free channel choice)
    whole_segments: bool  # keep-width: remove whole segments
    scores: list[np.ndarray] = field(default_factory=list)  # per group, per channel
    pieces: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (leaf, its channels)
    heads: Heads | None = None  # whole attention heads: one score per head

    @property
    def size(self) -> int:
        return len(self.scores[0])


def _positions(cg: ChannelGraph) -> dict[int, list[tuple[int, np.ndarray]]]:
    """leaf group -> [(group, channels)]: where its channels 0, 1, ... are in itself and in every
    composite holding it (once per part: a shuffle's input holds its lockstep group g times)."""
    found: dict[int, list[tuple[int, np.ndarray]]] = {}

    def walk(group: ChannelGroup, top: int, channels: np.ndarray) -> None:
        for part in group.parts:
            child = cg.groups[part.group]
            mine = channels[np.asarray(part.positions())]
            if child.parts:
                walk(child, top, mine)
            else:
                found.setdefault(child.index, []).append((top, mine))

    for group in cg.groups:
        if group.parts:
            walk(group, group.index, np.arange(group.size))
        else:
            found.setdefault(group.index, []).insert(0, (group.index, np.arange(group.size)))
    return found


def _unit_pieces(cg: ChannelGraph) -> dict[int, dict[int, np.ndarray]]:
    """refined group (the analysis cut its channels into pieces where cuts of a shuffle's output
    need them) -> {leaf piece: the group's channels it holds}; such a group is one unit."""
    inside = {p.group for g in cg.groups if g.refined for p in g.parts}
    units = {}
    for group in cg.groups:
        if not group.refined or group.index in inside:
            continue
        pieces: dict[int, np.ndarray] = {}
        todo, whole = [(group, np.arange(group.size))], True
        while todo:
            holder, channels = todo.pop()
            for part in holder.parts:
                child = cg.groups[part.group]
                mine = channels[np.asarray(part.positions())]
                if child.refined:
                    todo.append((child, mine))
                elif child.parts:  # a piece made of other groups: its leaves are units
                    whole = False
                else:
                    pieces[child.index] = mine
        if whole:
            units[group.index] = pieces
    return units


def _depthwise(module: nn.Module) -> bool:
    """A channelwise conv (groups = C_in = C_out): the channel analysis ties its in and out."""
    return module.groups > 1 and module.groups == module.in_channels == module.out_channels


def _module(gm: GraphModule, node: Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _row_stats(module: nn.Module, criterion: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(norm, alive) per output row of a conv or Linear, in float64: the criterion's norm of the
    row (L1, else L2) and whether the row or its bias is nonzero; None for another module."""
    if not isinstance(module, (*CONV_MODULES, nn.Linear)):
        return None
    weight = module.weight.detach().double()
    rows = weight.reshape(weight.shape[0], -1)
    norm = torch.linalg.vector_norm(rows, ord=1 if criterion == "l1" else 2, dim=1)
    alive = (rows != 0).any(1)
    if module.bias is not None:
        alive |= module.bias.detach() != 0
    return norm.numpy(), alive.numpy()


def _bn_gain(gm: GraphModule, producer: Node, at: Tensor) -> np.ndarray | float:
    """|γ| / sqrt(var + eps) at channels `at` of the BatchNorm that alone reads a producer's output
    (1 without one): the factor folding that BN into the producer scales its rows by, so that the
    rows' norm is the norm of the layer the BN makes of them (a conv's row norm alone says nothing
    under a BN, which divides it back out)."""
    users = list(producer.users)
    bn = _module(gm, users[0]) if len(users) == 1 else None
    if not isinstance(bn, BN_MODULES) or not bn.track_running_stats or bn.running_var is None:
        return 1.0
    gamma, _ = _bn_affine(bn, at)
    return (gamma.abs() / torch.sqrt(bn.running_var.double()[at] + bn.eps)).numpy()


def _bn_affine(module: nn.Module, at: Tensor) -> tuple[Tensor, Tensor]:
    """A BatchNorm's (γ, β) at channels `at`, in float64 (1 and 0 without affine)."""
    if module.affine:
        return module.weight.detach().double()[at], module.bias.detach().double()[at]
    return torch.ones(len(at), dtype=torch.float64), torch.zeros(len(at), dtype=torch.float64)


def _channelwise_alive(gm: GraphModule, cg: ChannelGraph, group: ChannelGroup,
                       at: Tensor) -> np.ndarray:
    """Per channel `at` of a group: whether a channelwise member maps its 0 to something else
    (a BN's shift β - γ μ / σ, a depthwise conv's or GroupNorm's bias, an embedding's
    column, a per-channel shift)."""
    alive = np.zeros(len(at), dtype=bool)
    for node in group.channelwise:
        module = _module(gm, node)
        if isinstance(module, BN_MODULES):
            g, b = _bn_affine(module, at)
            if module.track_running_stats and module.running_mean is not None:
                mean = module.running_mean.double()[at]
                var = module.running_var.double()[at]
                b = b - g * mean / torch.sqrt(var + module.eps)
            alive |= (b != 0).numpy()
        elif isinstance(module, (*CONV_MODULES, nn.GroupNorm)) and module.bias is not None:
            alive |= (module.bias.detach()[at] != 0).numpy()  # a dead GroupNorm group is β
        elif isinstance(module, nn.Embedding):  # a label's row added in: its column
            alive |= (module.weight.detach()[:, at] != 0).any(0).numpy()
        for name, axis, kind in cg.constants.get(node, ()):
            if kind == "shift":  # a dead channel plus a constant is not dead
                shift = attribute(gm, name).detach().index_select(axis, at)
                alive |= (shift.movedim(axis, 0).reshape(len(at), -1) != 0).any(1).numpy()
    return alive


def _channel_scores(gm: GraphModule, cg: ChannelGraph, positions, leaf: ChannelGroup,
                    criterion: str, rng: np.random.Generator,
                    row_stats: dict[Node, tuple[np.ndarray, np.ndarray] | None]
                    ) -> np.ndarray | None:
    """Scores of the channels of a leaf group (None: the criterion has nothing to go on);
    dead channels get -inf. `row_stats`: each producer's `_row_stats`, filled as they are met."""
    n = leaf.size
    norm = np.zeros(n)
    gamma = np.zeros(n)
    alive = np.zeros(n, dtype=bool)
    producers = bns = 0
    for top, channels in positions[leaf.index]:
        group = cg.groups[top]
        at = torch.from_numpy(channels)
        for node in group.producers:
            if node not in row_stats:
                row_stats[node] = _row_stats(_module(gm, node), criterion)
            if row_stats[node] is None:
                return None
            row_norm, row_alive = row_stats[node]
            norm += row_norm[channels] * _bn_gain(gm, node, at)
            alive |= row_alive[channels]
            producers += 1
        for node in group.channelwise:
            module = _module(gm, node)
            if isinstance(module, BN_MODULES):
                bns += 1
                gamma += _bn_affine(module, at)[0].abs().numpy()
        alive |= _channelwise_alive(gm, cg, group, at)
    if producers == 0:
        return None
    if criterion in ("l1", "l2"):
        scores = norm
    elif criterion == "bn-scale":
        if bns == 0:
            return None
        scores = gamma
    else:
        scores = rng.random(n)
    return np.where(alive, scores, -np.inf)


def _units(gm: GraphModule, cg: ChannelGraph, config: PruneConfig,
           notes: list[str]) -> list[_Unit]:
    positions = _positions(cg)
    rng = np.random.Generator(np.random.PCG64(config.seed))
    pieces_of = _unit_pieces(cg)
    in_unit = {leaf for pieces in pieces_of.values() for leaf in pieces}
    scored: dict[int, np.ndarray] = {}
    row_stats: dict[Node, tuple[np.ndarray, np.ndarray] | None] = {}
    skipped_no_bn = normalized = 0
    fixed: dict[str, int] = {}
    whole_heads = [h for h in cg.heads if not h.fixed and h.count > 1]
    head_dims = {p for h in whole_heads for p in h.pieces} if config.heads == "heads" else set()
    for group in cg.groups:
        if group.fixed and not group.fixed.startswith(("model input", "model output",
                                                       STATISTIC)):
            reason = group.fixed.split(" (")[0]
            fixed[reason] = fixed.get(reason, 0) + 1
        if group.fixed or (group.parts and group.index not in pieces_of) or group.size < 2 \
                or group.index in in_unit or group.index in head_dims:
            continue
        if group.norm_groups == 1 or group.norm_groups and group.groups:
            notes.append(f"{group.label()}: " + (
                "a GroupNorm with one group normalizes all these channels together"
                if group.norm_groups == 1 else "a GroupNorm and a grouped conv on these channels")
                + ", left as they are")
            continue
        if group.normalized:
            normalized += 1
            if config.keep_normalized:
                continue
        if group.index in pieces_of:  # its pieces' scores, in its channel order
            scores = np.zeros(group.size)
            for leaf, channels in pieces_of[group.index].items():
                piece = cg.groups[leaf]
                found = None if piece.fixed or piece.norm_groups else _channel_scores(
                    gm, cg, positions, piece, config.criterion, rng, row_stats)
                if found is None:
                    scores = None
                    break
                scores[channels] = found
        else:
            scores = _channel_scores(gm, cg, positions, group, config.criterion, rng, row_stats)
        if scores is None:
            skipped_no_bn += config.criterion == "bn-scale"
            continue
        scored[group.index] = scores
    for reason, count in fixed.items():
        notes.append(f"{count} groups left as they are: {reason}")
    if normalized:
        notes.append(f"{normalized} groups are normalized by a LayerNorm over their channels: "
                     + ("left whole" if config.keep_normalized else
                        "pruning them changes its statistics (not exact; fine-tune after)"))
    if skipped_no_bn:
        notes.append(f"{skipped_no_bn} groups have no BatchNorm: bn-scale leaves them unpruned")
    # keep-width: groups tied through grouped convs lose the same segments
    tied = UnionFind(scored)
    counts: dict[int, set[int]] = {}
    blocked: set[int] = set()
    if config.group_policy == "keep-width":
        for node in gm.graph.nodes:
            module = _module(gm, node)
            if isinstance(module, CONV_MODULES) and module.groups > 1 and node in cg.index:
                a, b = cg.index[node.args[0]], cg.index[node]
                if _depthwise(module) or a == b:  # channelwise, or tied by a residual add
                    blocked.update({a, b} & scored.keys())
                    continue
                if a in scored and b in scored:
                    tied.union(a, b)
                else:  # its other side keeps every group: this side cannot drop whole groups
                    blocked.update({a, b} & scored.keys())
                for index in (a, b):
                    counts.setdefault(index, set()).add(module.groups)
    units = []
    for members in tied.to_sets():
        groups = sorted((cg.groups[i] for i in members), key=lambda g: g.index)
        divisors = {g.divisor for g in groups}
        gcounts = set().union(*(counts.get(g.index, set()) for g in groups))
        sizes = {g.size for g in groups}
        if config.group_policy == "keep-width" and len(gcounts) == 1 and len(sizes) == 1 \
                and divisors == gcounts and not blocked & set(members):
            unit = _Unit(groups, gcounts.pop(), True, [scored[g.index] for g in groups])
        else:
            if len(groups) > 1:
                notes.append(f"{', '.join(g.label() for g in groups)}: mixed group counts, "
                             f"pruned keep-count")
            elif config.group_policy == "keep-width" and groups[0].divisor > 1:
                notes.append(f"{groups[0].label()}: the grouped conv's other side is fixed, "
                             f"pruned keep-count")
            for g in groups:
                if g.norm_groups:  # whole GroupNorm groups
                    units.append(_Unit([g], g.norm_groups, True, [scored[g.index]]))
                    continue
                units.append(_Unit([g], g.divisor, False, [scored[g.index]],
                                   list(pieces_of.get(g.index, {}).items())))
            continue
        units.append(unit)
    for heads in cg.heads:
        if heads.fixed:
            notes.append(f"heads of {cg.groups[heads.wholes[0]].label()} left as they are: "
                         f"{heads.fixed}")
    for heads in whole_heads:
        scores = _head_scores(gm, cg, positions, heads, config.criterion, rng, row_stats)
        if scores is not None:
            units.append(_Unit([cg.groups[heads.wholes[0]]], 1, False, [scores], heads=heads))
    return units


def _segment(heads: Heads, group: ChannelGroup, head: int) -> np.ndarray:
    """The channels of head `head` in a group laid out as the heads' lockstep segments."""
    width = group.size // heads.count
    return np.arange(head * width, (head + 1) * width)


def _head_scores(gm: GraphModule, cg: ChannelGraph, positions, heads: Heads, criterion: str,
                 rng: np.random.Generator, row_stats) -> np.ndarray | None:
    """One score per head (None: the criterion has nothing to go on): the sum of the criterion's
    norms of the head's rows in the producers of the head splits' inputs (q, k and v; bn-scale:
    |γ| of their BNs, random: seeded), -inf for a dead
    head: its value channels (the leaves of the merges' head dims) are dead rows wherever a
    producer writes them, or the merges' consumers read only zero columns of it."""
    norm, gamma = np.zeros(heads.count), np.zeros(heads.count)
    dead = np.zeros(heads.count, dtype=bool)
    producers = bns = 0
    for index in heads.wholes:
        group = cg.groups[index]
        for node in group.producers:
            if node not in row_stats:
                row_stats[node] = _row_stats(_module(gm, node), criterion)
            if row_stats[node] is None:
                return None
            producers += 1
            row_norm = row_stats[node][0]
            norm += [row_norm[_segment(heads, group, i)].sum() for i in range(heads.count)]
        for node in group.channelwise:
            module = _module(gm, node)
            if isinstance(module, BN_MODULES) and module.affine:
                bns += 1
                weight = module.weight.detach().double().abs().numpy()
                gamma += [weight[_segment(heads, group, i)].sum() for i in range(heads.count)]
    for group in (cg.groups[index] for index in heads.wholes):
        if not group.producers:  # a merge: its consumers' columns, its value channels' rows
            values = {leaf.index for part in group.parts[:1]
                      for leaf in cg.leaves(cg.groups[part.group])}
            dead |= _dead_heads(gm, cg, positions, heads, group, values, row_stats)
    if producers == 0 or criterion == "bn-scale" and bns == 0:
        return None
    scores = {"l1": norm, "l2": norm, "bn-scale": gamma}.get(criterion)
    scores = rng.random(heads.count) if scores is None else scores
    return np.where(dead, -np.inf, scores)


def _dead_heads(gm: GraphModule, cg: ChannelGraph, positions, heads: Heads,
                merge: ChannelGroup, values: set[int], row_stats) -> np.ndarray:
    """Per head: whether the merge `merge` reads nothing of it (its consumers' columns of the
    head are 0) or its value channels `values` are dead: 0 rows in the head splits' inputs
    (`row_stats` holds their producers'), no channelwise member there or in any other group
    holding them (the merge, a pad) mapping 0 to something else, and no other producer."""
    unread = np.full(heads.count, bool(merge.consumers))
    for node in merge.consumers:
        module = _module(gm, node)
        if not isinstance(module, (*CONV_MODULES, nn.Linear)) or getattr(module, "groups", 1) > 1:
            unread[:] = False
            break
        columns = module.weight.detach().movedim(1, 0).reshape(merge.size, -1)
        unread &= [not columns[_segment(heads, merge, i)].any() for i in range(heads.count)]
    alive = np.zeros(heads.count, dtype=bool)
    for leaf in values:
        for top, channels in positions[leaf]:
            group = cg.groups[top]
            rows = _channelwise_alive(gm, cg, group, torch.arange(group.size))
            if top not in heads.wholes:  # v itself, or another group holding it: all heads
                alive |= bool(group.producers) or rows[channels].any()
                continue
            for node in group.producers:
                rows |= row_stats[node][1]
            for i in range(heads.count):
                alive[i] |= rows[np.intersect1d(channels, _segment(heads, group, i))].any()
    return unread | ~alive


def _step(unit: _Unit, round_to: int) -> int:
    """Kept counts are multiples of this."""
    if unit.whole_segments:
        width = unit.size // unit.segments
        return width * (round_to // math.gcd(round_to, width))
    return math.lcm(unit.segments, round_to)


def _decide(units: list[_Unit], config: PruneConfig,
            counts: list[int] | None = None) -> list[np.ndarray]:
    """The kept channel indices of each unit (sorted), shared by its groups; `counts` (per unit,
    multiples of its step) replace the counts the config asks for."""
    return [_every_piece(unit, _keep(unit, want, config.round_to))
            for unit, want in zip(units, _wanted(units, config) if counts is None else counts)]


def _wanted(units: list[_Unit], config: PruneConfig) -> list[int]:
    """How many channels the config asks each unit to keep, before `_keep` rounds it."""
    if config.global_threshold:
        pooled = []
        for unit in units:  # heads are decided per attention (below)
            s = _unit_scores(unit) if unit.heads is None else np.zeros(1)
            if config.criterion in ("l1", "l2"):
                finite = s[np.isfinite(s)]
                top = finite.max() if finite.size and finite.max() > 0 else 1.0
                s = s / top
            pooled.append(np.repeat(s, unit.size // len(s)) if unit.heads is None else s[:0])
        everything = np.concatenate(pooled)
        cut = int(math.floor(config.ratio * everything.size))
        threshold = np.sort(everything)[cut - 1] if cut > 0 else -np.inf
        wanted = [int((p > threshold).sum()) for p in pooled]
    else:
        wanted = [math.ceil((1 - _unit_ratio(unit, config)) * unit.size) for unit in units]
    for at, unit in enumerate(units):
        if unit.heads is not None:  # "dims": only the dead heads go
            wanted[at] = math.ceil((1 - config.ratio) * unit.size) if config.heads == "heads" \
                else int(np.isfinite(unit.scores[0]).sum())
    return wanted


def _every_piece(unit: _Unit, kept: np.ndarray) -> np.ndarray:
    """Each piece of a refined unit keeps at least one channel, its best: no tensor is left
    without channels."""
    scores = _unit_scores(unit)
    extra = [channels[np.argmax(scores[channels])] for _, channels in unit.pieces
             if not np.isin(channels, kept).any()]
    return np.union1d(kept, extra).astype(kept.dtype) if extra else kept


def _unit_ratio(unit: _Unit, config: PruneConfig) -> float:
    if unit.segments > 1 and config.grouped_ratio is not None:
        return config.grouped_ratio
    return config.ratio


def _unit_scores(unit: _Unit) -> np.ndarray:
    """Per decision item: channels, or whole segments (summed over the unit's groups; a segment
    is dead only when all its channels are)."""
    total = np.sum(unit.scores, axis=0)
    if unit.whole_segments:
        segments = total.reshape(unit.segments, -1)
        finite = np.where(np.isfinite(segments), segments, 0.0).sum(1)
        return np.where(np.isfinite(segments).any(1), finite, -np.inf)
    return total


def _count(unit: _Unit, want: int, round_to: int) -> int:
    """`want` rounded up to the unit's step, at least one step, at most the whole unit: what
    `_keep` keeps before `_every_piece` adds a refined unit's empty pieces back."""
    step = _step(unit, round_to)
    return min(unit.size, max(step, math.ceil(want / step) * step))


def _keep(unit: _Unit, want: int, round_to: int) -> np.ndarray:
    count = _count(unit, want, round_to)
    scores = _unit_scores(unit)
    if unit.whole_segments:
        width = unit.size // unit.segments
        order = np.argsort(-scores, kind="stable")[:count // width]
        return np.concatenate([np.arange(s * width, (s + 1) * width) for s in sorted(order)])
    per = unit.size // unit.segments
    k = count // unit.segments
    kept = []
    for s in range(unit.segments):  # each segment its own top-k
        local = scores[s * per:(s + 1) * per]
        kept.append(s * per + np.sort(np.argsort(-local, kind="stable")[:k]))
    return np.concatenate(kept)


def _prepare(gm: GraphModule, example_input: Tensor | tuple[Tensor, ...], config: PruneConfig):
    """(copy of gm with shapes, its channel graph, units, notes, complexity before, the inputs
    that record its shapes). The copy shares gm's tensors (the resize replaces modules and
    tensors, never writes them); shapes gm has recorded for this input (the canonical pipeline's)
    are reused, not propagated again. A model of several inputs (a class or timestep label beside
    the image) takes a tuple of examples, one per input, or its recorded shapes."""
    gm = copy_module(gm)
    examples = tuple(example_input) if isinstance(example_input, (tuple, list)) \
        else (example_input,)
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    inputs = [node.name for node in placeholders]
    recorded = has_shapes(gm) and next(map(node_shape, placeholders), None)
    if len(examples) > 1 and len(examples) != len(inputs):
        raise PruneError(f"the model takes {len(inputs)} inputs ({', '.join(inputs)}) and prune "
                         f"{len(examples)} examples")
    if len(inputs) > 1 and len(examples) == 1:
        if not recorded:  # labels or a timestep beside the image
            raise PruneError(f"the model takes {len(inputs)} inputs ({', '.join(inputs)}) and "
                             f"prune one example: give one per input (a tuple) or record the "
                             f"shapes of all first (archc.ir.shapes.propagate_shapes)")
        examples = tuple(map(node_value, placeholders))  # meta tensors of the recorded shapes
    elif len(examples) > 1 and not propagate_shapes(gm, examples):
        raise PruneError(f"the model does not run on the examples of its inputs "
                         f"({', '.join(inputs)})")
    if len(examples) > 1:
        shapes = examples
        before = complexity_report(gm).total
    else:
        shapes = (tuple(examples[0].shape),)
        before = complexity_report(
            gm, None if recorded and recorded[1:] == shapes[0][1:] else shapes[0]).total
    cg = analyze_channels(gm)
    notes: list[str] = []
    units = _units(gm, cg, config, notes)
    if not units:
        why = "; ".join(notes) or "no conv or Linear writes a channel group that may change"
        raise PruneError(f"no channel group can be pruned: {why}")
    return gm, cg, units, notes, before, shapes


def head_source(source: Tensor, width: int, kept: Tensor) -> Tensor:
    """The source of a group laid out as heads of `width` channels (head i: channels
    [i width, (i + 1) width)) that keeps the heads `kept`: the entries of its `source` (every
    head's kept dims) in kept heads, s // width in kept."""
    return source[torch.isin(source // width, kept)]


def _sources(cg: ChannelGraph, units: list[_Unit], decisions: list[np.ndarray]) -> Sources:
    """group -> its kept channels (`archc.rewrite.channel_resize` sources without new channels);
    a head split's input or merge's output that loses heads keeps the kept heads' segments of
    its source, a scores group the kept heads."""
    kept_of: dict[int, np.ndarray] = {}
    for unit, kept in zip(units, decisions):
        if unit.heads is not None:
            continue
        for group in unit.groups:
            kept_of[group.index] = kept
        for leaf, channels in unit.pieces:
            kept_of[leaf] = np.flatnonzero(np.isin(channels, kept))
    sources = {index: torch.as_tensor(kept, dtype=torch.long) for index, kept in kept_of.items()}
    removed = [(unit.heads, torch.as_tensor(kept, dtype=torch.long))
               for unit, kept in zip(units, decisions)
               if unit.heads is not None and kept.size < unit.size]
    complete = complete_sources(cg, sources) if removed else {}
    for heads, kept in removed:
        for index in heads.wholes:
            size = cg.groups[index].size
            sources[index] = head_source(complete.get(index, torch.arange(size)),
                                         size // heads.count, kept)
        for index in heads.scores:
            sources[index] = kept
    return sources


def _estimated_macs(gm: GraphModule, cg: ChannelGraph, sources: Sources, before: int) -> int:
    """The pruned model's MACs from the kept counts, without pruning: `before` plus, for every
    conv and Linear that reads or writes a pruned group, its MACs at the kept counts less its
    MACs now (`archc.ir.analysis.module_macs`: the graph's shapes are the unpruned ones, spatial
    sizes do not change). Equal to what `prune` reports."""
    total = before
    for node, module, in_source, out_source in resized_layers(gm, cg, complete_sources(cg,
                                                                                       sources)):
        if not isinstance(module, (*CONV_MODULES, nn.Linear)):
            continue
        groups = resized_groups(module.groups, module.in_channels, module.out_channels,
                                out_source) if isinstance(module, CONV_MODULES) else None
        total += module_macs(module, node, in_channels=len(in_source),
                             out_channels=len(out_source), groups=groups) \
            - module_macs(module, node)
    return total


def prune(gm: GraphModule, example_input: Tensor | tuple[Tensor, ...], config: PruneConfig,
          prepared=None, counts: list[int] | None = None) -> PruneResult:
    """A pruned copy of `gm` (see the module docstring); `gm` is left as it is. `counts`: each
    unit's kept count, in place of the ratio's (`prune_to_macs`'s fill)."""
    gm, cg, units, notes, before, shapes = prepared or _prepare(gm, example_input, config)
    macs_before = module_complexity(gm)
    decisions = _decide(units, config, counts)
    resize_channels(gm, cg, _sources(cg, units, decisions))
    propagate_shapes(gm, shapes)
    after = complexity_report(gm).total
    macs_after = module_complexity(gm)
    changes = []
    for unit, kept in zip(units, decisions):
        policy = "heads" if unit.heads is not None else "norm-groups" \
            if unit.groups[0].norm_groups else "keep-width" if unit.whole_segments \
            else "keep-count" if unit.segments > 1 else "channels"
        for group in unit.groups:
            names = {str(n.target) for n in (*group.producers, *group.consumers,
                                             *group.channelwise) if n.op == "call_module"}
            changes.append(GroupChange(
                group.label(), unit.size if unit.heads else group.size, int(kept.size), policy,
                sum(macs_before[n].flops for n in names), sum(macs_after[n].flops for n in names),
                sum(macs_before[n].params for n in names),
                sum(macs_after[n].params for n in names)))
    return PruneResult(gm.eval(), (before.params, after.params), (before.flops, after.flops),
                       changes, notes)


def prune_to_macs(gm: GraphModule, example_input: Tensor | tuple[Tensor, ...], target: float,
                  make_config: Callable[[float], PruneConfig], steps: int = 12) -> PruneResult:
    """Bisect the ratio so that the pruned model has at most `target` (a fraction) of the MACs,
    as close as the steps allow; the result with the largest MACs not above the target. The
    search counts MACs from the kept channel counts (`_estimated_macs`); only the chosen ratio
    is pruned.

    Per layer, the groups of grouped convs keep counts in steps of their segment count, so one
    ratio for all can stop well below the target (the next step is above it). The grouped
    groups then keep the ratio found, and a second bisection lowers the other groups' ratio to
    fill up to the target.

    With `round_to` > 1 every count moves in steps of `round_to`, and one ratio moves the steps of
    all groups at once (a 16-channel group keeps 16 or 8, a 32 one 32, 24, 16 or 8, all crossing
    at the same ratios), so the largest fitting ratio can stop far below the target (a timm-style
    stage: 30% of the MACs for a target of 50%). The counts found are then filled up one step at
    a time (`_fill_counts`): the units keeping the smallest fraction of their cap grow first,
    units of one size, count and cap together (the blocks of a stage stay alike), as long as the
    MACs stay within the target. A unit's cap is the count the same search without rounding
    gives it, rounded up to its step: no group keeps more than one step above the unrounded
    pruning (filling by fraction alone gave a ResNeXt stage's 16-channel groups all 16 channels
    where the unrounded pruning keeps 8, and the model 9% more ORT time than the unrounded
    one)."""
    if not 0 < target < 1:
        raise PruneError(f"the MACs target must be a fraction in (0, 1), not {target}")
    prepared = _prepare(gm, example_input, make_config(0.5))
    copy_, cg, units, notes, before, _ = prepared

    def fits(config: PruneConfig) -> bool:
        sources = _sources(cg, units, _decide(units, config))
        return _estimated_macs(copy_, cg, sources, before.flops) <= target * before.flops

    def search(make: Callable[[float], PruneConfig]) -> tuple[PruneConfig, str | None]:
        best = _smallest_fitting_ratio(lambda r: fits(make(r)), 0.0, 0.99, steps)
        if best is None:
            sources = _sources(cg, units, _decide(units, make(0.99)))
            fraction = _estimated_macs(copy_, cg, sources, before.flops) / before.flops
            raise PruneError(f"cannot reach {100 * target:.0f}% of the MACs: at ratio 0.99 the "
                             f"pruned model keeps {100 * fraction:.1f}% (its other channels are "
                             f"fixed)")
        config = make(best)
        grouped = {unit.segments > 1 for unit in units}
        if not config.global_threshold and grouped == {False, True}:
            refill = _smallest_fitting_ratio(
                lambda r: fits(replace(make(r), grouped_ratio=best)), 0.0, best, steps)
            if refill is not None and refill < best:
                return (replace(make(refill), grouped_ratio=best),
                        f"ratio {refill:.3f}; the groups of grouped convs {best:.3f} (their "
                        f"kept counts move in whole steps)")
        return config, None

    config, note = search(make_config)
    notes += [note] if note else []
    counts = None
    if config.round_to > 1 and not config.global_threshold:
        unrounded, _ = search(lambda r: replace(make_config(r), round_to=1))
        steps_ = [_step(unit, config.round_to) for unit in units]
        start = [_count(unit, want, config.round_to)
                 for unit, want in zip(units, _wanted(units, config))]
        # a unit's cap: its unrounded count rounded up; heads stay as the config decides them
        caps = [count if unit.heads is not None else _count(unit, want, config.round_to)
                for unit, count, want in zip(units, start, _wanted(units, unrounded))]
        start = [min(count, cap) for count, cap in zip(start, caps)]

        def fits_counts(counts: list[int]) -> bool:
            sources = _sources(cg, units, _decide(units, config, counts))
            return _estimated_macs(copy_, cg, sources, before.flops) <= target * before.flops

        alike: dict[tuple, list[int]] = {}
        for i, (unit, count, cap) in enumerate(zip(units, start, caps)):
            alike.setdefault((unit.size, count, cap, unit.segments, unit.whole_segments),
                             []).append(i)
        counts = _fill_counts(caps, start, steps_, list(alike.values()), fits_counts)
        grown = sum(c != s for c, s in zip(counts, start))
        if grown:
            notes.append(f"round-to {config.round_to}: {grown} of {len(units)} groups kept one "
                         f"or more steps more than the ratio's count, filling up to the target")
    return prune(gm, example_input, config, prepared, counts)


def _fill_counts(sizes: list[int], counts: list[int], steps: list[int],
                 together: list[list[int]], fits: Callable[[list[int]], bool]) -> list[int]:
    """Grow the kept counts one step at a time while `fits`, each up to at most its `sizes`
    entry (`prune_to_macs`: the unrounded count rounded up). The units of a set in `together`
    (a partition of the indices) grow together, so units alike before the fill stay alike (the
    blocks of a stage: the result keeps a spec); always the set keeping the smallest fraction
    count / size (ties: the earlier set) among those that can still grow. A set whose next step
    does not fit never will (the MACs only grow as counts grow), so it stops there. Each count
    stays a multiple of its step or its unit's whole size."""
    counts = list(counts)
    open_ = {k for k, members in enumerate(together)
             if any(counts[i] < sizes[i] for i in members)}
    while open_:
        k = min(open_, key=lambda j: (min(counts[i] / sizes[i] for i in together[j]), j))
        trial = list(counts)
        for i in together[k]:
            trial[i] = min(sizes[i], counts[i] + steps[i])
        if fits(trial):
            counts = trial
            if all(counts[i] == sizes[i] for i in together[k]):
                open_.discard(k)
        else:
            open_.discard(k)
    return counts


def _smallest_fitting_ratio(fits: Callable[[float], bool], low: float, high: float,
                            steps: int) -> float | None:
    """Bisection for the smallest ratio in (low, high] that `fits` (fewer channels fit more
    easily); None if not even `high` fits."""
    if not fits(high):
        return None
    for _ in range(steps):
        ratio = (low + high) / 2
        if fits(ratio):
            high = ratio
        else:
            low = ratio
    return high
