"""Merge consecutive linear convs into one conv (R6, R7, R8 of `docs/rewrites.md`).

    conv_conv   conv -> [eval BN, constant scale/bias, zero pad]* -> conv  =  one conv

The chain is composed by `archc.rewrite.linear_chains` (R6 1x1 -> KxK, R7 KxK -> 1x1, R8 in
general), exactly or not at all: the second conv must not zero-pad a tensor that is non-zero at the
border (the border trap), and every intermediate tensor must be read by the chain alone. A cost rule
decides the rest: merge only if the merged conv costs no more multiply-adds per output pixel than
the convs it replaces (the first conv counted at the second conv's output resolution). Merging
usually raises the cost (two 3x3 -> one 5x5: 18 C² -> 25 C²), so every decision is reported with
both numbers.

A refusal reason starts with one of the constants below, of `archc.rewrite.linear_chains` or of
`archc.rewrite.legality`; details may follow after ": ".
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.fx import GraphModule, Node

from archc.ir.graph import describe, erase_unused, source_dtype
from archc.ir.ops import CONV_MODULES, op_kind
from archc.rewrite.legality import OTHER_USERS
from archc.rewrite.linear_chains import (
    AvgPool,
    ComposedConv,
    LinearNode,
    LinearReader,
    NotLinear,
    Unmergeable,
    UnpaddedConv,
    chain_costs,
    conv_label,
    conv_module,
)
from archc.rewrite.pipeline import PassContext, PassResult, register_pass
from archc.rewrite.rules import Done, Match, Plan, Refuse, Rule, Skip, apply_rules

COST = "cost rule: the merged conv needs more multiply-adds than the convs it replaces"
NONLINEAR = "a non-linear op between the convs"


def _is_conv_module(gm: GraphModule, node: Node) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), CONV_MODULES)


def _passes_through(op: LinearNode | NotLinear) -> bool:
    """An op a merged chain may contain between its convs: affine maps and zero pads."""
    return isinstance(op, LinearNode) and not any(
        isinstance(step, (UnpaddedConv, AvgPool)) for step in op.steps)


def _chain(gm: GraphModule, second: Node, reader: LinearReader) -> tuple[Node, ...] | None:
    """conv -> [affine / pad]* -> `second`, walking back from `second`; or, where a node that is
    no affine/pad op stops the walk right after a conv, (that conv, the node, `second`)."""
    if not _is_conv_module(gm, second) or not second.args:
        return None
    between: list[Node] = []  # consumer first
    node = second.args[0]
    while isinstance(node, Node):
        if _is_conv_module(gm, node):
            return (node, *reversed(between), second)
        op = reader.op(node)
        if not _passes_through(op):
            inputs = [n for n in node.all_input_nodes if reader.is_tensor(n)]
            blocked = len(inputs) == 1 and _is_conv_module(gm, inputs[0])
            return (inputs[0], node, second) if blocked else None
        between.append(node)
        node = op.input
    return None


@dataclass(frozen=True)
class _Merge:
    state: ComposedConv
    padding: tuple[int, ...]
    label: str  # which identity, the merged geometry, the cost numbers, a rounding-level zero


def _check(match: Match) -> Plan | Refuse | Skip:
    gm, reader, chain = match.gm, match.memo, match.nodes
    first, second = chain[0], chain[-1]
    for node in chain[1:-1]:
        op = reader.op(node)
        if isinstance(op, NotLinear):
            return Refuse(op.reason or f"{NONLINEAR}: {op_kind(gm, node)}")
        if not _passes_through(op):
            return Skip()  # a linear conv or pool between: another chain's business
    for node in (first, second):
        op = reader.op(node)
        if isinstance(op, NotLinear):
            return Refuse(op.reason) if op.reason else Skip()
    if any(set(n.users) != {user} for n, user in zip(chain, chain[1:])):
        return Refuse(OTHER_USERS)
    first_conv = _conv_step(reader.op(first))
    channels = first_conv.weight.shape[1] * first_conv.groups
    spatial_dims = first_conv.weight.ndim - 2
    steps = [step for n in chain for step in reader.op(n).steps]
    try:  # the cost from the shapes first: composing large refused chains would dominate
        merged, unmerged = chain_costs(channels, spatial_dims, steps)
        numbers = f"merged {merged} vs unmerged {unmerged} MACs per output pixel"
        if merged > unmerged:
            return Refuse(f"{COST}: {numbers}")
        start = ComposedConv.identity(channels, spatial_dims,
                                      gm.get_submodule(first.target).weight.dtype, source_dtype(gm))
        state = start.then_all(steps)
        padding = state.padding()
    except Unmergeable as refusal:
        return Refuse(refusal.reason)
    identity = _identity(first_conv, _conv_step(reader.op(second)))
    rounding = (f"; the border bias is zero up to {str(state.rounding).removeprefix('torch.')} "
                f"rounding" if state.rounded else "")
    return Plan(_Merge(state, padding,
                       f"{identity}; {conv_label(state.conv, padding)}; {numbers}{rounding}"))


def _conv_step(op: LinearNode) -> UnpaddedConv:
    return next(step for step in op.steps if isinstance(step, UnpaddedConv))


def _identity(first: UnpaddedConv, second: UnpaddedConv) -> str:
    if second.pointwise:
        return "R7 KxK -> 1x1"
    if first.pointwise:
        return "R6 1x1 -> KxK"
    return "R8 KxK -> KxK"


def _merge(match: Match, plan: _Merge) -> Done:
    gm, chain, state = match.gm, match.nodes, plan.state
    first, second = chain[0], chain[-1]
    like = gm.get_submodule(second.target).weight
    gm.add_submodule(second.target, conv_module(state, like))
    second.replace_input_with(second.args[0], first.args[0])
    erase_unused(gm, [*reversed(chain[1:-1]), first])
    line = f"merged {' -> '.join(map(describe, chain))} into {second.target} ({plan.label})"
    return Done(line, state.rounding if state.rounded else None)


RULES = (
    # conv2(affine(pad(conv1(x)))) -> conv'(x)   (R6 / R7 / R8, exact, no costlier)
    Rule("conv_conv", lambda gm, node, reader: _chain(gm, node, reader), _check, _merge,
         "W2 ⋆ (W1 ⋆ x + b1) + b2 = (W2 ∘ W1) ⋆ x + (b2 + Σ W2 b1)"),
)


def merge_convs(gm: GraphModule) -> PassResult:
    """The rules of this pass on `gm` (no training-mode check: for tests of the refusals)."""
    return apply_rules(gm, RULES, memo=LinearReader)


@register_pass("merge_sequential_convs",
               "merge consecutive linear convs into one (R6 1x1->KxK, R7 KxK->1x1, R8) when exact "
               "and no costlier", True)
def merge_sequential_convs(gm: GraphModule, ctx: PassContext) -> PassResult:
    return merge_convs(gm)
