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

Shuffles are recognized in every spelling by `archc.ir.shuffles.find_shuffles`.

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

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Node

from archc.ir.graph import (
    called_once,
    describe,
    erase_unused,
    set_weights,
    writes_in_place,
)
from archc.ir.ops import (
    ACTIVATION_FUNCTIONS,
    ACTIVATION_METHODS,
    ACTIVATION_MODULES,
    BN_MODULES,
    CONV_MODULES,
    call_target,
    op_kind,
)
from archc.ir.shapes import node_shape
from archc.ir.shuffles import Shuffle, find_shuffles
from archc.rewrite import weight_algebra as wa
from archc.rewrite.legality import SHAPES_UNKNOWN, SHARED_MODULE
from archc.rewrite.pipeline import PassContext, PassResult, register_pass
from archc.rewrite.rules import Match, Plan, Refuse, Refused, Rule, Skip, apply_rules

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

_LAYERS = (*CONV_MODULES, nn.Linear)
# Channel-agnostic: the same per-element map on every channel, no per-channel parameters.
_AGNOSTIC_MODULES = (*ACTIVATION_MODULES, nn.Identity)
_AGNOSTIC_TARGETS = ACTIVATION_FUNCTIONS | ACTIVATION_METHODS | {"contiguous"}


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
        if kind in BN_MODULES:
            return "bn"
        return "agnostic" if kind in _AGNOSTIC_MODULES else None
    single_input = bool(node.args) and node.all_input_nodes == [node.args[0]]
    return "agnostic" if call_target(node) in _AGNOSTIC_TARGETS and single_input else None


def _value_users(node: Node) -> list[Node]:
    """The users that read `node`'s values, not only its shape (which a permutation keeps)."""
    return [user for user in node.users
            if call_target(user) not in ("size", "dim")
            and not (call_target(user) is getattr and user.args[1] in ("shape", "ndim"))]


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


def _check_fold(match: Match) -> Plan | Refuse | Refused:
    """Fold the shuffle (consumer side first), drop it if it is the identity, or say why not."""
    gm, shuffle = match.gm, match.memo.by_output[match.anchor]
    if shuffle.groups is None:
        return Refuse(UNKNOWN_GROUPS, (shuffle.name,))
    shape = node_shape(shuffle.output)
    if shape is None:
        return Refuse(SHAPES_UNKNOWN, (shuffle.name,))
    perm = wa.channel_shuffle_permutation(shape[1], shuffle.groups)
    if torch.equal(perm, torch.arange(len(perm))) and not _written_in_place(gm, shuffle):
        return Plan(_ShufflePlan(shuffle, perm, None))
    refusals = []
    for consumer in (True, False):
        plan = _plan(gm, shuffle, consumer, len(shape))
        if isinstance(plan, _Fold):
            return Plan(_ShufflePlan(shuffle, perm, plan))
        refusals.append(plan)
    return Refused(tuple(refusals))


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

def _check_canonical(match: Match) -> Plan | Refuse | Skip:
    gm, shuffle = match.gm, match.memo.by_output[match.anchor]
    if shuffle.canonical:
        return Skip()
    shape = node_shape(shuffle.output)
    if shape is not None and len(shape) < 3:
        return Refuse(RANK_2, (shuffle.name,))
    if _written_in_place(gm, shuffle):
        return Refuse(IN_PLACE, (shuffle.name,))
    return Plan(shuffle)


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
    if node.op == "call_module" and type(gm.get_submodule(node.target)) in CONV_MODULES:
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


def _check_insert(match: Match) -> Plan | Refuse | Skip:
    gm, (first, second), shuffles = match.gm, match.nodes, match.memo
    shuffled = _next_conv(gm, first, shuffles.by_start)[1]
    g1, g2 = _conv(gm, first).groups, _conv(gm, second).groups
    names = (describe(first), describe(second))
    shape, rank = node_shape(second.args[0]), _conv(gm, second).weight.ndim
    if shuffled is not None:
        return Skip() if shuffled.output in shuffles.inserted else Refuse(SHUFFLED)
    if g2 == 1:
        return Refuse(f"{DENSE_NEXT}: {names[1]} has groups=1")
    if g2 % g1:
        return Refuse(f"{MIXED}: groups={g2} of {names[1]} is not a multiple of groups={g1} of "
                      f"{names[0]}")
    if shape is not None and len(shape) != rank:
        return Refuse(f"{CHANNEL_DIM}: {names[1]} on a {len(shape)}-D tensor")
    return Plan(g1)


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
