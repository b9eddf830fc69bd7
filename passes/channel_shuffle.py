"""Channel shuffles: recognize every spelling, fold them into dense neighbours (R11 of
`docs/rewrites.md`), or insert them where grouped convs never mix (ShuffleNet).

A shuffle with g groups on C channels is a fixed permutation π of the channel dim 1:

    y = x[:, π],   π(a g + k) = k C/g + a     (0 <= k < g, 0 <= a < C/g)

that is, reshape (N, C, *S) -> (N, g, C/g, *S), swap dims 1 and 2, reshape back. g = 1 and g = C
give the identity. A shuffle folds into a dense (groups 1) conv or linear layer by permuting its
weights, and moves through an eval BN or a channel-agnostic op f (same per-element map on every
channel: ReLU, SiLU, sigmoid, ...) by permuting its per-channel vectors p (f has none):

    shuffle -> layer       W ⋆ x[:, π] = W' ⋆ x,            W' = W[:, π⁻¹]
    layer -> shuffle       (W ⋆ x + b)[:, π] = W[π] ⋆ x + b[π]
    through BN / f         f_p(x[:, π]) = f_{p[π⁻¹]}(x)[:, π]

A grouped conv (groups G > 1) has no grouped W': its groups read (or write) contiguous blocks of
C/G channels, and every π with 1 < g < C moves some channel to another block (checked for all
C < 97), so folding would densify it, at G times the multiply-adds: refused.

Recognized spellings (`find_shuffles`): `nn.ChannelShuffle(g)`, `torch.channel_shuffle(x, g)`
(which is `F.channel_shuffle`), and x -> split (N, g, C/g, *R) -> swap dims 1, 2 -> merge to x's
shape, with `view`/`reshape`/`torch.reshape`/`unflatten` to split, `transpose`/`swapaxes`/`permute`
(`(0, 2, 1, ...)`) to swap, `view`/`reshape`/`flatten` to merge and `.contiguous()` anywhere
between. The reshape spelling is decided from the shapes that shape propagation records on the
example inputs. Literal sizes are taken as written for the example's shape; sizes computed from
x's shape (`x.size()`, `x.shape[i]`, `//`, `*`, `+`, `-`) must also describe the shuffle at a probe
shape of x with every batch and spatial size changed, so a spelling that only coincides with a
shuffle at the example (`view(n, g, C/g, w, h)` on a square input) is not taken for one.

`insert_channel_shuffle` (changes the function: an architecture transform before training). Take
conv1 with groups g1 (1 < g1 < its input channels), followed, each tensor read once, by BN,
channel-agnostic ops and channel-wise convs (groups = input channels, such as depthwise), then by
conv2 with groups g2 on L input channels. Channel i of conv2's input depends on conv1's group
i // (L/g1) only (channel-wise convs keep g1 contiguous equal blocks); conv2's group b reads
channels [b L/g2, (b+1) L/g2). So every group of conv2 sees exactly one group of conv1 iff blocks of
L/g2 nest in blocks of L/g1, iff g1 divides g2: then a shuffle with g1 groups goes right before
conv2. After it, channel j depends on group j mod g1, and every conv2 group reads L/g2 >= 2
consecutive channels: min(L/g2, g1) >= 2 groups. Before the depthwise conv (ShuffleNet's place) is
equivalent: channel-wise ops commute with π up to permuting their parameters.

A refusal reason starts with one of the constants below; details may follow after ": ".
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import GraphModule, Node

from archc import weight_algebra as wa
from archc.graph import (
    arg,
    called_once,
    describe,
    erase_unused,
    op_kind,
    set_weights,
    writes_in_place,
)
from archc.legality import SHAPES_UNKNOWN, SHARED_MODULE
from archc.pipeline import PassContext, PassResult, register_pass
from archc.rules import Match, Refuse, Rule, apply_rules
from archc.shapes import node_shape

# fold_channel_shuffle
UNKNOWN_GROUPS = "group count unknown: it is computed in the graph from values not known here"
CONSUMER_USERS = ("the shuffled tensor has other users: folding into one consumer would leave the "
                  "others unshuffled")
PRODUCER_USERS = "the producer's output has other users: they need its channels unpermuted"
NO_LAYER = "no dense conv/linear reached through BN and channel-agnostic ops"
GROUPED_CONSUMER = "the consumer is a grouped conv: folding would densify it"
GROUPED_PRODUCER = "the producer is a grouped conv: folding would densify it"
CHANNEL_DIM = ("the layer does not read dim 1 as its channels (unbatched conv input, or a linear "
               "on a tensor that is not 2-D)")
IN_PLACE = ("an op writes the shuffle's output in place: without the shuffle's fresh tensor it "
            "would write into another one")
# canonicalize_channel_shuffle
RANK_2 = "torch.channel_shuffle needs more than 2 dims: this shuffle keeps its reshape form"
# insert_channel_shuffle
DENSE_NEXT = "the next conv is dense: it already mixes every channel"
MIXED = "the groups already mix: some group of the next conv sees several groups of the first"
SHUFFLED = "a channel shuffle between them already mixes the groups"

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# Channel-agnostic: the same per-element map on every channel, no per-channel parameters.
_AGNOSTIC_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
                     nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh,
                     nn.Softplus, nn.Identity)
_AGNOSTIC_TARGETS = {F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu,
                     F.silu, F.mish, F.hardswish, F.hardsigmoid, F.hardtanh, torch.sigmoid,
                     F.sigmoid, torch.tanh, F.tanh, F.softplus, "relu", "sigmoid", "tanh",
                     "contiguous"}
# The reshape spelling: split dim 1, swap dims 1 and 2, merge (call_method names, functions).
_RESHAPES = {"view", "reshape", torch.reshape}
_SPLITS = _RESHAPES | {"unflatten", torch.unflatten}
_MERGES = _RESHAPES | {"flatten", torch.flatten}
_SWAPS = {"transpose", "swapaxes", "swapdims", torch.transpose, torch.swapaxes, torch.swapdims}
_PERMUTES = {"permute", torch.permute}
_SIZE_ARITHMETIC = {operator.add, operator.sub, operator.mul, operator.floordiv}


@dataclass(frozen=True)
class Shuffle:
    """A recognized channel shuffle `y = x[:, π]`, in any spelling."""

    nodes: tuple[Node, ...]  # its own nodes: the first reads x, the last computes y
    groups: int | None  # None: computed in the graph from values not known here

    @property
    def input(self) -> Node:
        return self.nodes[0].args[0]

    @property
    def output(self) -> Node:
        return self.nodes[-1]

    @property
    def canonical(self) -> bool:
        return len(self.nodes) == 1 and self.output.target is torch.channel_shuffle

    @property
    def name(self) -> str:
        return describe(self.output) if len(self.nodes) == 1 else (
            f"{self.nodes[0].name}..{self.output.name}")


# ---- recognition ----

def _target(node: Node):
    """The function or method name a call computes (None for modules, inputs, constants)."""
    return node.target if node.op in ("call_function", "call_method") else None


def find_shuffles(gm: GraphModule) -> dict[Node, Shuffle]:
    """Every recognized shuffle by its output node. The reshape spelling needs recorded shapes
    (`archc.shapes`); a node belongs to at most one shuffle."""
    found: dict[Node, Shuffle] = {}
    claimed: set[Node] = set()
    for node in gm.graph.nodes:
        shuffle = _call_shuffle(gm, node) or _reshape_shuffle(node)
        if shuffle is not None and claimed.isdisjoint(shuffle.nodes):
            found[node] = shuffle
            claimed.update(shuffle.nodes)
    return found


def _may_shuffle(gm: GraphModule, node: Node) -> bool:
    """Cheap pre-check: whether `node` could be (part of) a shuffle."""
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)) is nn.ChannelShuffle
    return _target(node) in _SWAPS | _PERMUTES | {torch.channel_shuffle}


def _call_shuffle(gm: GraphModule, node: Node) -> Shuffle | None:
    """`nn.ChannelShuffle(g)(x)` or `torch.channel_shuffle(x, g)` (also `F.channel_shuffle`)."""
    if node.op == "call_module" and type(gm.get_submodule(node.target)) is nn.ChannelShuffle:
        return Shuffle((node,), gm.get_submodule(node.target).groups)
    if _target(node) is torch.channel_shuffle and node.args:
        groups = _size_value(arg(node, 1, "groups"), node_shape)
        return Shuffle((node,), groups if isinstance(groups, int) else None)
    return None


def _reshape_shuffle(node: Node) -> Shuffle | None:
    """x (N, C, *S) -> split (N, g, C/g, *R) -> swap dims 1, 2 -> merge (N, C, *S) ending at `node`.

    Only shapes matter: a merge of the contiguous swapped tensor back to x's shape is x[:, π]
    however the trailing dims were split."""
    if _target(node) not in _MERGES or not node.args:
        return None
    nodes = [node]
    swap = _skip_contiguous(node, nodes)
    if swap is None or not _swaps_1_2(swap):
        return None
    nodes.append(swap)
    split = _skip_contiguous(swap, nodes)
    if split is None or _target(split) not in _SPLITS or not split.args:
        return None
    nodes.append(split)
    x = split.args[0]
    if not isinstance(x, Node) or any(len(n.users) != 1 for n in nodes[1:]):
        return None
    shape, split_shape = node_shape(x), node_shape(split)
    if (shape is None or split_shape is None or node_shape(node) != shape or len(shape) < 2
            or len(split_shape) < 3 or split_shape[0] != shape[0]
            or split_shape[1] * split_shape[2] != shape[1]):
        return None
    n, channels, spatial = shape[0], shape[1], shape[2:]
    groups = split_shape[1]
    # far from every example size and distinct per axis, so a swapped or misread size shows
    probe = (1000 * n + 1, channels, *(1000 * s + i + 1 for i, s in enumerate(spatial)))

    def splits(sizes: tuple[int, ...]) -> bool:
        return (sizes[:3] == (probe[0], groups, channels // groups)
                and math.prod(sizes) == math.prod(probe))

    if not (_holds_at_probe(split, x, probe, splits)
            and _holds_at_probe(node, x, probe, lambda sizes: sizes == probe)):
        return None
    return Shuffle(tuple(reversed(nodes)), groups)


def _skip_contiguous(node: Node, nodes: list[Node]) -> Node | None:
    """The producer of `node`'s first argument past any `.contiguous()`, which join `nodes`."""
    value = node.args[0] if node.args else None
    while isinstance(value, Node) and _target(value) == "contiguous":
        nodes.append(value)
        value = value.args[0]
    return value if isinstance(value, Node) else None


def _swaps_1_2(node: Node) -> bool:
    """`transpose(1, 2)` (either order, negative dims too) or `permute(0, 2, 1, 3, ...)`."""
    shape = node_shape(node)
    dims = node.args[1:]
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    if shape is None or len(shape) < 3 or not all(type(d) is int for d in dims):
        return False
    rank = len(shape)
    dims = tuple(d % rank for d in dims)
    if _target(node) in _PERMUTES:
        return dims == (0, 2, 1, *range(3, rank))
    return _target(node) in _SWAPS and len(dims) == 2 and set(dims) == {1, 2}


def _holds_at_probe(node: Node, x: Node, probe: tuple[int, ...],
                    describes: Callable[[tuple[int, ...]], bool]) -> bool:
    """Whether the shape reshape `node` asks for still describes the shuffle when x has shape
    `probe`. Literal sizes count as written for the example's shape (already matched); computed
    sizes must follow x's shape. `flatten` takes dims only."""
    if _target(node) in _RESHAPES:
        sizes, dim = node.args[1:] if node.op == "call_method" else (arg(node, 1, "shape"),), None
        if len(sizes) == 1 and not isinstance(sizes[0], int):
            sizes = sizes[0]
    elif _target(node) in _SPLITS:  # unflatten(x, dim, sizes)
        sizes, dim = arg(node, 2, "sizes"), arg(node, 1, "dim")
    else:
        return True
    if isinstance(sizes, (tuple, list)) and all(type(s) is int for s in sizes):
        return True
    values = _size_value(sizes, lambda tensor: probe if tensor is x else None)
    if not isinstance(values, tuple) or not all(isinstance(v, int) for v in values):
        return False
    if dim is not None:  # the sizes replace dim `dim` of x
        if type(dim) is not int:
            return False
        dim %= len(probe)
        values = (*probe[:dim], *values, *probe[dim + 1:])
    known = math.prod(v for v in values if v != -1)
    if values.count(-1) == 1 and known and math.prod(probe) % known == 0:
        values = tuple(math.prod(probe) // known if v == -1 else v for v in values)
    return describes(values)


def _size_value(value, shape_of: Callable[[Node], tuple[int, ...] | None]):
    """A traced size expression evaluated with tensor shapes from `shape_of`: int literals,
    `t.shape`, `t.size()`, `t.size(d)`, indexing, `+ - * //` and tuples of them; None if it
    reads anything else."""
    if isinstance(value, (tuple, list)):
        items = [_size_value(v, shape_of) for v in value]
        return None if None in items else tuple(items)
    if isinstance(value, int) or not isinstance(value, Node):
        return value if isinstance(value, int) else None
    target, args = _target(value), value.args
    tensor = args[0] if args and isinstance(args[0], Node) else None
    if target == "size" and tensor is not None:
        shape, dim = shape_of(tensor), arg(value, 1, "dim")
        return shape if shape is None or dim is None else shape[dim]
    if target is getattr and tensor is not None and args[1] == "shape":
        return shape_of(tensor)
    if target is operator.getitem:
        sequence = _size_value(args[0], shape_of)
        index = args[1]
        return sequence[index] if isinstance(sequence, tuple) and type(index) is int else None
    if target in _SIZE_ARITHMETIC:
        a, b = (_size_value(v, shape_of) for v in args)
        return target(a, b) if isinstance(a, int) and isinstance(b, int) else None
    return None


class _Shuffles:
    """A sweep's recognized shuffles, by output node and by first node; `inserted` names the
    shuffles the running pass inserted (kept across its sweeps)."""

    def __init__(self, gm: GraphModule, inserted: set[Node] | None = None):
        self.by_output = find_shuffles(gm)
        self.by_start = {shuffle.nodes[0]: shuffle for shuffle in self.by_output.values()}
        self.inserted = set() if inserted is None else inserted


def _shuffle_at(gm: GraphModule, node: Node, shuffles: _Shuffles) -> tuple[Node, ...] | None:
    shuffle = shuffles.by_output.get(node)
    return None if shuffle is None else shuffle.nodes


def _remove_shuffle(gm: GraphModule, shuffle: Shuffle) -> None:
    """Route the shuffle's users to its input; erase its nodes and the size arithmetic only they
    read."""
    shuffle.output.replace_all_uses_with(shuffle.input)
    erase_unused(gm, reversed(shuffle.nodes))


# ---- neighbours: dense layers, BNs and channel-agnostic ops ----

def _kind(gm: GraphModule, node: Node) -> str | None:
    """"layer" (conv/linear), "bn" or "agnostic" for exact torch types; None for anything else."""
    if node.op == "call_module":
        kind = type(gm.get_submodule(node.target))
        if kind in _LAYERS:
            return "layer"
        if kind in _BNS:
            return "bn"
        return "agnostic" if kind in _AGNOSTIC_MODULES else None
    single_input = bool(node.args) and node.all_input_nodes == [node.args[0]]
    return "agnostic" if _target(node) in _AGNOSTIC_TARGETS and single_input else None


def _value_users(node: Node) -> list[Node]:
    """The users that read `node`'s values, not only its shape (which a permutation keeps)."""
    return [user for user in node.users
            if _target(user) not in ("size", "dim")
            and not (_target(user) is getattr and user.args[1] in ("shape", "ndim"))]


def _written_in_place(gm: GraphModule, shuffle: Shuffle) -> bool:
    """Whether a user modifies the shuffle's output in place: only a shuffle's own fresh tensor
    (torch.channel_shuffle always copies; the reshape spelling aliases x when g is 1 or C) keeps
    that write away from x, so such a shuffle stays (a producer fold is safe: x then has no other
    reader)."""
    return any(writes_in_place(gm, user) for user in shuffle.output.users)


def _name(gm: GraphModule, node: Node) -> str:
    special = {"placeholder": "the graph input", "output": "the graph output"}
    return special.get(node.op) or f"{describe(node)} ({op_kind(gm, node)})"


# ---- fold_channel_shuffle ----

@dataclass(frozen=True)
class _Fold:
    layer: Node  # the dense conv/linear the permutation folds into
    between: tuple[Node, ...]  # BNs and channel-agnostic ops, nearest the shuffle first
    consumer: bool  # the layer reads the shuffle (else it produces it)


def _plan(gm: GraphModule, shuffle: Shuffle, consumer: bool, rank: int) -> _Fold | Refuse:
    """The fold on one side of `shuffle`, or why there is none."""
    path: list[Node] = []  # from the shuffle outwards

    def refuse(reason: str) -> Refuse:
        names = [describe(n) for n in path]
        nodes = [shuffle.name, *names] if consumer else [*reversed(names), shuffle.name]
        return Refuse(reason, tuple(nodes),
                      "shuffle_into_consumer" if consumer else "shuffle_into_producer")

    node = shuffle.output if consumer else shuffle.input
    while True:
        if consumer:
            users = _value_users(node)
            if len(users) != 1:
                return refuse(CONSUMER_USERS)
            node = users[0]
        kind = _kind(gm, node)
        if kind is None:
            return refuse(f"{NO_LAYER}: stopped at {_name(gm, node)}")
        if consumer and not path and writes_in_place(gm, node):
            return refuse(f"{IN_PLACE}: {_name(gm, node)}")
        path.append(node)
        if kind == "layer":
            break
        if not consumer:
            node = node.args[0]
    if not consumer and any(len(_value_users(n)) != 1 for n in path):
        return refuse(PRODUCER_USERS)
    layer = gm.get_submodule(path[-1].target)
    groups = getattr(layer, "groups", 1)
    if groups > 1:
        grouped = GROUPED_CONSUMER if consumer else GROUPED_PRODUCER
        return refuse(f"{grouped}: {describe(path[-1])} has groups={groups}, "
                      f"{groups}x the multiply-adds")
    expected = 2 if isinstance(layer, nn.Linear) else layer.weight.ndim
    if rank != expected:
        return refuse(f"{CHANNEL_DIM}: {describe(path[-1])} on a {rank}-D tensor")
    stateful = [n for n in path if _kind(gm, n) in ("layer", "bn")]
    shared = [n for n in stateful if not called_once(gm, n)]
    if shared:
        return refuse(f"{SHARED_MODULE}: {describe(shared[0])}")
    return _Fold(path[-1], tuple(path[:-1]), consumer)


def _permute_bn(bn: nn.Module, perm: Tensor) -> None:
    """Permute a BN's running statistics and affine parameters (whichever it has)."""
    for name in ("running_mean", "running_var", "weight", "bias"):
        value = getattr(bn, name)
        if value is not None:
            permuted = wa.permute_vector(value.detach(), perm)
            if isinstance(value, nn.Parameter):
                permuted = nn.Parameter(permuted, requires_grad=value.requires_grad)
            setattr(bn, name, permuted)


@dataclass(frozen=True)
class _ShufflePlan:
    shuffle: Shuffle
    perm: Tensor
    fold: _Fold | None  # None: the shuffle is the identity and goes


def _check_fold(match: Match) -> _ShufflePlan | Refuse | list[Refuse]:
    """Fold the shuffle (consumer side first), drop it if it is the identity, or say why not."""
    gm, shuffle = match.gm, match.memo.by_output[match.anchor]
    if shuffle.groups is None:
        return Refuse(UNKNOWN_GROUPS, (shuffle.name,))
    shape = node_shape(shuffle.output)
    if shape is None:
        return Refuse(SHAPES_UNKNOWN, (shuffle.name,))
    perm = wa.channel_shuffle_permutation(shape[1], shuffle.groups)
    if torch.equal(perm, torch.arange(len(perm))) and not _written_in_place(gm, shuffle):
        return _ShufflePlan(shuffle, perm, None)
    refusals = []
    for consumer in (True, False):
        plan = _plan(gm, shuffle, consumer, len(shape))
        if isinstance(plan, _Fold):
            return _ShufflePlan(shuffle, perm, plan)
        refusals.append(plan)
    return refusals


def _fold(match: Match, plan: _ShufflePlan) -> str:
    gm, shuffle, fold, perm = match.gm, plan.shuffle, plan.fold, plan.perm
    if fold is None:
        _remove_shuffle(gm, shuffle)
        return (f"removed shuffle {shuffle.name}: groups={shuffle.groups} on {len(perm)} "
                f"channels is the identity")
    # a consumer-side BN sees x[:, π]: its vectors become p[π⁻¹]; a producer-side one p[π]
    vector_perm = wa.invert_permutation(perm) if fold.consumer else perm
    with torch.no_grad():
        for node in fold.between:
            if _kind(gm, node) == "bn":
                _permute_bn(gm.get_submodule(node.target), vector_perm)
        layer = gm.get_submodule(fold.layer.target)
        if fold.consumer:
            set_weights(layer, wa.permute_input_channels(layer.weight, perm), None)
        else:
            weight, bias = wa.permute_output_channels(layer.weight, layer.bias, perm)
            set_weights(layer, weight, bias if layer.bias is not None else None)
    _remove_shuffle(gm, shuffle)
    side = "consumer" if fold.consumer else "producer"
    between = fold.between if fold.consumer else fold.between[::-1]  # in graph order
    through = f" through {', '.join(map(describe, between))}" if between else ""
    return (f"folded shuffle {shuffle.name} (groups={shuffle.groups}) into the {side} "
            f"{describe(fold.layer)}{through}")


FOLD_RULES = (
    # W ⋆ x[:, π] -> W[:, π⁻¹] ⋆ x;  (W ⋆ x + b)[:, π] -> W[π] ⋆ x + b[π]   (R11)
    Rule("fold_channel_shuffle", _shuffle_at, _check_fold, _fold,
         "W ⋆ x[:, π] = W[:, π⁻¹] ⋆ x"),
)


@register_pass("fold_channel_shuffle",
               "fold channel shuffles into a neighbouring dense conv/linear, through BN and "
               "activations (R11)", True)
def fold_channel_shuffle(gm: GraphModule, ctx: PassContext) -> PassResult:
    return apply_rules(gm, FOLD_RULES, memo=_Shuffles)


# ---- canonicalize_channel_shuffle ----

def _check_canonical(match: Match) -> Shuffle | Refuse | tuple[()]:
    gm, shuffle = match.gm, match.memo.by_output[match.anchor]
    if shuffle.canonical:
        return ()
    shape = node_shape(shuffle.output)
    if shape is not None and len(shape) < 3:
        return Refuse(RANK_2, (shuffle.name,))
    if _written_in_place(gm, shuffle):
        return Refuse(IN_PLACE, (shuffle.name,))
    return shuffle


def _canonicalize(match: Match, shuffle: Shuffle) -> str:
    gm, output = match.gm, shuffle.output
    with gm.graph.inserting_after(output):
        canonical = gm.graph.call_function(torch.channel_shuffle, (shuffle.input, shuffle.groups))
    output.replace_all_uses_with(canonical)
    erase_unused(gm, reversed(shuffle.nodes))
    return f"shuffle {shuffle.name} -> torch.channel_shuffle(groups={shuffle.groups})"


CANONICAL_RULES = (
    # any spelling of x[:, π] -> torch.channel_shuffle(x, g)
    Rule("canonical_shuffle", _shuffle_at, _check_canonical, _canonicalize,
         "reshape-transpose-reshape = channel_shuffle"),
)


@register_pass("canonicalize_channel_shuffle",
               "rewrite every recognized channel-shuffle spelling as torch.channel_shuffle(x, g)",
               True)
def canonicalize_channel_shuffle(gm: GraphModule, ctx: PassContext) -> PassResult:
    return apply_rules(gm, CANONICAL_RULES, memo=_Shuffles)


# ---- insert_channel_shuffle ----

def _conv(gm: GraphModule, node: Node) -> nn.Module | None:
    if node.op == "call_module" and type(gm.get_submodule(node.target)) in _CONVS:
        return gm.get_submodule(node.target)
    return None


def _next_conv(gm: GraphModule, node: Node, starts: dict[Node, Shuffle]
               ) -> tuple[Node, Shuffle | None] | None:
    """The first conv after `node` that is not channel-wise, reached through tensors read once,
    BNs, channel-agnostic ops, channel-wise convs and shuffles; and the shuffle passed, if any."""
    shuffled = None
    while True:
        users = _value_users(node)
        user = users[0] if len(users) == 1 else None
        if user is None or not user.args or user.args[0] is not node:
            return None
        if user in starts:
            shuffled = starts[user]
            node = shuffled.output
            continue
        conv = _conv(gm, user)
        if conv is not None and conv.groups != conv.in_channels:
            return user, shuffled
        if conv is None and _kind(gm, user) not in ("bn", "agnostic"):
            return None
        node = user


def _grouped_pair(gm: GraphModule, node: Node, shuffles: _Shuffles) -> tuple[Node, ...] | None:
    """A grouped conv (1 < groups < its input channels) and the next conv it feeds."""
    conv = _conv(gm, node)
    if conv is None or not 1 < conv.groups < conv.in_channels:
        return None
    found = _next_conv(gm, node, shuffles.by_start)
    return None if found is None else (node, found[0])


def _check_insert(match: Match) -> int | Refuse | tuple[()]:
    gm, (first, second), shuffles = match.gm, match.nodes, match.memo
    shuffled = _next_conv(gm, first, shuffles.by_start)[1]
    g1, g2 = _conv(gm, first).groups, _conv(gm, second).groups
    names = (describe(first), describe(second))
    shape, rank = node_shape(second.args[0]), _conv(gm, second).weight.ndim
    if shuffled is not None:
        return () if shuffled.output in shuffles.inserted else Refuse(SHUFFLED)
    if g2 == 1:
        return Refuse(f"{DENSE_NEXT}: {names[1]} has groups=1")
    if g2 % g1:
        return Refuse(f"{MIXED}: groups={g2} of {names[1]} is not a multiple of groups={g1} of "
                      f"{names[0]}")
    if shape is not None and len(shape) != rank:
        return Refuse(f"{CHANNEL_DIM}: {names[1]} on a {len(shape)}-D tensor")
    return g1


def _insert(match: Match, groups: int) -> str:
    gm, (first, second) = match.gm, match.nodes
    source = second.args[0]
    with gm.graph.inserting_before(second):
        shuffle = gm.graph.call_function(torch.channel_shuffle, (source, groups))
    second.replace_input_with(source, shuffle)
    match.memo.inserted.add(shuffle)
    return (f"inserted channel_shuffle(groups={groups}) before {describe(second)}: each of its "
            f"{_conv(gm, second).groups} groups saw one of the {groups} groups of "
            f"{describe(first)}")


INSERT_RULES = (
    # conv_g1 -> [BN, act, depthwise]* -> conv_g2 (g1 | g2) -> ... shuffle_g1 -> conv_g2
    Rule("insert_channel_shuffle", _grouped_pair, _check_insert, _insert,
         "none: an architecture change"),
)


@register_pass("insert_channel_shuffle",
               "insert a channel shuffle between grouped convs whose groups never mix "
               "(ShuffleNet); an architecture change, for use before training", False)
def insert_channel_shuffle(gm: GraphModule, ctx: PassContext) -> PassResult:
    inserted: set[Node] = set()
    return apply_rules(gm, INSERT_RULES, memo=lambda gm: _Shuffles(gm, inserted))
