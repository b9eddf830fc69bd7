"""Merge parallel linear branches on one input into one conv (REWRITES.md R3, R4, R5, R9, R10).

Found from the graph, not from module names: a tree of adds (`+`, `-`, `torch.add(..., alpha=a)`,
`sum([...])`) or a `torch.cat(..., dim=1)` whose operands are, per branch, a chain of linear ops
on one shared input tensor. Each chain is composed into `conv_j(pad_j(x))` with the algebra of
`passes.sequential_merging` (convs, eval BN, constant scales and biases, zero/constant pads,
average pooling, 1x1 -> KxK via R6), then:

    R3  x             = W_id ⋆ x,  W_id[i, i mod C/g, centre] = 1   (C_in = C_out, stride 1)
    R4  W_k ⋆ x (pad p_K - d (K - k) / 2) = pad(W_k, (K - k) / 2 per side) ⋆ x (pad p_K)
    R9  avgpool_k(x)  = (1/Πk) ⋆ x per channel   (count_include_pad=True, ceil_mode=False)
    s   c (W ⋆ x + b) = (c W) ⋆ x + c b          (`c * branch`, `branch - ...`, alpha, BN, scale)
    R5  Σ_j (W_j ⋆ x + b_j) = (Σ_j W_j) ⋆ x + Σ_j b_j
    R10 cat_j (W_j ⋆ x + b_j) = (cat_j W_j) ⋆ x + cat_j b_j   (groups 1)

Alignment: the same stride; kernels larger than 1 on an axis share one dilation (a 1-wide kernel
has none); K - k even; symmetric padding `p_k = p_K - d (K - k) / 2` per axis. Groups: the merged
conv takes the gcd of the branches' groups and block-diagonalises the others (`grouped_to_dense`);
a cost rule decides: merge only if the merged conv needs no more multiply-adds per output pixel
than the branches and the adds it replaces, and every decision is reported with both numbers.

Branches that read the same input tensor merge even when others do not (the rest of the sum
stays), and when a sum of three or more cannot merge as a whole, the cheapest branch whose
removal lets the rest merge stays apart (a dilated DBB's avg-pool branch). A branch whose chain
reaches the input only through a tensor with other users, or through a non-linear op, does not
merge. A sum followed by a BN becomes a conv followed by a BN, which
the next `fold_bn` folds (R1). The pass sweeps until nothing merges, so a merged inner sum can
merge into an outer one.

A refusal reason starts with one of the constants below; details may follow after ": ".
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from archc import weight_algebra as wa
from archc.pipeline import PassContext, PassReport, PassResult, Refusal, op_kind, register_pass
from archc.rules import describe, node_shape
from passes import sequential_merging as seq
from passes.sequential_merging import (
    Analysis,
    Conv,
    Linear,
    NotLinear,
    Unmergeable,
    conv_label,
    conv_module,
    erase_chain,
    model_dtype,
    propagate_shapes,
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
OTHER_USERS = "a branch tensor has other users: they need the unmerged value"
IDENTITY_MISMATCH = "identity branch needs C_in = C_out and stride 1 (channel or stride mismatch)"
BROADCAST = "branch outputs differ in shape: the sum broadcasts"
# Reasons found while reading a branch's ops (shared with sequential merging).
SHARED_MODULE = seq.SHARED_MODULE
AVG_POOL = seq.AVG_POOL
TRAINING = seq.TRAINING
BORDER = seq.BORDER
SHAPES_UNKNOWN = seq.SHAPES_UNKNOWN

MAX_SWEEPS = 100


@dataclass(frozen=True, eq=False)
class _Branch:
    """One operand of a sum or cat: the linear nodes from `leaf` back to the first op that is not
    linear (`stop`). The branch proper is `nodes[:split]`; its input is the first tensor on the
    way back that others read too (or `stop`)."""

    leaf: Node
    coefficient: float
    nodes: tuple[Node, ...]  # leaf first
    ops: tuple[seq.LinearOp, ...]
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

    def elements(self) -> list[seq.Element]:
        return [e for op in reversed(self.ops[:self.split]) for e in op.elements]


def _branch(analysis: Analysis, leaf: Node, coefficient: float, consumers: set[Node]) -> _Branch:
    nodes: list[Node] = []
    ops: list[seq.LinearOp] = []
    split = None
    node, downstream = leaf, consumers
    while True:
        op = analysis.op(node)
        private = bool(node.users) and set(node.users) <= downstream
        if split is None and (not private or isinstance(op, NotLinear)):
            split = len(nodes)
        if isinstance(op, NotLinear):
            return _Branch(leaf, coefficient, tuple(nodes), tuple(ops), node, op.reason, split)
        nodes.append(node)
        ops.append(op)
        node, downstream = op.input, {node}


def _sum_operands(analysis: Analysis, node: Node) -> list[tuple[Node, float]] | None:
    """`[(a, 1), (b, ±alpha)]` for `a + alpha b` / `a - alpha b` of two non-constant tensors."""
    if node.op not in ("call_function", "call_method"):
        return None
    if node.target not in seq.ADD_TARGETS | seq.SUB_TARGETS:
        return None
    if len(node.args) != 2 or set(node.kwargs) - {"alpha"}:
        return None
    alpha = node.kwargs.get("alpha", 1)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        return None
    a, b = node.args
    if not (analysis.is_tensor(a) and analysis.is_tensor(b)):
        return None
    return [(a, 1.0), (b, (-alpha if node.target in seq.SUB_TARGETS else alpha) * 1.0)]


def _is_sum_root(analysis: Analysis, node: Node) -> bool:
    if _sum_operands(analysis, node) is None:
        return False
    user = next(iter(node.users)) if len(node.users) == 1 else None
    return user is None or _sum_operands(analysis, user) is None


def _sum_tree(analysis: Analysis, root: Node) -> tuple[list[Node], dict[Node, float]]:
    """The add nodes of the tree under `root` (parents first) and its leaves with coefficients."""
    adds: list[Node] = []
    leaves: dict[Node, float] = {}

    def visit(node: Node, coefficient: float) -> None:
        adds.append(node)
        for operand, sign in _sum_operands(analysis, node):
            if _sum_operands(analysis, operand) is not None and len(operand.users) == 1:
                visit(operand, coefficient * sign)
            else:
                leaves[operand] = leaves.get(operand, 0.0) + coefficient * sign

    visit(root, 1.0)
    return list(dict.fromkeys(adds)), leaves


def _cat_operands(analysis: Analysis, node: Node) -> list[Node] | None:
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
    if not isinstance(tensors, (list, tuple)) or not all(map(analysis.is_tensor, tensors)):
        return None
    return list(tensors)


@dataclass(frozen=True)
class _Plan:
    """The merged conv's geometry."""

    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    padding: tuple[int, ...]
    groups: int


def _align(states: Sequence[Linear], concat: bool) -> _Plan:
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
    return _Plan(tuple(kernel), stride, tuple(dilation), tuple(padding), groups)


def _plan(states: Sequence[Linear], coefficients: Sequence[float], concat: bool
          ) -> tuple[_Plan, Conv, str]:
    """The merged conv and the cost decision (`; merged .. vs unmerged ..`), or `Unmergeable`."""
    plan = _align(states, concat)
    conv = _merged_conv(plan, states, coefficients, concat)
    adds = 0 if concat else (len(states) - 1) * conv.weight.shape[0]
    merged, unmerged = conv.weight.numel(), sum(s.macs() for s in states) + adds
    numbers = f"merged {merged} vs unmerged {unmerged} MACs per output pixel"
    densified = sorted({s.conv.groups for s in states
                        if s.conv is not None and not _diagonal(s)} - {plan.groups})
    if merged > unmerged:
        raise Unmergeable(f"{GROUPS_MISMATCH if densified else MERGE_COST}: {numbers}")
    if densified:
        numbers = f"groups {'/'.join(map(str, densified))} densified to {plan.groups}; {numbers}"
    return plan, conv, f"; {numbers}"


def _leave_one_out(states: Sequence[Linear], coefficients: Sequence[float]
                   ) -> tuple[int, tuple[_Plan, Conv, str]] | None:
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


def _diagonal(state: Linear) -> bool:
    """A per-channel affine of the input (BN-only identity, scale): any groups hold it for free."""
    conv = state.conv
    return conv.pointwise and conv.groups == state.in_channels == state.out_channels


def _merged_conv(plan: _Plan, states: Sequence[Linear], coefficients: Sequence[float],
                 concat: bool) -> Conv:
    """R3/R4/R9/scale on every branch, then R5 (sum) or R10 (cat), in float64."""
    parts = []
    for state, coefficient in zip(states, coefficients):
        if state.conv is None:
            channels = state.in_channels
            weight = wa.identity_kernel(channels, plan.groups, plan.kernel, torch.float64)
            bias = weight.new_zeros(channels)
        else:
            dense = wa.grouped_to_dense(state.conv.weight, state.conv.groups, plan.groups)
            weight, bias = wa.pad_kernel(dense, plan.kernel), state.conv.bias
        if coefficient != 1:
            weight, bias = wa.scale_branch(weight, bias, coefficient)
        parts.append((weight, bias))
    weight, bias = wa.concat_convs(parts) if concat else wa.sum_branches(parts)
    return Conv(weight, bias, plan.stride, plan.dilation, plan.groups)


class _Merger:
    """One sweep over the sums and cats of a graph."""

    def __init__(self, gm: GraphModule, rewrites: list[str]):
        self.gm = gm
        self.analysis = Analysis(gm)
        self.rewrites = rewrites
        self.refusals: list[Refusal] = []
        self.order = {node: index for index, node in enumerate(gm.graph.nodes)}

    def refuse(self, rule: str, nodes: Sequence[Node], reason: str) -> None:
        self.refusals.append(Refusal(rule, tuple(map(describe, nodes)), reason))

    # -- sums --

    def merge_sum(self, root: Node) -> bool:
        adds, leaves = _sum_tree(self.analysis, root)
        branches = [_branch(self.analysis, leaf, coefficient, set(adds))
                    for leaf, coefficient in leaves.items()]
        shape = node_shape(root)
        merged: dict[Node, tuple[Node, list[_Branch]]] = {}  # input -> (new node, its branches)
        for group in self._groups(branches).values():
            if len(group) < 2:
                continue
            same = [b for b in group if shape is None or node_shape(b.leaf) in (None, shape)]
            for branch in group:
                if branch not in same:
                    self.refuse("parallel_sum", (branch.leaf, root), BROADCAST)
            result = self._merge_group(same, root, "parallel_sum")
            if result is not None:
                merged[group[0].input] = result
        self._explain_apart(branches, root, "parallel_sum")
        if not merged:
            return False
        terms: list[tuple[Node, float]] = []
        for branch in branches:
            new, members = merged.get(branch.input, (None, []))
            if branch not in members:
                terms.append((branch.leaf, branch.coefficient))
            elif branch is members[0]:
                terms.append((new, 1.0))
        with self.gm.graph.inserting_before(root):
            total = _build_sum(self.gm, terms)
        root.replace_all_uses_with(total)
        segments = [n for _, members in merged.values() for b in members for n in b.segment]
        erase_chain(self.gm, [*adds, *segments], self.analysis)
        return True

    # -- cats --

    def merge_cat(self, cat: Node, tensors: list[Node]) -> bool:
        branches = [_branch(self.analysis, leaf, 1.0, {cat}) for leaf in tensors]
        runs: list[list[_Branch]] = []
        for branch in branches:  # contiguous runs on one input
            if runs and runs[-1][0].input is branch.input:
                runs[-1].append(branch)
            else:
                runs.append([branch])
        new_tensors, erased = [], []
        for run in runs:
            result = self._merge_group(run, cat, "parallel_cat") if len(run) > 1 else None
            members = [] if result is None else result[1]
            for branch in run:
                if branch not in members:
                    new_tensors.append(branch.leaf)
                elif branch is members[0]:
                    new_tensors.append(result[0])
            erased += [n for b in members for n in b.segment]
        self._explain_apart(branches, cat, "parallel_cat")
        if len(new_tensors) == len(tensors):
            return False
        if len(new_tensors) == 1:  # cat of one tensor: the tensor
            cat.replace_all_uses_with(new_tensors[0])
            erased.insert(0, cat)
        else:
            cat.update_arg(0, new_tensors)
        erase_chain(self.gm, erased, self.analysis)
        return True

    # -- shared --

    def _groups(self, branches: Sequence[_Branch]) -> dict[Node, list[_Branch]]:
        groups: dict[Node, list[_Branch]] = {}
        for branch in branches:
            groups.setdefault(branch.input, []).append(branch)
        return groups

    def _start(self, branches: Sequence[_Branch]) -> Linear:
        """The identity on the branches' input: channels and rank from its shape, else from the
        first conv in a branch."""
        source = branches[0].input
        dtype = model_dtype(self.gm, source)
        shape = node_shape(source)
        if shape is not None:
            if len(shape) < 3:
                raise Unmergeable(SHAPES_UNKNOWN)
            return Linear.identity(shape[1], len(shape) - 2, dtype)
        for element in (e for b in branches for e in b.elements()):
            if isinstance(element, Conv):
                channels = element.weight.shape[1] * element.groups
                return Linear.identity(channels, element.weight.ndim - 2, dtype)
        raise Unmergeable(SHAPES_UNKNOWN)

    def _merge_group(self, group: list[_Branch], anchor: Node, rule: str
                     ) -> tuple[Node, list[_Branch]] | None:
        """Merge the branches of `group` (one input) into a new conv node before `anchor`."""
        concat = rule == "parallel_cat"
        try:
            start = self._start(group)
        except Unmergeable as refusal:
            self.refuse(rule, [b.leaf for b in group] + [anchor], refusal.reason)
            return None
        members, states = [], []
        for branch in group:
            try:
                states.append(start.then_all(branch.elements()))
                members.append(branch)
            except Unmergeable as refusal:
                self.refuse(rule, (branch.leaf, anchor), refusal.reason)
        if len(members) < 2:
            return None
        try:
            plan, conv, note = _plan(states, [b.coefficient for b in members], concat)
        except Unmergeable as refusal:
            kept = None if concat else _leave_one_out(states, [b.coefficient for b in members])
            if kept is None:
                self.refuse(rule, [b.leaf for b in members] + [anchor], refusal.reason)
                return None
            index, (plan, conv, note) = kept
            self.refuse(rule, (members[index].leaf, anchor), refusal.reason)
            del members[index], states[index]
        name = self._module_name(members)
        modules = [self.gm.get_submodule(n.target) for b in members for n in b.segment
                   if n.op == "call_module"]
        like = next((p for m in modules for p in m.parameters()), None)
        state = Linear(start.in_channels, tuple((p, p) for p in plan.padding), conv, start.dtype)
        self.gm.add_submodule(name, conv_module(state, like))
        with self.gm.graph.inserting_before(anchor):
            new = self.gm.graph.call_module(name, (members[0].input,))
        self.rewrites.append(
            f"merged {len(members)} branches ({', '.join(describe(b.leaf) for b in members)}) "
            f"of {describe(members[0].input)} into {name} ({conv_label(conv, plan.padding)}"
            f"{note})")
        return new, members

    def _module_name(self, members: Sequence[_Branch]) -> str:
        """`<common parent of the branch modules>.merged`, made unique."""
        parents = [n.target.split(".")[:-1] for b in members for n in b.segment
                   if n.op == "call_module"]
        prefix = []
        for parts in zip(*parents) if parents else ():
            if len(set(parts)) > 1:
                break
            prefix.append(parts[0])
        base = ".".join([*prefix, "merged"])
        name, index = base, 0
        while _exists(self.gm, name):
            index += 1
            name = f"{base}_{index}"
        return name

    def _explain_apart(self, branches: Sequence[_Branch], anchor: Node, rule: str) -> None:
        """Why branches that read other tensors than the largest group stay apart (--explain)."""
        groups = self._groups(branches)
        if len(groups) < 2:
            return
        main = max(groups, key=lambda n: (len(groups[n]), -self.order.get(n, len(self.order))))
        for branch in branches:
            if branch.input is not main:
                self.refuse(rule, (branch.leaf, anchor), self._why_apart(branch, main))

    def _why_apart(self, branch: _Branch, main: Node) -> str:
        if main in branch.path:
            return OTHER_USERS
        if not self._reaches(branch.stop, main):
            return DIFFERENT_INPUTS
        if branch.stop_reason:
            return branch.stop_reason
        stop = branch.stop
        if _sum_operands(self.analysis, stop) is not None or _cat_operands(self.analysis, stop):
            return f"{NONLINEAR}: it joins other tensors at {describe(stop)}"
        return f"{NONLINEAR}: {op_kind(self.gm, stop)} at {describe(stop)}"

    def _reaches(self, node: Node, ancestor: Node) -> bool:
        """Whether `ancestor` is an input of `node`, directly or not."""
        limit = self.order.get(ancestor, -1)
        seen, pending = set(), [node]
        while pending:
            current = pending.pop()
            if current is ancestor:
                return True
            for source in current.all_input_nodes:
                if source not in seen and self.order.get(source, len(self.order)) >= limit:
                    seen.add(source)
                    pending.append(source)
        return False


def _exists(gm: GraphModule, name: str) -> bool:
    try:
        operator.attrgetter(name)(gm)
    except AttributeError:
        return False
    return True


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


def merge_branches(gm: GraphModule, inputs: tuple[torch.Tensor, ...] | None) -> PassResult:
    """Merge parallel branches until none merges; report every merge and the final refusals."""
    rewrites: list[str] = []
    refusals: list[Refusal] = []
    for _ in range(MAX_SWEEPS):
        analysis = Analysis(gm)
        if not any(_is_sum_root(analysis, n) or n.target is torch.cat for n in gm.graph.nodes):
            refusals = []
            break
        propagate_shapes(gm, inputs)  # channels, ranks, cat dims and per-channel constants
        merger = _Merger(gm, rewrites)
        anchors = [n for n in gm.graph.nodes if _is_sum_root(merger.analysis, n)
                   or _cat_operands(merger.analysis, n) is not None]
        changed = False
        for anchor in anchors:
            if getattr(anchor, "_erased", False):
                continue
            tensors = _cat_operands(merger.analysis, anchor)
            if tensors is not None:
                changed |= merger.merge_cat(anchor, tensors)
            elif _is_sum_root(merger.analysis, anchor):
                changed |= merger.merge_sum(anchor)
        refusals = merger.refusals
        if not changed:
            break
    else:
        raise RuntimeError("merge_parallel_branches did not reach a fixpoint")
    return PassResult(gm, bool(rewrites), PassReport(rewrites=rewrites, refusals=refusals))


@register_pass("merge_parallel_branches",
               "merge parallel linear branches on one input (sum or cat) into one conv "
               "(R3 identity, R4 kernel embedding, R5 sum, R9 avg-pool, R10 concat)", True)
def merge_parallel_branches(gm: GraphModule, ctx: PassContext) -> PassResult:
    return merge_branches(gm, ctx.inputs(gm))
