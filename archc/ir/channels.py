"""Channel-dependency analysis: which channel dimensions of an FX graph must change together.

Every tensor of rank >= 2 has a *channel space* on one dim: dim 1 (the C of [N, C, H, W], the
features F of [N, F]) unless an op moved it (`archc.ir.channel_dims`: a permute to NHWC puts it
last, `flatten(2).transpose(1, 2)` makes tokens [N, L, C]); `ChannelGraph.dims` records where. The
analysis partitions the spaces into `ChannelGroup`s: sets of dimensions that must keep one size
and one channel order, so that pruning or padding edits a whole group at once.

- Ties (one group): an elementwise op ties its result to every operand with the same channel
  count, `y = relu(x)`, `y = a + b` (a residual add ties both branches), `y = x * g` with the SE
  gate `g` of shape [N, C, 1, 1]; an operand of size 1 on dim 1 broadcasts and is not tied. So do
  BN, pooling, dropout, casts, permutes, reshapes that keep the channel dim whole
  (`flatten(x, 1)` of an [N, C, 1, 1] tensor, which ties conv channels to a Linear's
  in-features), reductions and softmax over other dims, and a depthwise conv (groups = C_in =
  C_out: channel c only reads channel c). Operands of one rank must hold their channels on the
  same dim.
- Producers and consumers: a conv (channels on dim 1) or Linear (channels last: [N, F],
  channels-last [N, H, W, C], tokens [N, L, C]) *produces* its output's group (rows `W[o]`,
  `b[o]`) and *consumes* its input's group (columns `W[:, i]`); the two groups are independent.
  BN, GroupNorm, PReLU with a slope per channel, depthwise convs and a LayerNorm over the
  channels alone are `channelwise` members (per-channel parameters in the group's order), and so
  is an elementwise op reading a per-channel constant (`constants`: a layer scale, a bare
  [1, C, 1, 1] parameter, a position embedding [1, C, H, W], or a [C] vector through views adding
  size-1 dims, on whichever dim holds the channels). A LayerNorm's statistics span the group
  (`normalized`: no removal there is exact), and so do a mean or variance over the channel dim
  with keepdim (a LayerNorm written out by hand; their one-channel result is `STATISTIC`); a
  GroupNorm's group count goes to `norm_groups`: its group changes by whole norm groups only.
  BN, GroupNorm, PReLU, pixel shuffles and convs read their channels on dim 1. An nn.Embedding
  (a class or timestep label: `h + emb(y)[:, :, None, None]`, a conditional norm's
  `gamma = emb(y)`) is a channelwise member of its result's group (the columns of its weight
  [num, C], the result's last dim); its integer indices carry no channels and tie nothing.
- Attention: a reshape splitting the channels into heads, [.., h d, ..] -> [.., h, d, ..] (or
  over several dims, [.., 3 h d] -> [.., 3, h, d]), makes its input h lockstep segments of its
  result's group (every head keeps the same dims, as a shuffle's input below); merging heads
  back is the reverse (never into the batch dim); `unbind` of another dim ties its pieces.
  A channel count read from a tensor (`B, C, H, W = x.shape`) that reshapes alone take, as
  their own channel count, ties the tensor to their results. `q @ k.T` ties q's and k's channels
  (they are contracted) and writes scores without channels (`HEADS`); `scores @ v` keeps v's;
  in linear attention `k.T @ v` keeps v's with k's as its rows and `q @ kv` ties q to them. A
  constant pad of the channel dim adds fixed pieces (`PADDED`). Literal channel counts in
  reshapes are recorded (`ChannelGraph.sizes`) and rewritten by a resize. Whole heads are units
  too (`ChannelGraph.heads`, one `Heads` per attention): the head splits and merges whose
  lockstep groups the products link (q, k, v and the scores of one attention), the scores
  groups (one channel a head; a per-head constant, a scale [h, 1, 1] or LeViT's
  `attention_biases[:, idxs]` of shape [h, N], is a channelwise member) and the place of each
  split's literal head count; removing head i removes segment i of every split and merge and
  channel i of the scores. Heads stay whole (`Heads.fixed`) where a head count is computed
  (`HEAD_COUNT`) or an op inside the attention reads a constant not per head (`HEAD_CONSTANT`).
- Composites: `cat(dim=1)` makes its result's group the concatenation of its inputs' groups
  (`parts`); a split, chunk or slice on dim 1 makes its input's group the concatenation of the
  pieces. Two layouts of one group with the same parts identify their pieces (`cat([a, b])` split
  at the same point gives back a and b); of two concatenations, one whose boundaries are all the
  other's is cut by it (heads concatenated, then split into heads again); other concatenations
  with different boundaries conflict.
- Pixel shuffles: y = pixel_shuffle(x, r) reads channels c r² .. c r² + r² - 1 of x for its
  channel c, so x interleaves r² copies of y's group (parts (y, k, stride r²)); pixel_unshuffle
  the reverse. Removing a channel of the coarse side removes its block of r² on the fine side.
- Channel shuffles (`archc.ir.shuffles`, every spelling): y = shuffle(x, g) on C = g m channels
  sends x's channel i m + j to y's j g + i. x is the concatenation of g segments of one new
  group Q (lockstep: pruning keeps the same indices K in every segment; the pruned shuffle of
  g |K| channels then sends segment i's t-th kept channel to t g + i, which is original channel
  K[t] g + i, in order), and y interleaves Q: parts (Q, offset i, stride g). A cut of an
  interleave at [p, q) takes, of each part (Q, o, s), the channels t with p <= o + s t < q: the
  analysis cuts Q into pieces where needed (Q is `refined`) and the cut piece interleaves them.
- Grouped convs: a conv with g groups (not depthwise) reads g equal segments of its input group
  and writes g equal segments of its output group; `groups` lists these g, and a new size must
  stay divisible by `divisor = lcm(groups)` with every segment changed alike. On a composite
  whose leaves fall into g equal runs (EfficientViT's 1x1 conv with a group per q, k or v of a
  head) the leaves at one place in every run are tied, so each conv group keeps as many.
- Fixed: a group whose size cannot change carries the reason in `fixed`: model inputs and outputs,
  an op the analysis does not model (the conservative default: anything unknown fixes every
  channel space it touches), a graph that reads or computes the channel count (`x.size(1)`,
  `view(n, 2 * n)`; the size reads inside a shuffle's spelling are part of it), a reshape that
  merges or splits the channel dim other than into heads and is not a shuffle, a shuffle whose
  group count is computed in the graph or whose reshape hard-codes a channel-dependent size, a
  module called twice, conflicting layouts, a grouped conv on a composite that its groups cut
  otherwise (ShuffleNetV1's grouped 1x1 conv reading its shuffle's output), a GroupNorm of a
  composite (its norm groups need not line up with the parts). A fixed composite fixes its
  parts; a fixed part leaves its composite free.

Usage::

    graph = analyze_channels(gm, (torch.randn(1, 3, 64, 64),))
    for group in graph.groups:
        print(group)  # g3 24 ch, grouped 3; producers s1.b1.f.a.conv; consumers s1.b1.f.b.conv
    graph.of(node)  # the group of a tensor node's channel dim (graph.dim(node))

`analyze_channels` reads the shapes recorded by `archc.ir.shapes` (propagating them first when
given example inputs).
"""

from __future__ import annotations

import builtins
import math
import operator
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from networkx.utils import UnionFind
from torch import Tensor, nn
from torch.fx import GraphModule, Node
from torch.fx.node import map_aggregate

from archc.ir.channel_dims import (
    head_split,
    index_items,
    index_place,
    normal_dim,
    permuted_dim,
    reduced_dim,
    reshaped_dim,
    transposed_dim,
)
from archc.ir.graph import ALIASES, arg, called_once, describe, module_aliases
from archc.ir.ops import (
    ACTIVATION_FUNCTIONS,
    ACTIVATION_METHODS,
    ACTIVATION_MODULES,
    AVG_POOL_MODULES,
    BN_MODULES,
    CONV_MODULES,
    MAX_POOL_MODULES,
    RESHAPES,
    node_target,
    op_kind,
    reshape_sizes,
)
from archc.ir.shapes import node_shape, propagate_shapes
from archc.ir.shuffles import SIZE_ARITHMETIC, Shuffle, find_shuffles, follows_channels

# A composite's pieces: (whole space, ((space, offset, stride, size), ...)), see `Part`.
_Layout = tuple[int, tuple[tuple[int, int, int, int], ...]]

# Why a group is fixed, most telling first (a group shows the first that applies).
MODEL_INPUT = "model input: its channels are fixed"
MODEL_OUTPUT = "model output: its channels are fixed"
MOVES_CHANNELS = "a reshape or permute moves the channel dimension (not a recognized shuffle)"
SHUFFLE_GROUPS = "a channel shuffle's group count is computed in the graph"
SHUFFLE_SIZES = "a channel shuffle's reshape hard-codes the channel count"
SHARED_MODULE = "a module called more than once reads or writes these channels"
SEGMENT_CONFLICT = "concatenated or split with different segment boundaries"
GROUPED_PARTS = "a grouped conv reads or writes a concatenated or split group"
SIZE_READ = "the graph reads or hard-codes this channel count (size(1), shape[1], view)"
NORM_PARTS = "a GroupNorm normalizes a concatenated, split or shuffled group"
UNSUPPORTED = "an op the channel analysis does not model touches these channels"
HEADS = "attention scores: one per head (pruned by whole heads only, `ChannelGraph.heads`)"
HEAD_COUNT = "the graph computes a head count, or splits the heads over several dims"
HEAD_CONSTANT = "a constant read inside the attention is not indexed by its heads"
HEAD_GROUPED = "a grouped conv reads or writes the heads' channels in groups of its own"
PADDED = "constant channels a pad adds"
STATISTIC = "a mean or variance over the channels: one value per position"
_PRIORITY = (MODEL_INPUT, MODEL_OUTPUT, MOVES_CHANNELS, SHUFFLE_GROUPS, SHUFFLE_SIZES,
             SHARED_MODULE, SEGMENT_CONFLICT, GROUPED_PARTS, NORM_PARTS, SIZE_READ, HEAD_COUNT,
             HEAD_CONSTANT, HEAD_GROUPED, HEADS, PADDED, STATISTIC, UNSUPPORTED)

# Ops that map channel c of every operand to channel c of the result; modules by exact type (a
# subclass may compute something else).
_ELEMENTWISE = {
    *ACTIVATION_MODULES, *ACTIVATION_FUNCTIONS, *ACTIVATION_METHODS, *MAX_POOL_MODULES,
    *AVG_POOL_MODULES, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample,
    operator.add, operator.sub, operator.mul, operator.iadd, operator.isub, operator.imul,
    operator.neg, torch.add, torch.sub, torch.mul, torch.neg, torch.clamp, F.dropout,
    operator.pow, torch.pow, torch.sqrt, torch.rsqrt, "pow", "sqrt", "rsqrt",
    F.dropout1d, F.dropout2d, F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.interpolate,
    "add", "sub", "mul", "add_", "sub_", "mul_", "neg", "relu_", "clamp", "clamp_min",
    "contiguous", "clone", "detach", "float", "double", "half", "bfloat16", "to",
}
# elementwise ops whose per-channel constant operand is pruned with the channels
_SCALE_OR_SHIFT = {
    **dict.fromkeys((operator.mul, operator.imul, torch.mul, "mul", "mul_"), "scale"),
    **dict.fromkeys((operator.add, operator.sub, operator.iadd, operator.isub, torch.add,
                     torch.sub, "add", "sub", "add_", "sub_"), "shift"),
}
# reductions that, over the channels with keepdim, are a norm's statistics (`statistic`)
_STATISTICS = (torch.mean, "mean", torch.var, "var", torch.std, "std")
_HARMLESS_ATTRIBUTES = {"dtype", "device", "ndim", "is_cuda", "layout"}
# shape-only views a per-channel constant may pass through (`gamma.view(1, -1, 1, 1)`)
_CONSTANT_VIEWS = {*RESHAPES, torch.unsqueeze, torch.squeeze, torch.flatten, "unsqueeze",
                   "squeeze", "flatten", operator.getitem}

# op kind -> the _Builder method that handles it (anything else: `unsupported`)
_RULES: dict[object, str] = {
    **dict.fromkeys(_ELEMENTWISE, "elementwise"),
    **dict.fromkeys((operator.truediv, torch.div, "div"), "division"),
    **dict.fromkeys(CONV_MODULES, "conv"),
    nn.Linear: "linear",
    **dict.fromkeys(BN_MODULES, "batch_norm"),
    nn.LayerNorm: "layer_norm",
    nn.GroupNorm: "group_norm",
    **dict.fromkeys((nn.PReLU, F.prelu), "prelu"),
    nn.Embedding: "embedding",
    **dict.fromkeys((nn.PixelShuffle, nn.PixelUnshuffle, F.pixel_shuffle, F.pixel_unshuffle),
                    "pixel_shuffle"),
    **dict.fromkeys((torch.cat, torch.concat, torch.concatenate), "cat"),
    **dict.fromkeys((torch.split, torch.chunk, "split", "chunk"), "split"),
    **dict.fromkeys((torch.unbind, "unbind", torch.ops.aten.unbind.int), "unbind"),
    operator.getitem: "getitem",
    **dict.fromkeys((nn.Flatten, torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze,
                     "view", "reshape", "flatten", "squeeze", "unsqueeze", "reshape_as",
                     torch.Tensor.reshape_as), "reshape"),
    **dict.fromkeys((operator.matmul, torch.matmul, "matmul"), "matmul"),
    **dict.fromkeys((nn.Softmax, F.softmax, torch.softmax, "softmax"), "softmax"),
    **dict.fromkeys((F.pad, torch.constant_pad_nd), "pad"),
    **dict.fromkeys((torch.transpose, torch.permute, "transpose", "permute"), "transpose"),
    **dict.fromkeys((nn.ChannelShuffle, torch.channel_shuffle, torch.native_channel_shuffle,
                     F.channel_shuffle), "shuffle"),
    **dict.fromkeys((torch.mean, torch.sum, torch.amax, torch.amin, torch.var, torch.std, "mean",
                     "sum", "amax", "amin", "var", "std"), "reduction"),
    **dict.fromkeys((builtins.getattr, "size", "dim"), "metadata"),
}


@dataclass(frozen=True)
class Part:
    """A piece of a composite group: its channel offset + stride t is channel t of group `group`
    (t < size). A concatenation's parts have stride 1; a shuffle's output interleaves g parts."""

    group: int
    offset: int
    size: int
    stride: int = 1

    def positions(self) -> range:
        return range(self.offset, self.offset + self.stride * self.size, self.stride)


@dataclass(frozen=True)
class Heads:
    """The heads of one attention, removable as units: head i is segment i of every group in
    `wholes` (a head split's input, a head merge's output: `count` lockstep segments of the head
    dims) and channel i of every group in `scores` (dim 1 of `q @ k.T`)."""

    count: int
    wholes: tuple[int, ...]
    scores: tuple[int, ...]
    pieces: tuple[int, ...]  # the leaf groups inside one head (its head dims)
    literals: tuple[tuple[Node, int], ...]  # head split -> the place of its literal head count
    fixed: str = ""  # why the heads cannot be removed; "" if they can


@dataclass(frozen=True)
class ChannelGroup:
    """Channel dimensions that must keep one size and one order (see the module docstring)."""

    index: int
    size: int
    tensors: tuple[Node, ...]  # nodes whose result has this group as dim 1 (graph order)
    producers: tuple[Node, ...]  # define the channels: conv/Linear outputs, inputs, opaque ops
    consumers: tuple[Node, ...]  # conv/Linear layers reading them as input channels
    channelwise: tuple[Node, ...]  # per-channel parameters on the way: BN, LayerNorm, depthwise
    # LayerNorms whose statistics span these channels (removing any channel changes them)
    normalized: tuple[Node, ...] = ()
    groups: tuple[int, ...] = ()  # group counts g of grouped convs reading or writing it
    norm_groups: int = 0  # its GroupNorms' group count: prunable by whole groups only; 0: none
    parts: tuple[Part, ...] = ()  # a composite's segments in channel order; () for a leaf
    fixed: str = ""  # why the size cannot change; "" if it can
    refined: bool = False  # its parts are pieces of one channel space that the analysis cut

    @property
    def divisor(self) -> int:
        """A new size must be a multiple of this (equal segments for every grouped conv)."""
        return math.lcm(*self.groups) if self.groups else 1

    def label(self) -> str:
        """A short readable name: its first producer, else its first tensor."""
        nodes = self.producers or self.tensors
        return describe(nodes[0]) if nodes else f"g{self.index}"

    def __str__(self) -> str:
        text = f"g{self.index} {self.size} ch"
        if self.groups:
            text += f", grouped {'/'.join(map(str, self.groups))}"
        if self.norm_groups:
            text += f", {self.norm_groups} norm groups"
        if self.parts:
            text += " = " + " + ".join(
                f"g{p.group}" + (f"[{p.offset}::{p.stride}]" if p.stride > 1 else "")
                for p in self.parts)
        for role in ("producers", "consumers", "channelwise", "normalized"):
            nodes = getattr(self, role)
            if nodes:
                text += f"; {role} {', '.join(describe(n) for n in nodes)}"
        return text + (f"; fixed: {self.fixed}" if self.fixed else "")


@dataclass
class ChannelGraph:
    """The groups of one graph and the group of every tensor node."""

    groups: list[ChannelGroup]
    index: dict[Node, int]  # channel tensor node (not inside a shuffle) -> index into `groups`
    # channel tensor node -> the dim holding its channels, where not 1 (a permute moved them)
    dims: dict[Node, int] = field(default_factory=dict)
    cuts: dict[Node, int] = field(default_factory=dict)  # split/chunk/slice node -> cut group
    # elementwise node -> the per-channel constants it reads: (parameter/buffer name, its dim
    # along the channels, "scale" or "shift"), e.g. a layer scale `x * gamma`, gamma [C, 1, 1]
    constants: dict[Node, tuple[tuple[str, int, str], ...]] = field(default_factory=dict)
    # reshape node -> the place in its sizes of a literal channel count (its result's channels)
    sizes: dict[Node, int] = field(default_factory=dict)
    heads: list[Heads] = field(default_factory=list)  # attention heads, units of their own

    def of(self, node: Node) -> ChannelGroup:
        return self.groups[self.index[node]]

    def dim(self, node: Node) -> int:
        """The dim of `node`'s result that holds its channels."""
        return self.dims.get(node, 1)

    def leaves(self, group: ChannelGroup) -> list[ChannelGroup]:
        """The non-composite groups a group is made of (itself if it is a leaf)."""
        if not group.parts:
            return [group]
        return [leaf for p in group.parts for leaf in self.leaves(self.groups[p.group])]

    def shuffled(self) -> set[int]:
        """The groups a channel shuffle reorders: its output and the cuts of it (composites with
        strided parts) and every group they are made of (its input's lockstep group too)."""
        found: set[int] = set()

        def below(group: ChannelGroup) -> None:
            for part in group.parts:
                if part.group not in found:
                    found.add(part.group)
                    below(self.groups[part.group])

        for group in self.groups:
            if any(p.stride > 1 for p in group.parts):
                found.add(group.index)
                below(group)
        return found

    def format(self) -> str:
        return "\n".join(map(str, self.groups))

    __str__ = format


def analyze_channels(gm: GraphModule, example_inputs: tuple[Tensor, ...] | None = None
                     ) -> ChannelGraph:
    """The channel groups of `gm`, from its recorded shapes (propagated first for
    `example_inputs`, if given)."""
    if example_inputs is not None:
        propagate_shapes(gm, tuple(example_inputs))
    builder = _Builder(gm)
    known = ALIASES in gm.meta  # `called_once` of every module call reads the aliases: once
    if not known:
        gm.meta[ALIASES] = module_aliases(gm)
    try:
        for node in gm.graph.nodes:
            builder.visit(node)
    finally:
        if not known:
            gm.meta.pop(ALIASES, None)
    return builder.finish()


def channel_groups(gm: GraphModule, example_inputs: tuple[Tensor, ...] | None = None
                   ) -> list[ChannelGroup]:
    """The channel groups of `gm`; `analyze_channels` also maps nodes to groups."""
    return analyze_channels(gm, example_inputs).groups


def _channel_shape(value) -> tuple[int, ...] | None:
    shape = node_shape(value) if isinstance(value, Node) else None
    return shape if shape is not None and len(shape) >= 2 else None


def _priority(reason: str) -> int:
    return next(i for i, known in enumerate(_PRIORITY) if reason.startswith(known))


def _node_args(node: Node) -> list[Node]:
    found: list[Node] = []
    map_aggregate((node.args, node.kwargs), lambda a: found.append(a) if isinstance(a, Node) else a)
    return found


class _Builder:
    """Union-find over channel spaces (one per channel tensor, plus unnamed split pieces)."""

    def __init__(self, gm: GraphModule):
        self.gm = gm
        self.uf = UnionFind()
        self.space: dict[Node, int] = {}  # channel tensor -> its space
        self.dims: dict[Node, int] = {}  # channel tensor -> its channel dim, where not 1
        self.size: list[int] = []  # space -> channel count
        self.reasons: list[tuple[int, str]] = []  # (space, reason)
        self.layouts: list[_Layout] = []  # how composites are made of pieces
        self.active: list[_Layout] = []  # the layouts still to unify (`unify_layouts`)
        self.refined: list[int] = []  # leaves `restrict` cut into pieces
        self.done: set[Node] = set()  # nodes handled by another node's rule (split getitems)
        self.shuffles: dict[Node, tuple[Shuffle, str]] = {}  # output -> (it, why refused or "")
        self.shuffled: dict[Node, Shuffle] = {}  # every node of an accepted shuffle
        for shuffle in find_shuffles(gm).values():
            self.done.update(shuffle.nodes[:-1])
            reason = SHUFFLE_GROUPS if shuffle.groups is None else (
                "" if follows_channels(shuffle) else SHUFFLE_SIZES)
            self.shuffles[shuffle.output] = (shuffle, reason)
            if not reason:
                self.shuffled.update(dict.fromkeys(shuffle.nodes, shuffle))
        self.grouped: list[tuple[int, int]] = []  # (space, g)
        self.grouped_convs: list[Node] = []  # the convs of `grouped`, in graph order
        self.normed: list[tuple[int, int]] = []  # (space, a GroupNorm's group count)
        # end of a view chain from a constant -> (the get_attr, the chain's nodes): see
        # `constant_chain`; the chain's nodes are left to the op reading its end
        self.chains: dict[Node, tuple[Node, list[Node]]] = {}
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                chain = self.constant_chain(node)
                if chain:
                    self.chains[chain[-1]] = (node, chain)
                    self.done.update(chain)
        self.roles: dict[str, list[tuple[int, Node]]] = {
            "producers": [], "consumers": [], "channelwise": [], "normalized": []}
        self.cuts: dict[Node, int] = {}  # split/chunk/slice node -> the space it cuts
        self.unread: list[Node] = []  # constants not (yet) read as per-channel constants
        self.constants: dict[Node, list[tuple[str, int, str]]] = {}  # ChannelGraph.constants
        self.sizes: dict[Node, int] = {}  # ChannelGraph.sizes
        # `k.T @ v`: its rows are k's channels, its channel dim v's -> the space of the rows
        self.rows: dict[Node, int] = {}
        # head splits and merges: (reshape, whole space, lockstep space, heads, the place of a
        # literal head count, -1 if none, None if computed); products of one attention: (scores
        # space, q's or v's space)
        self.head_reshapes: list[tuple[Node, int, int, int, int | None]] = []
        self.head_links: list[tuple[int, int]] = []
        # `table[:, idxs]` (LeViT's attention biases [h, N] gathered by a buffer of indices) ->
        # the table, read per head by the one shift using it (`per_channel_constant`)
        self.tables: dict[Node, Node] = {}
        for node in gm.graph.nodes:
            table = _head_table(node)
            if table is not None:
                self.tables[node] = table
                self.done.update((node, table, *_node_args(node)))
        # a read channel count (`C` of `B, C, H, W = x.shape`) that only reshapes use -> x;
        # `reshape` ties x to those that request it as their own channel count (`read_sizes`)
        self.read: dict[Node, Node] = {}
        self.read_by: dict[Node, int] = {}  # such a read -> how many reshapes took it so

    # ---- spaces ----

    def new_space(self, size: int) -> int:
        self.size.append(size)
        space = len(self.size) - 1
        self.uf[space]  # noqa: B018 - registers the element
        return space

    def dim(self, node: Node) -> int:
        """The dim of a tensor node's result holding its channels (1 unless a rule moved them)."""
        return self.dims.get(node, 1)

    def channels(self, node) -> int | None:
        """The channel count of a tensor node of rank >= 2 (None for anything else)."""
        shape = _channel_shape(node)
        return shape[self.dim(node)] if shape is not None and self.dim(node) < len(shape) \
            else None

    def of(self, node: Node) -> int:
        if node not in self.space:
            self.space[node] = self.new_space(self.channels(node))
        return self.space[node]

    def tie(self, a: Node | int, b: Node | int) -> None:
        a = self.of(a) if isinstance(a, Node) else a
        b = self.of(b) if isinstance(b, Node) else b
        assert self.size[a] == self.size[b], "tied spaces of different sizes"
        self.uf.union(a, b)

    def fix(self, nodes: Iterable[Node], reason: str) -> None:
        for node in nodes:
            if self.channels(node) is not None:
                self.reasons.append((self.of(node), reason))

    def role(self, role: str, node: Node, tensor: Node) -> None:
        self.roles[role].append((self.of(tensor), node))

    def opaque(self, node: Node, reason: str) -> None:
        """Fix every channel tensor `node` reads or writes; its result's channels are its own."""
        self.fix([*_node_args(node), node], reason)
        if self.channels(node) is not None:
            self.role("producers", node, node)

    def unsupported(self, node: Node, what: str = "") -> None:
        """Fix what `node` touches, the reason naming the op: `...: Unfold (unfold)`,
        `...: aten.roll.default (roll)`, or what about it is not modelled, `...: reduction over
        the channels (Tensor.sum at sum_1)`."""
        target = node_target(self.gm, node)
        op = str(target) if isinstance(target, torch._ops.OpOverload) else op_kind(self.gm, node)
        self.opaque(node, f"{UNSUPPORTED}: {what} ({op} at {node.name})" if what else
                    f"{UNSUPPORTED}: {op} ({node.name})")

    # ---- rules, one per kind of op ----

    def visit(self, node: Node) -> None:
        if node in self.done:
            return
        if node.op in ("call_module", "call_function", "call_method"):
            self.visit_call(node, node_target(self.gm, node))
        elif node.op == "placeholder":
            if _channel_shape(node) is not None:
                self.role("producers", node, node)
            self.fix([node], MODEL_INPUT)
        elif node.op == "output":
            self.fix(_node_args(node), MODEL_OUTPUT)
        elif node.op == "get_attr":
            self.unread.append(node)  # fixed in `finish` unless an op reads it per channel
        if node.op not in ("output", "get_attr") and self.channels(node) is not None:
            self.of(node)  # every channel tensor has a group (a constant's: if not read per
            # channel, in `finish`)

    def visit_call(self, node: Node, target) -> None:
        if node in self.shuffles:
            return self.shuffle(node, target)
        try:
            rule = _RULES.get(target)
        except TypeError:  # an unhashable target
            rule = None
        if rule is not None:
            getattr(self, rule)(node, target)
        elif _channel_shape(node) is not None or any(map(_channel_shape, _node_args(node))):
            self.unsupported(node)

    def same_dim(self, node: Node, inputs: list[Node]) -> bool:
        """Give `node` the channel dim its channel tensor `inputs` share; False if they differ."""
        dims = {self.dim(x) for x in inputs if x in self.space or x.op != "get_attr"}
        if len(dims) > 1:
            return False
        if dims and dims != {1}:
            self.dims[node] = dims.pop()
        return True

    def elementwise(self, node: Node, target=None) -> None:
        out = _channel_shape(node)
        operands = [a for a in _node_args(node) if node_shape(a) is not None]
        if out is None:
            if any(map(_channel_shape, operands)):
                self.unsupported(node)
            return
        full = [a for a in operands if len(node_shape(a)) == len(out) and a not in self.chains
                and (a.op != "get_attr" or a in self.space)]
        if not self.same_dim(node, full):
            return self.unsupported(node, "operands with their channels on different dims")
        c = self.dim(node)
        self.of(node)
        for operand in operands:
            shape = node_shape(operand)
            lead = len(out) - len(shape)  # broadcasting aligns trailing dims
            if lead < 0:
                return self.unsupported(node, "broadcast to a lower rank")
            position = c - lead  # the operand's dim that lines up with the result's channels
            if position < 0 or shape[position] != out[c]:
                continue  # no channel dim, or size 1 broadcast over the channels
            if self.per_channel_constant(node, operand, position):
                continue
            if operand in self.chains:  # a view of a constant this op does not read per channel
                self.unsupported(operand, "constant tensor")
            if operand in self.tables:
                self.unsupported(operand, "indexing")
            if lead == 0:
                if operand not in self.space and position != 1:  # a constant read whole
                    self.dims[operand] = position
                self.tie(operand, node)
            elif out[c] != 1:
                return self.unsupported(node, "per-channel operand of a lower rank")

    def per_channel_constant(self, node: Node, operand: Node, position: int) -> bool:
        """Whether `operand` is a constant scaling or shifting each channel of `node`, read by
        this op alone: a layer scale `x * gamma` (gamma [C, 1, 1], or [C] on channels last, or a
        bare [1, C, 1, 1] parameter), a bias `x + b`, a learned position embedding `x + pos` (pos
        [1, C, H, W]), or such a constant reached through views that only add or drop dims of
        size 1 (`gamma.view(1, -1, 1, 1)`, `constant_chain`). `position` is the operand's dim that
        lines up with `node`'s channel dim. It is then a channelwise member, pruned with the
        channels (along the constant's own channel dim)."""
        kind = _SCALE_OR_SHIFT.get(node_target(self.gm, node))
        if operand in self.tables:  # a table of one row per channel, gathered along its rows
            if kind is None or position != 0:
                return False
            operand = self.tables[operand]
        elif operand in self.chains:
            constant, _ = self.chains[operand]
            shape = node_shape(operand)
            if kind is None or any(n != 1 for d, n in enumerate(shape) if d != position):
                return False
            position = next(d for d, n in enumerate(node_shape(constant)) if n != 1)
            operand = constant
        elif operand.op != "get_attr" or kind is None or len(operand.users) != 1:
            return False
        if operand in self.unread:
            self.unread.remove(operand)
        self.constants.setdefault(node, []).append((str(operand.target), position, kind))
        self.role("channelwise", node, node)
        return True

    def constant_chain(self, constant: Node) -> list[Node]:
        """The views a constant with one dim of size > 1 passes through, one user each, to an
        elementwise scale or shift (`[gamma.view(1, -1, 1, 1)]`); [] if it does not. A view keeps
        the constant's channels in order and may not hard-code their count (sizes 1 and -1 only;
        indexing by `None` and full slices only)."""
        shape = node_shape(constant)
        if shape is None or sum(n != 1 for n in shape) != 1:
            return []
        chain, node = [], constant
        while len(node.users) == 1:
            user = next(iter(user for user in node.users))
            target = node_target(self.gm, user)
            if target in _SCALE_OR_SHIFT:
                return chain
            if target not in _CONSTANT_VIEWS or user.args[:1] != (node,) \
                    or not _only_views(user, target):
                return []
            chain.append(user)
            node = user
        return []

    def division(self, node: Node, target) -> None:
        divisor = arg(node, 1, "other")
        if isinstance(divisor, Node) and (self.channels(divisor) or 1) > 1:
            return self.unsupported(node, "division by a tensor")  # padded channels: 0 / 0
        self.elementwise(node)

    def channelwise(self, node: Node, target=None) -> None:
        """A module with per-channel parameters that maps channel c to channel c (BN, LayerNorm,
        depthwise conv): ties input and output."""
        x = node.args[0]
        if self.channels(x) is None or _channel_shape(node) is None:
            return self.unsupported(node)
        if self.dim(x) != 1:
            self.dims[node] = self.dim(x)
        self.tie(x, node)
        self.role("channelwise", node, node)
        if not called_once(self.gm, node):
            self.fix([node], SHARED_MODULE)

    def channels_first(self, node: Node) -> bool:
        """Whether `node`'s input holds its channels on dim 1 (what BN, GroupNorm, PReLU, pixel
        shuffles and convs read)."""
        x = node.args[0] if node.args else node.kwargs.get("input")
        if not isinstance(x, Node) or self.dim(x) == 1:
            return True
        self.unsupported(node, f"{node_target(self.gm, node).__name__} on a tensor with its "
                               f"channels on dim {self.dim(x)}")
        return False

    def batch_norm(self, node: Node, target=None) -> None:
        if self.channels_first(node):
            self.channelwise(node)

    def layer_norm(self, node: Node, target=None) -> None:
        """A LayerNorm over the channels alone (normalized_shape (C,), the channels last):
        per-channel weight and bias, statistics over the whole group (`normalized`)."""
        x = node.args[0]
        shape = _channel_shape(x)
        if shape is None or len(self.gm.get_submodule(node.target).normalized_shape) != 1 \
                or self.dim(x) != len(shape) - 1:
            return self.unsupported(node, "LayerNorm over more than the channels")
        self.channelwise(node)
        self.role("normalized", node, node)

    def group_norm(self, node: Node, target=None) -> None:
        """GroupNorm: channelwise (weight, bias) and prunable by whole groups only: removing a
        channel from a group would change its mean and variance."""
        if not self.channels_first(node):
            return
        self.channelwise(node)
        if node in self.space:
            self.normed.append((self.of(node), self.gm.get_submodule(node.target).num_groups))

    def prelu(self, node: Node, target) -> None:
        """PReLU: one slope per channel (num_parameters = C) is a channelwise member, its slopes
        pruned with the channels; a single slope is elementwise."""
        if target is not F.prelu:
            if self.gm.get_submodule(node.target).num_parameters == 1:
                return self.elementwise(node)
            if self.channels_first(node):
                self.channelwise(node)
            return
        x, weight = node.args[0], arg(node, 1, "weight")
        shape = node_shape(weight) if isinstance(weight, Node) else None
        if _channel_shape(x) is None or _channel_shape(node) is None or shape is None \
                or len(shape) != 1:
            return self.unsupported(node, "prelu")
        if shape[0] > 1 and (weight.op != "get_attr" or len(weight.users) != 1):
            return self.unsupported(node, "prelu with a shared or computed slope")
        if shape[0] > 1 and not self.channels_first(node):
            return
        if self.dim(x) != 1:  # one slope: elementwise on any layout
            self.dims[node] = self.dim(x)
        self.tie(x, node)
        if shape[0] > 1:
            self.unread.remove(weight)
            self.constants.setdefault(node, []).append((str(weight.target), 0, "slope"))
            self.role("channelwise", node, node)

    def embedding(self, node: Node, target=None) -> None:
        """nn.Embedding: row i of its weight [num, C] for each index i. The indices are not
        channels (their group, a model input's or any other, is left as it is: not tied); the
        result's channels (its last dim) are the weight's columns, a channelwise member."""
        module = self.gm.get_submodule(node.target)
        out = _channel_shape(node)
        if out is None:  # a scalar index: one vector, no channel space (a view of it to
            return  # [1, C, 1, 1] moves the channel dim and fixes what it meets)
        if module.max_norm is not None:  # renormalizes each looked-up row over its channels
            return self.unsupported(node, "Embedding with max_norm")
        if len(out) > 2:
            self.dims[node] = len(out) - 1
        self.of(node)
        self.role("channelwise", node, node)
        if not called_once(self.gm, node):
            self.fix([node], SHARED_MODULE)

    def pixel_shuffle(self, node: Node, target) -> None:
        """y = pixel_shuffle(x, r): y's channel c is x's channels c r² .. c r² + r² - 1, so x
        interleaves r² copies of y's group (parts (y, k, stride r²)): pruning y's channel c
        removes its whole block of x. pixel_unshuffle is the reverse (y interleaves x)."""
        x = node.args[0] if node.args else node.kwargs.get("input")
        if node.op == "call_module":
            module = self.gm.get_submodule(node.target)
            r = getattr(module, "upscale_factor", getattr(module, "downscale_factor", None))
            up = isinstance(module, nn.PixelShuffle)
        else:
            up = target is F.pixel_shuffle
            r = arg(node, 1, "upscale_factor" if up else "downscale_factor")
        name = "pixel_shuffle" if up else "pixel_unshuffle"
        if not isinstance(x, Node) or _channel_shape(x) is None or _channel_shape(node) is None:
            return self.unsupported(node, f"{name} of unknown shape")
        if not isinstance(r, int):
            return self.opaque(node, f"{UNSUPPORTED}: {name} with a computed factor "
                                     f"({node.name})")
        if not self.channels_first(node):
            return
        if r == 1:
            return self.tie(x, node)
        coarse, fine = (node, x) if up else (x, node)  # fine = r² channels per coarse one
        q, n = self.of(coarse), _channel_shape(coarse)[1]
        self.layouts.append((self.of(fine), tuple((q, k, r * r, n) for k in range(r * r))))

    def conv(self, node: Node, target=None) -> None:
        module = self.gm.get_submodule(node.target)
        if not self.channels_first(node):
            return
        g = module.groups
        if g > 1 and g == module.in_channels == module.out_channels:
            return self.channelwise(node)
        x = node.args[0]
        if _channel_shape(x) is None or _channel_shape(node) is None:
            return self.unsupported(node)
        self.role("consumers", node, x)
        self.role("producers", node, node)
        if g > 1:
            self.grouped += [(self.of(x), g), (self.of(node), g)]
            self.grouped_convs.append(node)
        if not called_once(self.gm, node):
            self.fix([x, node], SHARED_MODULE)

    def linear(self, node: Node, target=None) -> None:
        """A Linear reads and writes the last dim: the channels of [N, F], of a channels-last
        [N, H, W, C] (a 1x1 conv) or of tokens [N, L, C]."""
        x = node.args[0]
        shape = _channel_shape(x)
        if shape is None or self.dim(x) != len(shape) - 1 or _channel_shape(node) is None:
            return self.unsupported(node, "Linear over a dim that does not hold the channels")
        if len(shape) > 2:
            self.dims[node] = len(shape) - 1
        self.role("consumers", node, x)
        self.role("producers", node, node)
        if not called_once(self.gm, node):
            self.fix([x, node], SHARED_MODULE)

    def cat(self, node: Node, target=None) -> None:
        tensors = arg(node, 0, "tensors")
        if not isinstance(tensors, (tuple, list)):  # `cat(x.split(4, 1))`: a list node
            return self.unsupported(node, "cat of a list computed in the graph")
        out = _channel_shape(node)
        if out is None or not all(map(_channel_shape, tensors)) \
                or not self.same_dim(node, tensors):
            return self.unsupported(node)
        if normal_dim(arg(node, 1, "dim", 0), len(out)) != self.dim(node):
            for t in tensors:
                self.tie(t, node)
            return
        pieces = [t for t in tensors if self.channels(t) > 0]
        if len(pieces) == 1:
            self.tie(pieces[0], node)
        else:
            self.concatenation(node, [self.of(t) for t in pieces])

    def split(self, node: Node, target=None) -> None:
        x = node.args[0]
        shape = _channel_shape(x)
        metas = node.meta.get("tensor_meta")
        users = list(node.users)
        if shape is None or not isinstance(metas, (tuple, list)) or not all(
                u.target is operator.getitem and isinstance(u.args[1], int) for u in users):
            return self.unsupported(node, "split used as a whole")
        self.done.update(users)
        c = self.dim(x)
        for user in users:
            if c != 1:
                self.dims[user] = c
        if normal_dim(arg(node, 2, "dim", 0), len(shape)) != c:
            for user in users:
                self.tie(x, user)
            return
        sizes = [m.shape[c] for m in metas]
        if len(sizes) == 1 or 0 in sizes:
            return self.unsupported(node, "split into one or empty pieces")
        pieces = [self.new_space(size) for size in sizes]
        for user in users:
            self.tie(pieces[user.args[1] % len(sizes)], user)
        self.cuts[node] = self.of(x)
        self.concatenation(x, pieces)

    def unbind(self, node: Node, target=None) -> None:
        """`unbind(dim)` of another dim than the channels (FastViT's q, k, v after its
        [3, heads, d] split): every piece keeps the input's channels, one dim lower past dim."""
        x = node.args[0]
        shape = _channel_shape(x)
        users = list(node.users)
        if shape is None or not all(u.target is operator.getitem and isinstance(u.args[1], int)
                                    for u in users):
            return self.unsupported(node, "unbind used as a whole")
        dim, c = normal_dim(arg(node, 1, "dim", 0), len(shape)), self.dim(x)
        if dim is None or dim == c:
            return self.unsupported(node, "unbind of the channels")
        if len(shape) < 3:
            return self.unsupported(node, "unbind to tensors of rank 1")
        self.done.update(users)
        for user in users:
            if c - (dim < c) != 1:
                self.dims[user] = c - (dim < c)
            self.tie(x, user)

    def getitem(self, node: Node, target=None) -> None:
        x, index = node.args
        shape = _channel_shape(x)
        if shape is None:
            if _channel_shape(node) is not None:
                self.unsupported(node)
            return
        c = self.dim(x)
        raw = list(index) if isinstance(index, tuple) else [index]
        items = index_items(tuple(i for i in raw if i is not None), len(shape))
        if items is None or not isinstance(items[c], slice) or items[c].step not in (None, 1) \
                or isinstance(items[0], int) or _channel_shape(node) is None \
                or None in raw[:index_place(raw, len(shape), c) + 1]:  # `e[:, :, None, None]`
            return self.unsupported(node, "indexing")
        dim = c - sum(isinstance(i, int) for i in items[:c])  # an int index drops its dim
        if dim != 1:
            self.dims[node] = dim
        start, stop, _ = items[c].indices(shape[c])
        if stop <= start:
            return self.unsupported(node, "empty channel slice")
        if (start, stop) == (0, shape[c]):
            return self.tie(x, node)
        pieces = [self.new_space(start)] if start else []
        pieces.append(self.of(node))
        pieces += [self.new_space(shape[c] - stop)] if stop < shape[c] else []
        self.cuts[node] = self.of(x)
        self.concatenation(x, pieces)

    def reshape(self, node: Node, target) -> None:
        """A reshape that only moves the channel dim (`reshaped_dim`: flatten(x, 1) of
        [N, C, 1, 1], [N, H, W, C] -> [N, H W, C]), or splits it into heads [.., h, d] (x is h
        lockstep segments of the result's group: each head keeps the same dims) or merges heads
        back. A requested size there is -1 or a literal channel count, rewritten when pruned."""
        x = node.args[0] if node.args else node.kwargs["input"]
        before, after = _channel_shape(x), _channel_shape(node)
        sizes = reshape_sizes(node) or ()
        if before is None and after is not None and len(sizes) == len(after) and any(
                type(s) is int and s == n > 1 for s, n in zip(sizes, after)):
            return self.opaque(node, SIZE_READ)  # a constant's `gamma.view(1, 64, 1, 1)`
        if before is None or after is None:
            return self.opaque(node, MOVES_CHANNELS)
        c = self.dim(x)
        read = False
        dim, heads = reshaped_dim(before, after, c), None
        split = head_split(before, after, c) if dim is None else None
        merged = next((m for m in range(c - 1, 0, -1) if head_split(after, before, m) == (m, c)),
                      None) if dim is None and not split else None  # never into the batch dim
        if split:
            dim, heads = split[1], ("split", math.prod(after[c:split[1]]))
        elif merged is not None:
            dim, heads = merged, ("merge", math.prod(before[merged:c]))
        if dim is None and c and before[c] > 1 and after[0] % math.prod(before[:c + 1]) == 0:
            return self.opaque(node, f"{MOVES_CHANNELS}: a reshape merges the channels into the "
                                     f"batch dim ({node.name})")  # MobileViT's unfold and fold
        if dim is None:
            return self.opaque(node, MOVES_CHANNELS)
        if target in ("reshape_as", torch.Tensor.reshape_as):  # another tensor's sizes
            other = node.args[1]
            if self.dim(other) != dim or self.channels(other) != after[dim]:
                return self.opaque(node, MOVES_CHANNELS)
        elif target in RESHAPES:
            sizes = reshape_sizes(node) or ()
            read = len(sizes) == len(after) and self.read_sizes(node, sizes, dim)
            if not read and (len(sizes) != len(after) or sizes[dim] != -1 and not (
                    type(sizes[dim]) is int and sizes[dim] == after[dim])):
                return self.opaque(node, SIZE_READ)  # a computed channel count
            if not read and sizes[dim] != -1:
                self.sizes[node] = dim
        if dim != 1:
            self.dims[node] = dim
        if read:
            self.tie(self.read[sizes[dim]], node)
        if heads is None:
            self.tie(x, node)
            if target in ("reshape_as", torch.Tensor.reshape_as):
                self.tie(node, node.args[1])
        elif heads[0] == "split":
            d = after[dim]
            self.layouts.append((self.of(x), tuple((self.of(node), i * d, 1, d)
                                                   for i in range(heads[1]))))
            place = None  # the head count requested: -1, a literal or computed
            if target in RESHAPES and len(sizes) == len(after) and dim == c + 1:
                place = -1 if sizes[c] == -1 else c if type(sizes[c]) is int else None
            self.head_reshapes.append((node, self.of(x), self.of(node), heads[1], place))
        else:
            d = before[c]
            self.layouts.append((self.of(node), tuple((self.of(x), i * d, 1, d)
                                                      for i in range(heads[1]))))
            self.head_reshapes.append((node, self.of(node), self.of(x), heads[1], -1))

    def matmul(self, node: Node, target=None) -> None:
        """Attention's products: `q @ k.T` contracts the channels of q and k (one group, pruned
        alike; the scores have no channels: their dim 1 is the heads, fixed); `scores @ v` keeps
        the channels of v. Linear attention: `k.T @ v` contracts the tokens, its rows are k's
        channels and its columns v's (`rows`); `q @ kv` contracts q's channels with those rows."""
        a, b = node.args[:2]
        sa, sb, out = _channel_shape(a), _channel_shape(b), _channel_shape(node)
        rank = len(out or ())
        if sa is None or sb is None or not len(sa) == len(sb) == rank:
            return self.unsupported(node, "matmul of these ranks")
        ca, cb = self.dim(a), self.dim(b)
        if ca == rank - 1 and cb == rank - 2:
            self.tie(a, b)
            self.fix([node], HEADS)
            self.head_links.append((self.of(node), self.of(a)))
            return self.role("producers", node, node)
        if cb != rank - 1 or b not in self.space:
            return self.unsupported(node, "matmul that mixes channels")
        if ca == rank - 2 and a in self.space:  # k.T @ v
            self.rows[node] = self.of(a)
        elif ca == rank - 1 and b in self.rows:  # q @ (k.T @ v)
            self.tie(a, self.rows[b])
        elif ca >= rank - 2:
            return self.unsupported(node, "matmul that mixes channels")
        if ca == 1 and a in self.space:  # scores @ v
            self.head_links.append((self.of(a), self.of(b)))
        self.dims[node] = rank - 1
        self.tie(b, node)

    def pad(self, node: Node, target=None) -> None:
        """Constant padding: of other dims, a tie; of the channel dim (EfficientViT pads v with a
        ones channel), the result is the input between fixed constant pieces."""
        x = node.args[0]
        shape, out = _channel_shape(x), _channel_shape(node)
        pads = arg(node, 1, "pad")
        mode = arg(node, 2, "mode", "constant") if target is F.pad else "constant"
        if shape is None or out is None or mode != "constant" or not isinstance(
                pads, (tuple, list)) or not all(isinstance(p, int) for p in pads):
            return self.unsupported(node, "pad")
        c = self.dim(x)
        place = 2 * (len(shape) - 1 - c)  # pads run from the last dim backwards
        low, high = (tuple(pads[place:place + 2]) + (0, 0))[:2]
        if c != 1:
            self.dims[node] = c
        if (low, high) == (0, 0):
            return self.tie(x, node)
        if min(low, high) < 0:
            return self.unsupported(node, "pad that crops the channels")
        pieces = []
        for size in (low, high):
            if size:
                pieces.append(self.new_space(size))
                self.reasons.append((pieces[-1], PADDED))
        pieces.insert(1 if low else 0, self.of(x))
        self.concatenation(node, pieces)

    def softmax(self, node: Node, target=None) -> None:
        x = node.args[0]
        shape = _channel_shape(x)
        dim = arg(node, 1, "dim") if node.op != "call_module" else \
            self.gm.get_submodule(node.target).dim
        if shape is None or normal_dim(dim, len(shape)) in (None, self.dim(x)):
            return self.unsupported(node, "softmax over the channels")
        if self.dim(x) != 1:
            self.dims[node] = self.dim(x)
        self.tie(x, node)

    def transpose(self, node: Node, target) -> None:
        """A permute or transpose moves the channel dim where it sends it (NCHW <-> NHWC)."""
        x = node.args[0]
        shape = _channel_shape(x)
        if shape is None or _channel_shape(node) is None:
            return self.unsupported(node)
        dims = node.args[1:]
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = dims[0]
        if target in ("permute", torch.permute):
            dim = permuted_dim(dims, len(shape), self.dim(x))
        else:
            dim = transposed_dim(*dims, len(shape), self.dim(x)) if len(dims) == 2 else None
        if dim is None:
            return self.unsupported(node, "malformed permutation")
        if dim != 1:
            self.dims[node] = dim
        self.tie(x, node)

    def shuffle(self, node: Node, target=None) -> None:
        """y = shuffle(x, g) on C = g m channels: x is g segments of one group Q (lockstep: the
        same kept indices), y interleaves them (channel j g + i is Q's channel j of segment i)."""
        if node not in self.shuffles or self.dim(node.args[0]) != 1:
            return self.opaque(node, MOVES_CHANNELS)  # a spelling archc.ir.shuffles misses
        shuffle, reason = self.shuffles[node]
        x, g = shuffle.input, shuffle.groups
        if _channel_shape(x) is None or _channel_shape(node) is None:
            return self.unsupported(node, "channel shuffle of unknown shape")
        if reason:
            self.fix([x, node], reason)
            return self.role("producers", node, node)
        size = _channel_shape(x)[1]
        if g in (1, size):  # the identity
            return self.tie(x, node)
        m = size // g
        q = self.new_space(m)
        self.layouts.append((self.of(x), tuple((q, i * m, 1, m) for i in range(g))))
        self.layouts.append((self.of(node), tuple((q, i, g, m) for i in range(g))))

    def reduction(self, node: Node, target=None) -> None:
        x = node.args[0]
        shape = _channel_shape(x)
        if shape is None:
            return self.unsupported(node) if _channel_shape(node) else None
        dims = arg(node, 1, "dim")
        dims = [dims] if isinstance(dims, int) else list(dims or [])
        dims = [normal_dim(d, len(shape)) for d in dims]
        if target in _STATISTICS[2:]:  # var and std: (x, dim, unbiased, keepdim) positionally
            keep = bool(node.kwargs.get("keepdim", node.args[3] if len(node.args) > 3 else False))
        else:
            keep = bool(arg(node, 2, "keepdim", False))
        if keep and dims == [self.dim(x)] and target in _STATISTICS:
            return self.statistic(node, x)
        dim = None if not dims or None in dims or 0 in dims else reduced_dim(dims, keep,
                                                                             self.dim(x))
        if dim is None or _channel_shape(node) is None:
            return self.unsupported(node, "reduction over the channels")
        if dim != 1:
            self.dims[node] = dim
        self.tie(x, node)

    def statistic(self, node: Node, x: Node) -> None:
        """`x.mean(1, keepdim=True)`, a variance likewise: a hand-written norm's statistics span
        x's group (`normalized`, as a LayerNorm's); the one-channel result is fixed and broadcasts
        over the channels where it is used (`x - u`, `x / sqrt(s + eps)`)."""
        if self.dim(x) != 1:
            self.dims[node] = self.dim(x)
        self.role("normalized", node, x)
        self.fix([node], STATISTIC)
        self.role("producers", node, node)

    def metadata(self, node: Node, target) -> None:
        """`x.size()`, `x.shape`, `x.dim()`, `x.dtype`: only the channel count matters."""
        if target == "dim" or target is builtins.getattr and node.args[1] in _HARMLESS_ATTRIBUTES:
            return
        if target is builtins.getattr and node.args[1] != "shape":
            return self.unsupported(node, f"attribute {node.args[1]}")
        x = node.args[0]
        shape = _channel_shape(x)
        if shape is None:
            return
        c = self.dim(x)
        dim = arg(node, 1, "dim") if target == "size" else None
        if dim is not None:
            read = normal_dim(dim, len(shape)) == c and not self.shuffles_only(node, x) \
                and not self.reshapes_only(node, x)
        else:  # a whole torch.Size: which items does the graph take?
            read = False
            for user in node.users:
                index = user.args[1] if user.target is operator.getitem else None
                if isinstance(index, int):
                    channels = normal_dim(index, len(shape)) == c
                elif isinstance(index, slice):
                    channels = c in range(*index.indices(len(shape)))
                else:
                    channels = True  # the shape escapes whole
                read |= channels and not self.shuffles_only(user, x) \
                    and not (isinstance(index, int) and self.reshapes_only(user, x))
        if read:
            self.fix([x], SIZE_READ)

    def reshapes_only(self, value: Node, x: Node) -> bool:
        """Whether a read channel count of x only feeds reshapes as one of their sizes (FastViT's
        `reshape(B, N, C)` merging heads, C read from the block's input): recorded in `read`,
        each reshape that requests it as its own channel count tied to x (`read_sizes`), x fixed
        in `finish` if another takes it."""
        if not value.users or not all(
                node_target(self.gm, user) in RESHAPES and value in (reshape_sizes(user) or ())
                for user in value.users):
            return False
        self.read[value] = x
        return True

    def read_sizes(self, node: Node, sizes: tuple, dim: int) -> bool:
        """Whether `sizes[dim]` (a reshape's requested channel count) is a channel count read
        from a tensor of as many channels (`read`): tie that tensor to the result, so both keep
        one size and the reshape follows it (`reshape` ties them)."""
        x = self.read.get(sizes[dim])
        if x is None or self.channels(x) != _channel_shape(node)[dim] \
                or sizes.count(sizes[dim]) != 1:
            return False
        self.read_by[sizes[dim]] = self.read_by.get(sizes[dim], 0) + 1
        return True

    def shuffles_only(self, value: Node, x: Node) -> bool:
        """Whether a size read from x only feeds accepted shuffles of x (whose sizes follow x's
        channel count), through size arithmetic."""
        if value in self.shuffled:
            return self.shuffled[value].input is x
        return bool(value.users) and all(
            (user in self.shuffled or user.target in SIZE_ARITHMETIC)
            and self.shuffles_only(user, x) for user in value.users)

    # ---- composites ----

    def concatenation(self, whole: Node | int, pieces: list[int]) -> None:
        offsets = [0]
        for piece in pieces:
            offsets.append(offsets[-1] + self.size[piece])
        whole = self.of(whole) if isinstance(whole, Node) else whole
        self.layouts.append((whole, tuple((p, o, 1, self.size[p])
                                          for p, o in zip(pieces, offsets))))

    def unify_layouts(self) -> tuple[dict[int, tuple], set[int]]:
        """Make the layouts of each whole agree, to a fixpoint: equal layouts identify their
        pieces; a concatenation (a cut) of a whole laid out otherwise (an interleave) gives each
        cut piece the layout of its channel range, splitting the groups it reads where the range
        cuts them. Return each whole's layout and the wholes whose layouts disagree (two
        concatenations with different boundaries, two different interleaves)."""
        find = self.uf.__getitem__
        self.active = list(self.layouts)
        while True:
            by_whole: dict[int, list[_Layout]] = {}
            for layout in self.active:
                by_whole.setdefault(find(layout[0]), []).append(layout)
            chosen = {whole: _chosen(layouts) for whole, layouts in by_whole.items()}
            conflicts: set[int] = set()
            changed = False
            for whole, layouts in by_whole.items():
                first = chosen[whole]
                for other in layouts:
                    if other is first:
                        continue
                    if _signature(other) == _signature(first):
                        for a, b in zip(other[1], first[1]):
                            if find(a[0]) != find(b[0]):
                                self.uf.union(a[0], b[0])
                                changed = True
                    elif _concatenated(other) and not _concatenated(first) \
                            or _refines(first, other):
                        self.active.remove(other)
                        self.cut(other, first)
                        changed = True
                    elif _refines(other, first):  # cut the chosen one: compare again
                        self.active.remove(first)
                        self.cut(first, other)
                        changed = True
                        break
                    else:
                        conflicts.add(whole)
            if not changed:
                return {whole: layout[1] for whole, layout in chosen.items()}, conflicts

    def cut(self, concatenation: _Layout, layout: _Layout) -> None:
        """The pieces of `concatenation` are channel ranges of `layout`'s whole."""
        for piece, offset, _, size in concatenation[1]:
            parts = self.restrict(layout[1], offset, offset + size)
            if len(parts) == 1 and parts[0][1:] == (0, 1, size):
                self.uf.union(piece, parts[0][0])
            else:
                self.add_layout((piece, parts))

    def restrict(self, parts, low: int, high: int) -> tuple[tuple[int, int, int, int], ...]:
        """The parts laying out channels [low, high) of a whole laid out as `parts`, relative to
        low; a part's group that the range cuts is split (or its own layout is used)."""
        find = self.uf.__getitem__
        found = []
        todo = list(parts)
        while todo:
            space, offset, stride, size = todo.pop(0)
            first = max(0, -((offset - low) // stride))  # ceil((low - offset) / stride)
            end = min(size, -((offset - high) // stride))
            if end <= first:
                continue
            if (first, end) == (0, size):
                found.append((space, offset - low, stride, size))
                continue
            own = next((lay for lay in self.active if find(lay[0]) == find(space)), None)
            if own is None:  # a leaf: split it at the range's ends
                self.refined.append(space)
                bounds = sorted({0, first, end, size})
                own = (space, tuple((self.new_space(b - a), a, 1, b - a)
                                    for a, b in zip(bounds, bounds[1:])))
                self.add_layout(own)
            todo[:0] = [(p, offset + stride * o, stride * s, n) for p, o, s, n in own[1]]
        return _normalized(found)

    def add_layout(self, layout: _Layout) -> None:
        layout = (layout[0], _normalized(layout[1]))
        self.layouts.append(layout)
        self.active.append(layout)

    # ---- groups ----

    def finish(self) -> ChannelGraph:
        for constant in self.unread:
            self.unsupported(constant, "constant tensor")
        for value, x in self.read.items():  # a read count another op takes
            if self.read_by.get(value, 0) != len(value.users):
                self.fix([x], SIZE_READ)
        chosen, conflicts = self.unify_layouts()
        while self.align_grouped(chosen):
            chosen, conflicts = self.unify_layouts()
        find = self.uf.__getitem__
        roots = list(dict.fromkeys(find(s) for s in range(len(self.size))))  # creation order
        number = {root: i for i, root in enumerate(roots)}
        pieces_of: dict[int, set[int]] = {}  # the pieces of every layout of each whole
        for whole, parts in self.layouts:
            pieces_of.setdefault(find(whole), set()).update(find(p[0]) for p in parts)
        members = self.members()
        groups_of: dict[int, set[int]] = {}
        for space, g in self.grouped:
            groups_of.setdefault(find(space), set()).add(g)
        reasons: dict[int, list[str]] = {}
        for space, reason in self.reasons:
            reasons.setdefault(find(space), []).append(reason)
        for root in conflicts:
            reasons.setdefault(root, []).append(SEGMENT_CONFLICT)
        for root in groups_of.keys() & chosen.keys():
            if not all(_runs(_leaf_parts(chosen, find, root), g) for g in groups_of[root]):
                reasons.setdefault(root, []).append(GROUPED_PARTS)
        norms_of: dict[int, int] = {}
        for space, g in self.normed:
            norms_of[find(space)] = math.gcd(norms_of.get(find(space), 0), g)
        for root in norms_of.keys() & chosen.keys():
            reasons.setdefault(root, []).append(NORM_PARTS)
        pieces = set().union(*pieces_of.values())
        for root in roots:  # no conv or Linear writes it: an Embedding's alone (a timestep MLP's
            # input; a lookup has no rows to score), else a safety net (no other rule leaves one)
            if root not in chosen and root not in pieces and not members[root]["producers"]:
                reasons.setdefault(root, []).append(f"{UNSUPPORTED}: no op writes these channels")
        fixed = {root: min(rs, key=_priority) for root, rs in reasons.items()}
        for root in sorted(roots, key=lambda r: -self.size[r]):  # wholes before their pieces
            if root in fixed:
                for piece in pieces_of.get(root, ()):
                    fixed.setdefault(piece, fixed[root])
        refined = {find(space) for space in self.refined}
        groups = []
        for root in roots:
            groups.append(ChannelGroup(
                index=number[root], size=self.size[root],
                **{role: tuple(nodes) for role, nodes in members[root].items()},
                groups=tuple(sorted(groups_of.get(root, ()))),
                norm_groups=norms_of.get(root, 0),
                parts=tuple(Part(number[find(p)], offset, size, stride)
                            for p, offset, stride, size in chosen.get(root, ())),
                fixed=fixed.get(root, ""),
                refined=root in refined and root in chosen
                and _concatenated((root, chosen[root]))))
        index = {node: number[find(space)] for node, space in self.space.items()}
        cuts = {node: number[find(space)] for node, space in self.cuts.items()}
        constants = {node: tuple(read) for node, read in self.constants.items()}
        dims = {node: dim for node, dim in self.dims.items() if node in self.space}
        graph = ChannelGraph(groups, index, dims, cuts, constants, dict(self.sizes))
        graph.heads = self.head_sets(graph, number, reasons)
        return graph

    def head_sets(self, graph: ChannelGraph, number: dict[int, int],
                  reasons: dict[int, list[str]]) -> list[Heads]:
        """The heads of each attention: head splits and merges whose lockstep groups share a
        leaf, or that the scores' products link, are one set (`Heads`)."""
        find = self.uf.__getitem__
        index = {space: number[find(space)] for space in range(len(self.size))}
        links = UnionFind()

        def leaves(space: int) -> list[tuple[str, int]]:
            return [("l", leaf.index) for leaf in graph.leaves(graph.groups[index[space]])]

        conv_leaves = {conv: {leaf.index for arg in (conv.args[0], conv) for leaf in
                              graph.leaves(graph.groups[index[self.space[arg]]])}
                       for conv in self.grouped_convs}
        for _, whole, piece, _, _ in self.head_reshapes:
            links.union(("w", index[whole]), *leaves(piece))
        for scores, other in self.head_links:
            links.union(("s", index[scores]), *leaves(other))
        found = []
        for members in links.to_sets():
            records = [r for r in self.head_reshapes if ("w", index[r[1]]) in members]
            if not records:
                continue
            wholes = tuple(sorted({index[r[1]] for r in records}))
            scores = tuple(sorted(i for kind, i in members if kind == "s"))
            counts = {r[3] for r in records}
            why = [graph.groups[w].fixed for w in wholes if graph.groups[w].fixed]
            why += [r for s in scores for space, rs in reasons.items() if number[space] == s
                    for r in rs if r != HEADS]
            if len(counts) > 1:
                why.append(f"{SEGMENT_CONFLICT} (head counts {sorted(counts)})")
            why += [f"{HEAD_COUNT} ({r[0].name})" for r in records if r[4] is None]
            why += [f"{HEAD_CONSTANT} ({n.name})" for n in self.unindexed(records)]
            why += [f"{HEAD_GROUPED} ({conv.name})" for conv in self.grouped_convs
                    if {("l", leaf) for leaf in conv_leaves[conv]} & members]
            found.append(Heads(
                counts.pop() if len(counts) == 1 else 0, wholes, scores,
                tuple(sorted(i for kind, i in members if kind == "l")),
                tuple((r[0], r[4]) for r in records if r[4] is not None and r[4] >= 0),
                min(why, key=_priority) if why else ""))
        return found

    def unindexed(self, records) -> list[Node]:
        """The ops between an attention's head splits and its merges (or, without merges, after
        its splits) that read a constant other than as a per-channel constant (whose channels
        are the heads on the scores): removing heads would leave it whole."""
        splits = [r[0] for r in records if self.space.get(r[0]) == r[2]]
        merges = [r[0] for r in records if self.space.get(r[0]) == r[1]]
        region = _reachable(splits, lambda n: n.users)
        if merges:
            region &= _reachable(merges, _node_args)
        found = []
        for node in region:
            read = {name for name, _, _ in self.constants.get(node, ())}
            for a in _node_args(node):
                if a not in region and (a.op == "get_attr" and str(a.target) not in read or (
                        a in self.tables or a in self.chains) and node not in self.constants):
                    found.append(node)
        return found

    def align_grouped(self, chosen: dict[int, tuple]) -> bool:
        """A grouped conv (g groups) on a composite whose leaves, one after the other, fall into
        g runs of C/g channels with the same leaf sizes in each run (EfficientViT's grouped conv
        over q, k and v of every head, g = 3 heads): tie the leaves at the same place in every
        run, so every conv group keeps as many channels. Whether any tie was new."""
        find = self.uf.__getitem__
        tied = False
        for space, g in self.grouped:
            runs = _runs(_leaf_parts(chosen, find, find(space)), g)
            for places in zip(*runs):
                for leaf in places[1:]:
                    if find(leaf) != find(places[0]):
                        self.uf.union(leaf, places[0])
                        tied = True
        return tied

    def members(self) -> dict[int, dict[str, list[Node]]]:
        """root -> {"tensors" | role: nodes in graph order}."""
        find = self.uf.__getitem__
        order = {node: i for i, node in enumerate(self.gm.graph.nodes)}
        members: dict[int, dict[str, list[Node]]] = {
            find(s): {"tensors": [], **{role: [] for role in self.roles}}
            for s in range(len(self.size))}
        for node, space in sorted(self.space.items(), key=lambda item: order[item[0]]):
            members[find(space)]["tensors"].append(node)
        for role, entries in self.roles.items():
            for space, node in sorted(entries, key=lambda e: order[e[1]]):
                listed = members[find(space)][role]
                if node not in listed:
                    listed.append(node)
        return members


def _reachable(starts: list[Node], step) -> set[Node]:
    """`starts` and every node reached from them by `step` (users or inputs)."""
    found, todo = set(starts), list(starts)
    while todo:
        for other in step(todo.pop()):
            if other not in found:
                found.add(other)
                todo.append(other)
    return found


def _head_table(node: Node) -> Node | None:
    """The constant of `table[:, idxs]` (`aten.index(table, [None, idxs])`): a parameter or
    buffer gathered along its other dims by constant index buffers, keeping its rows, read once
    by a shift; None for anything else."""
    if node.target is operator.getitem:
        table, index = node.args
        items = list(index) if isinstance(index, tuple) else None
        rows = slice(None)
    elif node.target is torch.ops.aten.index.Tensor:
        table, items = node.args
        rows = None
    else:
        return None
    if not isinstance(table, Node) or table.op != "get_attr" or len(table.users) != 1 \
            or not items or len(items) < 2 or items[0] != rows or not all(
                isinstance(i, Node) and i.op == "get_attr" and len(i.users) == 1
                for i in items[1:]) or len(node.users) != 1:
        return None
    return table if next(iter(node.users)).target in _SCALE_OR_SHIFT else None


def _only_views(node: Node, target) -> bool:
    """Whether a view of a constant only adds or drops dims of size 1 (`constant_chain`)."""
    if target is operator.getitem:
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        return all(i is None or i is Ellipsis or i == slice(None) for i in index)
    if target in RESHAPES:
        return all(size in (1, -1) for size in reshape_sizes(node) or (0,))
    return True



def _normalized(parts) -> tuple[tuple[int, int, int, int], ...]:
    """Parts in channel order, a single channel with stride 1."""
    return tuple(sorted(((p, o, s if n > 1 else 1, n) for p, o, s, n in parts),
                        key=lambda part: part[1]))


def _signature(layout: _Layout) -> tuple[tuple[int, int, int], ...]:
    return tuple(part[1:] for part in layout[1])


def _concatenated(layout: _Layout) -> bool:
    """Pieces one after the other (a cat, split, chunk or slice)."""
    offset = 0
    for _, start, stride, size in layout[1]:
        if start != offset or stride != 1:
            return False
        offset += size
    return True


def _leaf_parts(chosen: dict[int, tuple], find, root: int, seen: frozenset = frozenset()
                ) -> list[tuple[int, int]]:
    """(leaf root, size) of a composite's leaves in channel order, through nested layouts; [] for
    a leaf, a layout with strided parts (an interleave) or one that contains itself."""
    if root not in chosen or root in seen:
        return []
    leaves = []
    for space, _, stride, size in chosen[root]:
        inner = _leaf_parts(chosen, find, find(space), seen | {root})
        if stride != 1 or find(space) in chosen and not inner:
            return []
        leaves += inner or [(find(space), size)]
    return leaves


def _runs(leaves: list[tuple[int, int]], g: int) -> list[list[int]]:
    """`leaves` cut into g runs of equal size with the same leaf sizes in each, as the leaves
    of each run; [] if they do not fall so."""
    if g < 2 or not leaves or len(leaves) % g:
        return []
    n = len(leaves) // g
    runs = [leaves[i * n:(i + 1) * n] for i in range(g)]
    if any([size for _, size in run] != [size for _, size in runs[0]] for run in runs):
        return []
    return [[leaf for leaf, _ in run] for run in runs]


def _refines(fine: _Layout, coarse: _Layout) -> bool:
    """Two concatenations of one whole, every boundary of `coarse` one of `fine` (a cat of
    attention heads split again into heads: each coarse piece is a run of fine ones)."""
    if not (_concatenated(fine) and _concatenated(coarse)) or _signature(fine) == \
            _signature(coarse):
        return False
    return {p[1] for p in coarse[1]} <= {p[1] for p in fine[1]}


def _chosen(layouts: list[_Layout]) -> _Layout:
    """The layout a whole is described by: an interleave if it has one (the finer), else its
    first concatenation."""
    return next((layout for layout in layouts if not _concatenated(layout)), layouts[0])
