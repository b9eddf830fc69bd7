"""Canonical form: one spelling for what model libraries write in many, before any other pass.

    rank_query        x.ndim, x.dim()                      -> the recorded rank (static)
    guard_query       x.shape, x.size(d), x.numel()        -> constants, where only guards read
                      them (comparisons, `torch._assert`): a size that feeds a reshape stays a
                      query, so no batch size is baked into the graph
    constant_op       op(c1, c2) on Python constants        -> its value (`4 == 4` -> True)
    true_assert       torch._assert(True, message)         -> nothing
    functional_bn     F.batch_norm / aten.batch_norm on constant statistics, eval mode
                                                            -> an nn.BatchNorm1d/2d/3d module
                      (a BatchNorm subclass whose forward re-implements BN, with activation
                      and dropout tails, becomes that module followed by its tails)
    functional_ln     F.layer_norm / aten.layer_norm over one dim, weight and bias constants
                                                            -> an nn.LayerNorm module (timm's
                      and torchvision's LayerNorm2d permute around F.layer_norm)
    batch_free_reshape  x.view(N, 2, 58, 8, 8) with N the batch (an exported program's literal)
                                                            -> x.view(-1, 2, 58, 8, 8): the
                      artifact keeps accepting any batch size (x.view(N, 64, 2, -1): the -1
                      becomes the size it stood for: x.view(N, -1) -> x.view(-1, F))
    parameter_view    gamma.view(1, 64, 1, 1) of a parameter with 64 values (an exported
                      program's literal)                    -> gamma.view(1, -1, 1, 1): the
                      view follows the parameter's size
    in_place          a.add_(b), a += b, aten.add_(a, b), relu_(a), F.relu(a, inplace=True)
                                                            -> the same op out of place, every
                      later reader of `a` reading the result instead

The in-place rewrite is exact when the write is visible only through `a` itself: `a` is a fresh
tensor (produced by a computation that returns new storage, not a graph input, a constant or a
view), and no view of `a` is read after the write. Shapes come from the recorded meta values.
Identity modules, eval dropout, neutral arithmetic and no-op copies and reshapes are
`remove_identity`'s (passes/cleanup.py); sums in any spelling are read as one sum by branch
merging. A refusal reason starts with one of the constants below.
"""

from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from archc.ir.graph import arg, attribute, describe, erase_unused, replace_with_value, unique_name
from archc.ir.ops import ATEN_TO_TORCH, BN_FUNCTIONS, aten_name, reshape_sizes
from archc.ir.shapes import node_shape
from archc.rewrite.pipeline import PassContext, PassResult, Requirement, register_pass
from archc.rewrite.rules import Match, Plan, Refuse, Rule, Skip, always, apply_rules

NOT_FRESH = ("the written tensor is a graph input, a constant or a view of another tensor: the "
             "write is visible elsewhere")
VIEW_READ = "a view of the written tensor is read after the write: it sees the written values"
STATISTICS = "BN statistics or affine parameters are computed in the graph, not constants"
LN_AFFINE = "LayerNorm weight or bias is computed in the graph, not a constant"

# Python-level ops a guard is made of; evaluated when every argument is a constant.
_CONSTANT_OPS = frozenset({
    operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
    operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv, operator.mod,
    operator.neg, operator.not_, operator.and_, operator.or_, operator.truth, operator.getitem,
    len,
})
_GUARDS = _CONSTANT_OPS | {torch._assert}
_ASSERTS = frozenset({torch._assert})
# Ops whose result may share storage with an input: a write into it is a write into that input.
_VIEW_FUNCTIONS = frozenset({
    torch.reshape, torch.flatten, torch.transpose, torch.permute, torch.t, torch.squeeze,
    torch.unsqueeze, torch.narrow, torch.select, torch.chunk, torch.split, torch.swapaxes,
    torch.swapdims, torch.unflatten, torch.movedim, operator.getitem,
})
_VIEW_METHODS = frozenset({
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "transpose", "permute",
    "t", "squeeze", "unsqueeze", "expand", "expand_as", "narrow", "select", "chunk", "split",
    "unbind", "swapaxes", "swapdims", "movedim", "as_strided", "detach", "contiguous", "alias",
    "__getitem__", "real", "imag", "diagonal", "unfold",
})
_VIEW_ATEN = frozenset({"view", "_unsafe_view", "reshape", "flatten", "transpose", "permute",
                        "t", "squeeze", "unsqueeze", "expand", "narrow", "select", "slice",
                        "chunk", "split", "split_with_sizes", "unbind", "alias", "detach",
                        "as_strided", "unflatten", "movedim", "diagonal", "contiguous"})
# In-place ops and their out-of-place twins.
_IN_PLACE_OPERATORS = {operator.iadd: operator.add, operator.isub: operator.sub,
                       operator.imul: operator.mul, operator.itruediv: operator.truediv}
_IN_PLACE_FUNCTIONS = {F.relu: F.relu, F.relu6: F.relu6, F.hardtanh: F.hardtanh,
                       F.leaky_relu: F.leaky_relu, F.elu: F.elu, F.silu: F.silu,
                       F.hardswish: F.hardswish, F.hardsigmoid: F.hardsigmoid,
                       F.dropout: F.dropout}
_BATCH_NORMS = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


# ---- shape queries and guards ----

def _queried(node: Node) -> Node | None:
    """The tensor a shape query reads (`x.ndim`, `x.shape`, `x.dim()`, `x.size(...)`,
    `x.numel()`), else None."""
    if node.op == "call_function" and node.target is getattr and len(node.args) == 2:
        return node.args[0] if node.args[1] in ("ndim", "shape") else None
    if node.op == "call_method" and node.target in ("dim", "size", "numel") and node.args:
        return node.args[0] if isinstance(node.args[0], Node) else None
    return None


def _rank_query(gm: GraphModule, node: Node, memo) -> tuple[Node, ...] | None:
    x = _queried(node)
    ranked = node.target == "dim" or (node.target is getattr and node.args[1] == "ndim")
    return (node,) if x is not None and ranked and node_shape(x) is not None else None


def _query_value(node: Node):
    shape = node_shape(_queried(node))
    if node.target is getattr:
        return len(shape) if node.args[1] == "ndim" else tuple(shape)
    if node.target == "dim":
        return len(shape)
    if node.target == "numel":
        return int(torch.Size(shape).numel())
    dim = arg(node, 1, "dim")
    return tuple(shape) if dim is None else shape[dim]


def _only_guards(node: Node) -> bool:
    """Whether everything `node` flows into is guard logic ending in asserts (or nothing)."""
    pending, seen = list(node.users), set()
    while pending:
        user = pending.pop()
        if user in seen:
            continue
        seen.add(user)
        if user.op != "call_function" or user.target not in _GUARDS:
            return False
        pending += list(user.users)
    return True


def _guard_query(gm: GraphModule, node: Node, memo) -> tuple[Node, ...] | None:
    x = _queried(node)
    if x is None or node_shape(x) is None or _rank_query(gm, node, memo) is not None:
        return None
    return (node,) if _only_guards(node) else None


def _value_of_query(match: Match) -> Plan:
    return Plan(_query_value(match.anchor))


def _resolve(match: Match, value: object) -> str:
    """Replace the node by the Python value it computes."""
    node = match.anchor
    replace_with_value(match.gm, node, value)
    return f"resolved {node.name} = {value!r}"


def _constant_op(gm: GraphModule, node: Node, memo) -> tuple[Node, ...] | None:
    if node.op != "call_function" or node.target not in _CONSTANT_OPS or node.all_input_nodes:
        return None
    return (node,)


def _evaluate(match: Match) -> Plan | Skip:
    node = match.anchor
    try:
        return Plan(node.target(*node.args, **node.kwargs))
    except Exception:  # e.g. a division by zero the model itself would raise: leave it
        return Skip()


def _true_assert(gm: GraphModule, node: Node, memo) -> tuple[Node, ...] | None:
    if node.op == "call_function" and node.target in _ASSERTS and node.args:
        return (node,) if node.args[0] is True else None
    return None


def _drop_assert(match: Match, plan) -> str:
    node = match.anchor
    match.gm.graph.erase_node(node)
    return f"removed the satisfied guard {node.name}"


# ---- functional batch norm ----

@dataclass(frozen=True)
class _FunctionalNorm:
    x: Node
    owner: str  # the module the statistics belong to
    tensors: dict  # running_mean, running_var, weight, bias (None when absent)
    eps: float
    momentum: float | None


def _batch_norm_call(gm: GraphModule, node: Node, memo) -> tuple[Node, ...] | None:
    if node.op != "call_function":
        return None
    if node.target in BN_FUNCTIONS or aten_name(node) == "batch_norm":
        return (node,)
    return None


def _functional_batch_norms(gm: GraphModule) -> list[str]:
    """The functional / aten BatchNorm calls that `functional_bn` turns into modules."""
    return [node.name for node in gm.graph.nodes if _batch_norm_call(gm, node, None)
            and isinstance(_check_batch_norm(Match(gm, (node,))), Plan)]


# Every BatchNorm that can become a module is one (what fold_bn requires).
BATCH_NORM_MODULES = Requirement("every eval-mode BatchNorm on constants as a module",
                                 _functional_batch_norms, "canonicalize")


def _check_batch_norm(match: Match) -> Plan | Refuse | Skip:
    node, gm = match.anchor, match.gm
    if node.target is torch.batch_norm or aten_name(node) == "batch_norm":
        # aten.batch_norm and torch.batch_norm(x, w, b, mean, var, training, m, eps, _)
        x, weight, bias, mean, var, training, momentum, eps = (list(node.args) + [None] * 8)[:8]
    else:  # F.batch_norm(x, mean, var, weight, bias, training, momentum, eps)
        names = ("input", "running_mean", "running_var", "weight", "bias", "training",
                 "momentum", "eps")
        defaults = (None, None, None, None, None, False, 0.1, 1e-5)
        x, mean, var, weight, bias, training, momentum, eps = (
            arg(node, i, name, default) for i, (name, default) in enumerate(zip(names, defaults)))
    if training or mean is None or var is None:
        return Skip()  # batch statistics: nothing to fold
    parts = {"running_mean": mean, "running_var": var, "weight": weight, "bias": bias}
    if not all(p is None or (isinstance(p, Node) and p.op == "get_attr") for p in parts.values()):
        return Refuse(STATISTICS)
    shape = node_shape(node)
    if shape is None or len(shape) not in _BATCH_NORMS:
        return Skip()
    owner = mean.target.rpartition(".")[0]
    tensors = {k: None if p is None else attribute(gm, p.target) for k, p in parts.items()}
    return Plan(_FunctionalNorm(x, owner, tensors, float(eps), momentum))


def _to_module(match: Match, norm: _FunctionalNorm) -> str:
    gm, node = match.gm, match.anchor
    rank = len(node_shape(node))
    mean = norm.tensors["running_mean"]
    module = _BATCH_NORMS[rank](mean.shape[0], eps=norm.eps, affine=False,
                                device=mean.device, dtype=mean.dtype)
    for name in ("weight", "bias"):  # shared with the original module, never copied
        tensor = norm.tensors[name]
        if tensor is not None:
            setattr(module, name, tensor if isinstance(tensor, nn.Parameter)
                    else nn.Parameter(tensor, requires_grad=False))
    module.affine = norm.tensors["weight"] is not None
    module.running_mean, module.running_var = mean, norm.tensors["running_var"]
    module.eval()
    name = unique_name(gm, f"{norm.owner}.norm" if norm.owner else "batch_norm")
    gm.add_submodule(name, module)
    with gm.graph.inserting_before(node):
        call = gm.graph.call_module(name, (norm.x,))
    call.meta = dict(node.meta)
    node.replace_all_uses_with(call)
    erase_unused(gm, [node])
    return f"{describe(node)} -> {type(module).__name__} {name}"


# ---- functional layer norm ----

_LAYER_NORMS = {F.layer_norm, torch.layer_norm}  # and aten's "layer_norm"


def _layer_norm_call(gm: GraphModule, node: Node, memo) -> tuple[Node, ...] | None:
    if node.op == "call_function" and (node.target in _LAYER_NORMS
                                       or aten_name(node) == "layer_norm"):
        return (node,)
    return None


def _check_layer_norm(match: Match) -> Plan | Refuse | Skip:
    """F.layer_norm(x, shape, weight, bias, eps) (aten's too, with a trailing cudnn flag)."""
    node = match.anchor
    names = ("input", "normalized_shape", "weight", "bias", "eps")
    x, shape, weight, bias, eps = (arg(node, i, name, default) for i, (name, default) in
                                   enumerate(zip(names, (None, None, None, None, 1e-5))))
    if not isinstance(shape, (list, tuple)) or len(shape) != 1 or not isinstance(shape[0], int):
        return Skip()  # over several dims or a computed shape: left as it is
    parts = {"weight": weight, "bias": bias}
    if not all(p is None or isinstance(p, Node) and p.op == "get_attr" for p in parts.values()):
        return Refuse(LN_AFFINE)
    owner = next((p.target.rpartition(".")[0] for p in parts.values() if p is not None), "")
    tensors = {k: None if p is None else attribute(match.gm, p.target) for k, p in parts.items()}
    return Plan((x, owner, shape[0], tensors, float(eps)))


def _to_layer_norm(match: Match, plan) -> str:
    gm, node = match.gm, match.anchor
    x, owner, size, tensors, eps = plan
    like = next((t for t in tensors.values() if t is not None), None)
    module = nn.LayerNorm(size, eps=eps, elementwise_affine=tensors["weight"] is not None,
                          bias=tensors["bias"] is not None,
                          **({} if like is None else {"device": like.device, "dtype": like.dtype}))
    for name, tensor in tensors.items():  # shared with the original module, never copied
        if tensor is not None:
            setattr(module, name, tensor if isinstance(tensor, nn.Parameter)
                    else nn.Parameter(tensor, requires_grad=False))
    module.train(gm.training)
    name = unique_name(gm, f"{owner}.norm" if owner else "layer_norm")
    gm.add_submodule(name, module)
    with gm.graph.inserting_before(node):
        call = gm.graph.call_module(name, (x,))
    call.meta = dict(node.meta)
    node.replace_all_uses_with(call)
    erase_unused(gm, [node])
    return f"{describe(node)} -> LayerNorm {name}"


# ---- in-place ops ----

def _out_of_place(gm: GraphModule, node: Node):
    """(how to rewrite, the written tensor) of an in-place op, or None."""
    if node.op == "call_method" and isinstance(node.target, str) and node.target.endswith("_") \
            and not node.target.endswith("__") and node.args:
        return ("method", node.args[0])
    if node.op != "call_function" or not node.args:
        return None
    name = aten_name(node)
    if name is not None and name.endswith("_") and not name.endswith("__") and hasattr(
            torch.ops.aten, name[:-1]):
        return ("aten", node.args[0])
    if node.target in _IN_PLACE_OPERATORS:
        return ("operator", node.args[0])
    if node.target in _IN_PLACE_FUNCTIONS and _bound(node).arguments.get("inplace") is True:
        return ("inplace", node.args[0])
    return None


def _bound(node: Node) -> inspect.BoundArguments:
    return inspect.signature(node.target).bind(*node.args, **node.kwargs)


def _in_place_op(gm: GraphModule, node: Node, memo) -> tuple[Node, ...] | None:
    found = _out_of_place(gm, node)
    return (node,) if found is not None and isinstance(found[1], Node) else None


def _creates_view(gm: GraphModule, node: Node) -> bool:
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    if node.op == "call_function":
        return node.target in _VIEW_FUNCTIONS or aten_name(node) in _VIEW_ATEN
    if node.op == "call_module":  # identities return their input itself
        module = gm.get_submodule(node.target)
        return isinstance(module, (nn.Identity, nn.Dropout, nn.Flatten, nn.Unflatten))
    return True  # placeholders, constants


def _check_in_place(match: Match) -> Plan | Refuse:
    gm, node = match.gm, match.anchor
    kind, written = _out_of_place(gm, node)
    if _creates_view(gm, written):
        return Refuse(NOT_FRESH)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    views = [u for u in written.users if u is not node and _creates_view(gm, u)]
    while views:
        view = views.pop()
        if any(order[u] > order[node] for u in view.users):
            return Refuse(VIEW_READ)
        views += [u for u in view.users if _creates_view(gm, u)]
    return Plan((kind, written))


def _functionalize(match: Match, plan: tuple[str, Node]) -> str:
    gm, node = match.gm, match.anchor
    kind, written = plan
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    later = [u for u in written.users if u is not node and order[u] > order[node]]
    before = describe(node)
    if kind == "method":
        node.target = node.target[:-1]
    elif kind == "operator":
        node.target = _IN_PLACE_OPERATORS[node.target]
    elif kind == "inplace":
        bound = _bound(node)
        bound.arguments["inplace"] = False
        node.args, node.kwargs = bound.args, bound.kwargs
    else:  # the functional aten overload, spelt as torch where archc's rules read torch
        functional = getattr(getattr(torch.ops.aten, aten_name(node)[:-1]),
                             node.target._overloadname)
        node.target = ATEN_TO_TORCH.get(functional, functional)
    for user in later:
        user.args, user.kwargs = map_arg((user.args, user.kwargs),
                                         lambda n: node if n is written else n)
    return f"{before} written out of place ({len(later)} later readers now read its result)"


def _literal_sizes(node: Node) -> list | None:
    """The sizes a reshape requests, if all are literal ints."""
    sizes = reshape_sizes(node)
    return list(sizes) if sizes is not None and all(type(v) is int for v in sizes) else None


def _batch_reshape(gm: GraphModule, node: Node, memo) -> tuple[Node, ...] | None:
    sizes = _literal_sizes(node)
    if sizes is None or len(sizes) < 2 or sizes[0] == -1 or not isinstance(node.args[0], Node) \
            or -1 in sizes and node_shape(node) is None:
        return None
    shape = node_shape(node.args[0])
    inputs = [node_shape(n) for n in gm.graph.nodes if n.op == "placeholder"]
    batch = inputs[0][0] if inputs and inputs[0] else None
    if shape is None or not shape or batch is None or not sizes[0] == shape[0] == batch:
        return None
    if -1 in sizes:  # view(N, -1): only with the recorded output, whose sizes replace the -1
        out = node_shape(node)
        if sizes.count(-1) != 1 or out is None or len(out) != len(sizes) or out[0] != batch:
            return None
    return (node,)


def _free_batch(match: Match, plan) -> str:
    node = match.anchor
    result = node_shape(node)  # a -1 elsewhere takes the size it computed
    sizes = [result[i] if n == -1 else n for i, n in enumerate(_literal_sizes(node))]
    sizes = [-1, *sizes[1:]]
    node.args = (node.args[0], sizes) if node.op == "call_function" else (node.args[0], *sizes)
    return f"{node.name}: the batch size of its shape is -1 (any batch)"


def _parameter_view(gm: GraphModule, node: Node, memo) -> tuple[Node, ...] | None:
    sizes = _literal_sizes(node)
    x = node.args[0] if node.args else None
    if sizes is None or -1 in sizes or not isinstance(x, Node) or x.op != "get_attr":
        return None
    wide = [i for i, n in enumerate(sizes) if n != 1]
    return (node,) if len(wide) == 1 else None


def _follow_parameter(match: Match, plan) -> str:
    node = match.anchor
    sizes = [n if n == 1 else -1 for n in _literal_sizes(node)]
    node.args = (node.args[0], sizes) if node.op == "call_function" else (node.args[0], *sizes)
    return f"{node.name}: the view takes the parameter's size (-1)"


RULES = (
    # x.ndim, x.dim() -> the rank
    Rule("rank_query", _rank_query, _value_of_query, _resolve, "x.ndim = len(shape)"),
    # x.shape, x.size(d) read only by guards -> constants
    Rule("guard_query", _guard_query, _value_of_query, _resolve, "x.size(d) = shape[d]"),
    # op(c1, c2) -> c3 for Python constants
    Rule("constant_op", _constant_op, _evaluate, _resolve, "4 == 4 -> True"),
    # torch._assert(True, msg) -> nothing
    Rule("true_assert", _true_assert, always, _drop_assert, "assert True -> pass"),
    # F.batch_norm(x, μ, σ², γ, β, False, m, ε) -> BatchNormNd(x)
    Rule("functional_bn", _batch_norm_call, _check_batch_norm, _to_module,
         "F.batch_norm(eval) = BatchNorm module"),
    # F.layer_norm(x, (C,), γ, β, ε) -> LayerNorm(x)
    Rule("functional_ln", _layer_norm_call, _check_layer_norm, _to_layer_norm,
         "F.layer_norm over one dim = LayerNorm module"),
    # x.view(N, ...) -> x.view(-1, ...) for the batch size N
    Rule("batch_free_reshape", _batch_reshape, always, _free_batch,
         "view(N, s...) = view(-1, s...) when the input holds N samples"),
    # p.view(1, C, 1, 1) -> p.view(1, -1, 1, 1) for a parameter p of C values
    Rule("parameter_view", _parameter_view, always, _follow_parameter,
         "p.view(1, C, 1, 1) = p.view(1, -1, 1, 1) when p holds C values"),
    # a.op_(b) -> op(a, b), later readers of a read the result
    Rule("in_place", _in_place_op, _check_in_place, _functionalize,
         "a.op_(b); f(a) = f(op(a, b)) for a fresh a"),
)


@register_pass("canonicalize",
               "one spelling for shape guards, functional/aten BatchNorm and LayerNorm, "
               "in-place ops", True)
def canonicalize(gm: GraphModule, ctx: PassContext) -> PassResult:
    return apply_rules(gm, RULES)
