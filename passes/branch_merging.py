"""Merge parallel linear branches on one input into one conv (R3, R4, R5, R9, R10 of
`docs/rewrites.md`).

    parallel_sum  Σ_j c_j branch_j(x)  = conv'(x)     a tree of adds: `+`, `-`, `torch.add(alpha=)`
    parallel_cat  cat_j branch_j(x)    = conv'(x)     `torch.cat(..., dim=1)`

Found from the graph, not from module names: every operand is a chain of linear ops on one
shared input tensor, composed by `archc.rewrite.linear_chains` into `conv_j(pad_j(x))` (convs, eval
BN, constant scales and biases, zero/constant pads, average pooling, 1x1 -> KxK), then:

    R3  x             = W_id ⋆ x,  W_id[i, i mod C/g, centre] = 1   (C_in = C_out, stride 1)
    R4  W_k ⋆ x (pad p_K - d (K - k) / 2) = pad(W_k, (K - k) / 2 per side) ⋆ x (pad p_K)
    R9  avgpool_k(x)  = (1/Πk) ⋆ x per channel   (count_include_pad=True, ceil_mode=False)
    s   c (W ⋆ x + b) = (c W) ⋆ x + c b          (`c * branch`, `branch - ...`, alpha, BN, scale)
    R5  Σ_j (W_j ⋆ x + b_j) = (Σ_j W_j) ⋆ x + Σ_j b_j
    R10 cat_j (W_j ⋆ x + b_j) = (cat_j W_j) ⋆ x + cat_j b_j   (groups 1)

Alignment: the same stride; kernels larger than 1 on an axis share one dilation (a 1-wide kernel
has none); K - k even; symmetric padding `p_k = p_K - d (K - k) / 2` per axis. Groups: the merged
conv takes the gcd of the branches' groups and block-diagonalises the others; a cost rule
decides: merge only if the merged conv needs no more multiply-adds per output pixel than the
branches and the adds it replaces, and every decision is reported with both numbers.

Branches that read the same input tensor merge even when others do not (the rest of the sum
stays), and when a sum of three or more cannot merge as a whole, the cheapest branch whose
removal lets the rest merge stays apart (a dilated DBB's avg-pool branch). A branch whose chain
reaches the input only through a tensor with other users, or through a non-linear op, does not
merge. A sum followed by a BN becomes a conv followed by a BN, which the next `fold_bn` folds
(R1); a merged inner sum can merge into an outer one in a later sweep.

A refusal reason starts with one of the constants below, of `archc.rewrite.linear_chains` or of
`archc.rewrite.legality`; details may follow after ": ".
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from archc.ir.graph import describe, erase_unused, source_dtype, unique_name
from archc.ir.ops import op_kind
from archc.ir.shapes import node_shape
from archc.rewrite import weight_algebra as wa
from archc.rewrite.legality import OTHER_USERS, SHAPES_UNKNOWN
from archc.rewrite.linear_chains import (
    ADD_TARGETS,
    SUB_TARGETS,
    ComposedConv,
    LinearNode,
    LinearReader,
    NotLinear,
    Step,
    Unmergeable,
    UnpaddedConv,
    conv_label,
    conv_module,
    dtype_at,
)
from archc.rewrite.pipeline import PassContext, PassResult, register_pass
from archc.rewrite.rules import (
    Done,
    Match,
    Plan,
    Refuse,
    Refused,
    Rule,
    Skip,
    apply_rules,
    without_plan,
)

DIFFERENT_INPUTS = "branches read different inputs"
STRIDE_MISMATCH = "stride mismatch between branches"
DILATION_MISMATCH = "dilation mismatch: the branches' kernels larger than 1 need one dilation"
PADDING_NOT_ALIGNED = ("padding not aligned: R4 needs symmetric p_k = p_K - d (K - k) / 2 on "
                       "every axis")
KERNEL_PARITY = "kernel size cannot be embedded: K - k must be even on every axis (a centre)"
GROUPS_MISMATCH = ("groups mismatch: densifying the grouped branches to block-diagonal form costs "
                   "more multiply-adds than the branches")
MERGE_COST = "cost rule: the merged conv needs more multiply-adds than the branches"
NONLINEAR = "branch contains a non-linear op (or one that is not a mergeable linear op)"
IDENTITY_MISMATCH = "identity branch needs C_in = C_out and stride 1 (channel or stride mismatch)"
BROADCAST = "branch outputs differ in shape: the sum broadcasts"


# ---- reading sums, cats and branches ----

@dataclass(frozen=True, eq=False)
class _Branch:
    """One operand of a sum or cat: the linear nodes from `leaf` back to the first op that is not
    linear (`stop`). The branch proper is `nodes[:split]`; its input is the first tensor on the
    way back that others read too (or `stop`)."""

    leaf: Node
    coefficient: float
    nodes: tuple[Node, ...]  # leaf first
    ops: tuple[LinearNode, ...]
    stop: Node
    stop_reason: str | None
    split: int

    @property
    def path(self) -> tuple[Node, ...]:
        return (*self.nodes, self.stop)

    @property
    def input(self) -> Node:
        return self.path[self.split]

    @property
    def segment(self) -> tuple[Node, ...]:
        return self.nodes[:self.split]

    def steps(self) -> list[Step]:
        return [step for op in reversed(self.ops[:self.split]) for step in op.steps]


def _branch(reader: LinearReader, leaf: Node, coefficient: float, consumers: set[Node]
            ) -> _Branch:
    nodes: list[Node] = []
    ops: list[LinearNode] = []
    split = None
    node, downstream = leaf, consumers
    while True:
        op = reader.op(node)
        private = bool(node.users) and set(node.users) <= downstream
        if split is None and (not private or isinstance(op, NotLinear)):
            split = len(nodes)
        if isinstance(op, NotLinear):
            return _Branch(leaf, coefficient, tuple(nodes), tuple(ops), node, op.reason, split)
        nodes.append(node)
        ops.append(op)
        node, downstream = op.input, {node}


def _sum_operands(reader: LinearReader, node: Node) -> list[tuple[Node, float]] | None:
    """`[(a, 1), (b, ±alpha)]` for `a + alpha b` / `a - alpha b` of two non-constant tensors."""
    if node.op not in ("call_function", "call_method"):
        return None
    if node.target not in ADD_TARGETS | SUB_TARGETS:
        return None
    if len(node.args) != 2 or set(node.kwargs) - {"alpha"}:
        return None
    alpha = node.kwargs.get("alpha", 1)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        return None
    a, b = node.args
    if not (reader.is_tensor(a) and reader.is_tensor(b)):
        return None
    return [(a, 1.0), (b, (-alpha if node.target in SUB_TARGETS else alpha) * 1.0)]


def _sum_root(gm: GraphModule, node: Node, reader: LinearReader) -> tuple[Node, ...] | None:
    """`(node,)` if `node` is the outermost add of a sum tree."""
    if _sum_operands(reader, node) is None:
        return None
    user = next(iter(node.users)) if len(node.users) == 1 else None
    return (node,) if user is None or _sum_operands(reader, user) is None else None


def _sum_tree(reader: LinearReader, root: Node) -> tuple[list[Node], dict[Node, float]]:
    """The add nodes of the tree under `root` (parents first) and its leaves with coefficients."""
    adds: list[Node] = []
    leaves: dict[Node, float] = {}

    def visit(node: Node, coefficient: float) -> None:
        adds.append(node)
        for operand, sign in _sum_operands(reader, node):
            if _sum_operands(reader, operand) is not None and len(operand.users) == 1:
                visit(operand, coefficient * sign)
            else:
                leaves[operand] = leaves.get(operand, 0.0) + coefficient * sign

    visit(root, 1.0)
    return list(dict.fromkeys(adds)), leaves


def _cat_operands(reader: LinearReader, node: Node) -> list[Node] | None:
    """The tensors of `torch.cat(tensors, dim=1)`."""
    if node.op != "call_function" or node.target is not torch.cat or not node.args:
        return None
    if len(node.args) > 2 or set(node.kwargs) - {"dim"}:
        return None
    dim = node.args[1] if len(node.args) == 2 else node.kwargs.get("dim", 0)
    shape = node_shape(node)
    if dim != 1 and not (shape is not None and dim == 1 - len(shape)):
        return None
    tensors = node.args[0]
    if not isinstance(tensors, (list, tuple)) or not all(map(reader.is_tensor, tensors)):
        return None
    return list(tensors)


def _cat_node(gm: GraphModule, node: Node, reader: LinearReader) -> tuple[Node, ...] | None:
    return (node,) if _cat_operands(reader, node) is not None else None


# ---- planning a merge ----

@dataclass(frozen=True)
class _Geometry:
    """The merged conv's geometry."""

    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    padding: tuple[int, ...]
    groups: int


def _align(states: Sequence[ComposedConv], concat: bool) -> _Geometry:
    """The conv every branch embeds into (R3, R4), or `Unmergeable`."""
    n = states[0].spatial_dims
    convs = [s.conv for s in states if s.conv is not None]
    strides = {c.stride for c in convs}
    if len(strides) > 1:
        raise Unmergeable(STRIDE_MISMATCH)
    stride = strides.pop() if strides else (1,) * n
    in_channels = states[0].in_channels
    outs = {s.out_channels for s in states}
    if len(convs) < len(states) and (stride != (1,) * n or outs != {in_channels}):
        raise Unmergeable(IDENTITY_MISMATCH)
    if not concat and len(outs) > 1:
        raise Unmergeable(BROADCAST)
    kernel, dilation, padding = [], [], []
    for axis in range(n):
        sizes = [1 if s.conv is None else s.conv.kernel[axis] for s in states]
        dilations = {s.conv.dilation[axis] for s, k in zip(states, sizes) if k > 1}
        if len(dilations) > 1:
            raise Unmergeable(DILATION_MISMATCH)
        d, size = (dilations.pop() if dilations else 1), max(sizes)
        if any((size - k) % 2 for k in sizes):
            raise Unmergeable(KERNEL_PARITY)
        pads = [s.pads[axis] for s in states]
        pad = pads[sizes.index(size)][0]
        if any(p != (pad - d * (size - k) // 2,) * 2 for p, k in zip(pads, sizes)):
            raise Unmergeable(PADDING_NOT_ALIGNED)
        kernel.append(size)
        dilation.append(d)
        padding.append(pad)
    groups = 1 if concat else math.gcd(*[c.groups for c in convs]) if convs else in_channels
    return _Geometry(tuple(kernel), stride, tuple(dilation), tuple(padding), groups)


def _plan(states: Sequence[ComposedConv], coefficients: Sequence[float], concat: bool
          ) -> tuple[_Geometry, UnpaddedConv, str]:
    """The merged conv and the cost decision (`; merged .. vs unmerged ..`), or `Unmergeable`."""
    geometry = _align(states, concat)
    conv = _merged_conv(geometry, states, coefficients, concat)
    adds = 0 if concat else (len(states) - 1) * conv.weight.shape[0]
    merged, unmerged = conv.weight.numel(), sum(s.macs() for s in states) + adds
    numbers = f"merged {merged} vs unmerged {unmerged} MACs per output pixel"
    densified = sorted({s.conv.groups for s in states
                        if s.conv is not None and not _diagonal(s)} - {geometry.groups})
    if merged > unmerged:
        raise Unmergeable(f"{GROUPS_MISMATCH if densified else MERGE_COST}: {numbers}")
    if densified:
        groups = "/".join(map(str, densified))
        numbers = f"groups {groups} densified to {geometry.groups}; {numbers}"
    return geometry, conv, f"; {numbers}"


def _leave_one_out(states: Sequence[ComposedConv], coefficients: Sequence[float]
                   ) -> tuple[int, tuple[_Geometry, UnpaddedConv, str]] | None:
    """The sum without one branch (the cheapest that works), when the whole one cannot merge:
    e.g. DBB's avg-pool branch at dilation 2 stays apart, the other five merge."""
    if len(states) < 3:
        return None
    for drop in sorted(range(len(states)), key=lambda index: states[index].macs()):
        rest = [index for index in range(len(states)) if index != drop]
        try:
            return drop, _plan([states[i] for i in rest], [coefficients[i] for i in rest], False)
        except Unmergeable:
            continue
    return None


def _diagonal(state: ComposedConv) -> bool:
    """A per-channel affine of the input (BN-only identity, scale): any groups hold it for free."""
    conv = state.conv
    return conv.pointwise and conv.groups == state.in_channels == state.out_channels


def _merged_conv(geometry: _Geometry, states: Sequence[ComposedConv],
                 coefficients: Sequence[float], concat: bool) -> UnpaddedConv:
    """R3/R4/R9/scale on every branch, then R5 (sum) or R10 (cat), in float64."""
    parts = []
    for state, coefficient in zip(states, coefficients):
        if state.conv is None:
            channels = state.in_channels
            weight = wa.identity_kernel(channels, geometry.groups, geometry.kernel, torch.float64)
            bias = weight.new_zeros(channels)
        else:
            dense = wa.grouped_to_dense(state.conv.weight, state.conv.groups, geometry.groups)
            weight, bias = wa.pad_kernel(dense, geometry.kernel), state.conv.bias
        if coefficient != 1:
            weight, bias = wa.scale_branch(weight, bias, coefficient)
        parts.append((weight, bias))
    weight, bias = wa.concat_convs(parts) if concat else wa.sum_branches(parts)
    return UnpaddedConv(weight, bias, geometry.stride, geometry.dilation, geometry.groups)


@dataclass(frozen=True)
class _GroupMerge:
    """Branches of one input that become one conv: what the rewrite inserts."""

    members: tuple[_Branch, ...]
    state: ComposedConv  # the merged conv on the input, padding included
    description: str


def _identity_on(gm: GraphModule, branches: Sequence[_Branch]) -> ComposedConv:
    """The identity on the branches' input: channels and rank from its shape, else from the
    first conv in a branch."""
    source = branches[0].input
    dtype, rounding = dtype_at(gm, source), source_dtype(gm)
    shape = node_shape(source)
    if shape is not None:
        if len(shape) < 2:
            raise Unmergeable(SHAPES_UNKNOWN)
        return ComposedConv.identity(shape[1], len(shape) - 2, dtype, rounding)
    for step in (s for b in branches for s in b.steps()):
        if isinstance(step, UnpaddedConv):
            channels = step.weight.shape[1] * step.groups
            return ComposedConv.identity(channels, step.weight.ndim - 2, dtype, rounding)
    raise Unmergeable(SHAPES_UNKNOWN)


def _plan_group(gm: GraphModule, group: list[_Branch], anchor: Node, concat: bool
                ) -> tuple[_GroupMerge | None, list[Refuse]]:
    """How the branches of `group` (one input) merge, and what stays apart and why."""
    refusals: list[Refuse] = []
    try:
        start = _identity_on(gm, group)
    except Unmergeable as refusal:
        return None, [Refuse(refusal.reason, (*[b.leaf for b in group], anchor))]
    members, states = [], []
    for branch in group:
        try:
            states.append(start.then_all(branch.steps()))
            members.append(branch)
        except Unmergeable as refusal:
            refusals.append(Refuse(refusal.reason, (branch.leaf, anchor)))
    if len(members) < 2:
        return None, refusals
    try:
        geometry, conv, note = _plan(states, [b.coefficient for b in members], concat)
    except Unmergeable as refusal:
        kept = None if concat else _leave_one_out(states, [b.coefficient for b in members])
        if kept is None:
            return None, [*refusals, Refuse(refusal.reason, (*[b.leaf for b in members], anchor))]
        index, (geometry, conv, note) = kept
        refusals.append(Refuse(refusal.reason, (members[index].leaf, anchor)))
        del members[index], states[index]
    rounded = any(s.rounded for s in states)
    state = ComposedConv(start.in_channels, tuple((p, p) for p in geometry.padding), conv,
                         start.dtype, start.rounding, rounded=rounded)
    if rounded:
        dtype = str(start.rounding).removeprefix("torch.")
        note += f"; a border bias is zero up to {dtype} rounding"
    description = (f"{len(members)} branches ({', '.join(describe(b.leaf) for b in members)}) "
                   f"of {describe(members[0].input)} into {{name}} "
                   f"({conv_label(conv, geometry.padding)}{note})")
    return _GroupMerge(tuple(members), state, description), refusals


def _insert(gm: GraphModule, merge: _GroupMerge, anchor: Node) -> tuple[Node, Done]:
    """Add the merged conv as a module named after the branches' common parent, called on their
    input before `anchor`; the new node and the report line."""
    parents = [n.target.split(".")[:-1] for b in merge.members for n in b.segment
               if n.op == "call_module"]
    prefix = []
    for parts in zip(*parents) if parents else ():
        if len(set(parts)) > 1:
            break
        prefix.append(parts[0])
    name = unique_name(gm, ".".join([*prefix, "merged"]))
    like = next((p for b in merge.members for n in b.segment if n.op == "call_module"
                 for p in gm.get_submodule(n.target).parameters()), None)
    gm.add_submodule(name, conv_module(merge.state, like))
    with gm.graph.inserting_before(anchor):
        node = gm.graph.call_module(name, (merge.members[0].input,))
    state = merge.state
    return node, Done("merged " + merge.description.format(name=name),
                      state.rounding if state.rounded else None)


def _groups(branches: Sequence[_Branch]) -> dict[Node, list[_Branch]]:
    groups: dict[Node, list[_Branch]] = {}
    for branch in branches:
        groups.setdefault(branch.input, []).append(branch)
    return groups


def _apart(gm: GraphModule, reader: LinearReader, branches: Sequence[_Branch], anchor: Node
           ) -> list[Refuse]:
    """Why branches that read other tensors than the largest group stay apart (--explain)."""
    groups = _groups(branches)
    if len(groups) < 2:
        return []
    order = {node: index for index, node in enumerate(gm.graph.nodes)}
    main = max(groups, key=lambda n: (len(groups[n]), -order.get(n, len(order))))
    return [Refuse(_why_apart(gm, reader, branch, main, order), (branch.leaf, anchor))
            for branch in branches if branch.input is not main]


def _why_apart(gm: GraphModule, reader: LinearReader, branch: _Branch, main: Node,
               order: dict[Node, int]) -> str:
    if main in branch.path:
        return OTHER_USERS
    if not _reaches(branch.stop, main, order):
        return DIFFERENT_INPUTS
    if branch.stop_reason:
        return branch.stop_reason
    stop = branch.stop
    if _sum_operands(reader, stop) is not None or _cat_operands(reader, stop):
        return f"{NONLINEAR}: it joins other tensors at {describe(stop)}"
    return f"{NONLINEAR}: {op_kind(gm, stop)} at {describe(stop)}"


def _reaches(node: Node, ancestor: Node, order: dict[Node, int]) -> bool:
    """Whether `ancestor` is an input of `node`, directly or not."""
    limit = order.get(ancestor, -1)
    seen, pending = set(), [node]
    while pending:
        current = pending.pop()
        if current is ancestor:
            return True
        for source in current.all_input_nodes:
            if source not in seen and order.get(source, len(order)) >= limit:
                seen.add(source)
                pending.append(source)
    return False


# ---- the rules ----

@dataclass(frozen=True)
class _SumPlan:
    adds: list[Node]
    branches: list[_Branch]
    merges: list[_GroupMerge]


def _check_sum(match: Match) -> Plan | Refused | Skip:
    gm, reader, root = match.gm, match.memo, match.anchor
    adds, leaves = _sum_tree(reader, root)
    branches = [_branch(reader, leaf, coefficient, set(adds))
                for leaf, coefficient in leaves.items()]
    shape = node_shape(root)
    refusals: list[Refuse] = []
    merges: list[_GroupMerge] = []
    for group in _groups(branches).values():
        if len(group) < 2:
            continue
        same = [b for b in group if shape is None or node_shape(b.leaf) in (None, shape)]
        refusals += [Refuse(BROADCAST, (b.leaf, root)) for b in group if b not in same]
        merge, why = _plan_group(gm, same, root, concat=False)
        refusals += why
        if merge is not None:
            merges.append(merge)
    refusals += _apart(gm, reader, branches, root)
    if not merges:
        return without_plan(refusals)
    return Plan(_SumPlan(adds, branches, merges), tuple(refusals))


def _merge_sum(match: Match, plan: _SumPlan) -> list[Done]:
    gm, root = match.gm, match.anchor
    done, new = [], {}
    for merge in plan.merges:
        new[merge.members[0]], line = _insert(gm, merge, root)
        done.append(line)
    merged = {b for merge in plan.merges for b in merge.members}
    terms = [(new[b], 1.0) if b in new else (b.leaf, b.coefficient)
             for b in plan.branches if b in new or b not in merged]
    with gm.graph.inserting_before(root):
        total = _build_sum(gm, terms)
    root.replace_all_uses_with(total)
    erase_unused(gm, [*plan.adds, *(n for b in merged for n in b.segment)])
    return done


@dataclass(frozen=True)
class _CatPlan:
    tensors: list[Node | _GroupMerge]  # the new operands: kept tensors and merged runs


def _check_cat(match: Match) -> Plan | Refused | Skip:
    gm, reader, cat = match.gm, match.memo, match.anchor
    branches = [_branch(reader, leaf, 1.0, {cat}) for leaf in _cat_operands(reader, cat)]
    runs: list[list[_Branch]] = []
    for branch in branches:  # contiguous runs on one input
        if runs and runs[-1][0].input is branch.input:
            runs[-1].append(branch)
        else:
            runs.append([branch])
    refusals: list[Refuse] = []
    tensors: list[Node | _GroupMerge] = []
    for run in runs:
        merge, why = _plan_group(gm, run, cat, concat=True) if len(run) > 1 else (None, [])
        refusals += why
        members = merge.members if merge is not None else ()
        for branch in run:
            if branch not in members:
                tensors.append(branch.leaf)
            elif branch is members[0]:
                tensors.append(merge)
    refusals += _apart(gm, reader, branches, cat)
    if len(tensors) == len(branches):
        return without_plan(refusals)
    return Plan(_CatPlan(tensors), tuple(refusals))


def _merge_cat(match: Match, plan: _CatPlan) -> list[Done]:
    gm, cat = match.gm, match.anchor
    done, tensors, segments = [], [], []
    for item in plan.tensors:
        if isinstance(item, _GroupMerge):
            node, line = _insert(gm, item, cat)
            tensors.append(node)
            done.append(line)
            segments += [n for b in item.members for n in b.segment]
        else:
            tensors.append(item)
    if len(tensors) == 1:  # cat of one tensor: the tensor
        cat.replace_all_uses_with(tensors[0])
        segments.insert(0, cat)
    else:
        cat.update_arg(0, tensors)
    erase_unused(gm, segments)
    return done


def _build_sum(gm: GraphModule, terms: Sequence[tuple[Node, float]]) -> Node:
    """`Σ c_j t_j` as adds (`- t` for c = -1, `c * t` otherwise)."""
    graph = gm.graph
    total = None
    for node, coefficient in terms:
        negate = total is not None and coefficient == -1
        if coefficient not in (1, -1) or (coefficient == -1 and total is None):
            node = graph.call_function(operator.mul, (node, coefficient))
        if total is None:
            total = node
        else:
            total = graph.call_function(operator.sub if negate else operator.add, (total, node))
    return total


RULES = (
    # Σ_j c_j (W_j ⋆ x + b_j) -> (Σ_j c_j W_j) ⋆ x + Σ_j c_j b_j   (R3, R4, R9, scale, R5)
    Rule("parallel_sum", _sum_root, _check_sum, _merge_sum,
         "Σ_j (W_j ⋆ x + b_j) = (Σ W_j) ⋆ x + Σ b_j"),
    # cat_j (W_j ⋆ x + b_j) -> (cat_j W_j) ⋆ x + cat_j b_j   (R10)
    Rule("parallel_cat", _cat_node, _check_cat, _merge_cat,
         "cat_j (W_j ⋆ x + b_j) = (cat W_j) ⋆ x + cat b_j"),
)


def merge_branches(gm: GraphModule) -> PassResult:
    """The rules of this pass on `gm` (no training-mode check: for tests of the refusals)."""
    return apply_rules(gm, RULES, memo=LinearReader)


@register_pass("merge_parallel_branches",
               "merge parallel linear branches on one input (sum or cat) into one conv "
               "(R3 identity, R4 kernel embedding, R5 sum, R9 avg-pool, R10 concat)", True)
def merge_parallel_branches(gm: GraphModule, ctx: PassContext) -> PassResult:
    return merge_branches(gm)
