"""Cleanup passes: dead code, no-op operations and constant subexpressions.

- `eliminate_dead_code`: delete nodes whose result nobody reads (never ones that mutate a tensor in
  place), then submodules and root attributes no node uses any more.
- `remove_identity`: `Identity(x) = x`; eval-mode dropout `Dropout(x) = x`; `x * 1 = 1 * x =
  x / 1 = x + 0 = 0 + x = x - 0 = x` when the result has the dtype and shape of `x`
  (`int_tensor * 1.0` is float, `bool_tensor + 0` is int64: those stay).
- `fold_constants`: a pure elementwise or reshaping op whose inputs are all `get_attr` constants is
  evaluated once and becomes a new constant: `op(c1, c2) -> c3`.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from archc.ir.graph import (
    PURE_FUNCTIONS,
    PURE_METHODS,
    arg,
    attribute,
    bypass,
    describe,
    is_pure,
    unique_name,
)
from archc.ir.shapes import node_dtype, node_shape
from archc.rewrite.pipeline import PassContext, PassResult, register_pass
from archc.rewrite.rules import (
    Match,
    Op,
    Plan,
    Refuse,
    Rule,
    Skip,
    always,
    apply_rules,
    whole_graph,
)

TRAINING_DROPOUT = "dropout module is in training mode: it zeroes activations at random"
FUNCTIONAL_TRAINING = "functional dropout called with training=True: it is random, not the identity"
DTYPE_UNKNOWN = ("dtype unknown: x * 1.0 turns an integer tensor into a float one; "
                 "give example inputs")
CHANGES_DTYPE = "the result differs from x in dtype or shape (type promotion or broadcasting)"
GROWS = "the folded constant would be larger than its inputs (broadcasting): kept as an op"

_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                    nn.FeatureAlphaDropout)
# functional dropout -> (keyword of its `training` flag, default); the flag is the 3rd argument
_DROPOUT_FUNCTIONS: dict[Callable, tuple[str, bool]] = {
    F.dropout: ("training", True), F.dropout1d: ("training", True),
    F.dropout2d: ("training", True), F.dropout3d: ("training", True),
    F.alpha_dropout: ("training", False), F.feature_alpha_dropout: ("training", False),
    torch.dropout: ("train", True),
}
# op -> (its neutral element, whether the constant may be the left operand)
_NEUTRAL: dict[Callable | str, tuple[int, bool]] = {
    operator.mul: (1, True), torch.mul: (1, True), "mul": (1, False),  # x * 1 -> x
    operator.truediv: (1, False), torch.div: (1, False), "div": (1, False),  # x / 1 -> x
    operator.add: (0, True), torch.add: (0, False), "add": (0, False),  # x + 0 -> x
    operator.sub: (0, False), torch.sub: (0, False), "sub": (0, False),  # x - 0 -> x
}


def _passthrough(node: Node) -> Node | None:
    """The tensor operand `x` of `x op neutral` (or `neutral op x`), else None."""
    neutral, commutes = _NEUTRAL[node.target]
    if len(node.args) != 2 or node.kwargs.get("rounding_mode") is not None:
        return None
    a, b = node.args

    def is_neutral(value) -> bool:
        return type(value) in (int, float) and value == neutral

    if isinstance(a, Node) and is_neutral(b):
        return a
    if commutes and isinstance(b, Node) and is_neutral(a):
        return b
    return None


def _check_dropout_module(match: Match) -> Plan | Refuse:
    return Refuse(TRAINING_DROPOUT) if match.module(0).training else Plan()


def _check_dropout_function(match: Match) -> Plan | Refuse:
    node = match.nodes[0]
    keyword, default = _DROPOUT_FUNCTIONS[node.target]
    training = arg(node, 2, keyword, default)
    return Refuse(FUNCTIONAL_TRAINING) if training and arg(node, 1, "p", 0.5) != 0 else Plan()


def _check_neutral(match: Match) -> Plan | Refuse:
    node = match.nodes[0]
    x = _passthrough(node)
    if node_dtype(node) is None or node_dtype(x) is None:
        return Refuse(DTYPE_UNKNOWN)
    same = node_dtype(node) == node_dtype(x) and node_shape(node) == node_shape(x)
    return Plan() if same else Refuse(CHANGES_DTYPE)


def _remove(input_of: Callable[[Node], Node]) -> Callable[[Match, None], str]:
    def rewrite(match: Match, plan: None) -> str:
        node = match.nodes[0]
        bypass(match.gm, node, input_of(node))
        return f"removed {describe(node)}"

    return rewrite


def _first_input(node: Node) -> Node:
    return node.args[0] if node.args else node.kwargs["input"]


# x * 1 -> x, 1 * x -> x, x / 1 -> x, x + 0 -> x, 0 + x -> x, x - 0 -> x
NEUTRAL_RULE = Rule(
    "neutral_scalar",
    (Op(functions=tuple(k for k in _NEUTRAL if callable(k)),
        methods=tuple(k for k in _NEUTRAL if isinstance(k, str)),
        where=lambda n: _passthrough(n) is not None),),
    _check_neutral, _remove(_passthrough), "x * 1 -> x, x + 0 -> x")

IDENTITY_RULES = (
    # Identity(x) -> x
    Rule("identity_module", (Op(modules=(nn.Identity,)),), always, _remove(_first_input),
         "Identity(x) -> x"),
    # Dropout(x) -> x in eval mode
    Rule("dropout_module", (Op(modules=_DROPOUT_MODULES),), _check_dropout_module,
         _remove(_first_input), "Dropout_eval(x) -> x"),
    # F.dropout(x, p, training=False) -> x
    Rule("dropout_function", (Op(functions=tuple(_DROPOUT_FUNCTIONS)),), _check_dropout_function,
         _remove(_first_input), "F.dropout(x, training=False) -> x"),
    NEUTRAL_RULE,
)


@register_pass("remove_identity", "remove Identity, eval-mode dropout and x*1, x+0 ops", True)
def remove_identity(gm: GraphModule, ctx: PassContext) -> PassResult:
    return apply_rules(gm, IDENTITY_RULES)


# ---- dead code ----

def _dead_nodes(gm: GraphModule) -> list[Node]:
    """Nodes nothing reads, directly or through other dead nodes, whose only effect is their
    result (never an op that writes a tensor in place: its result may be unused, its write not),
    in graph order."""
    dead: set[Node] = set()
    for node in reversed(gm.graph.nodes):
        if is_pure(gm, node) and all(user in dead for user in node.users):
            dead.add(node)
    return [node for node in gm.graph.nodes if node in dead]


def _check_dead(match: Match) -> Plan | Skip:
    dead = _dead_nodes(match.gm)
    return Plan(dead) if dead else Skip()


def _erase_dead(match: Match, dead: list[Node]) -> str:
    for node in reversed(dead):
        match.gm.graph.erase_node(node)
    return f"deleted nodes: {', '.join(n.name for n in dead)}"


DEAD_CODE_RULES = (
    # f(x) with no reader and no side effect -> nothing
    Rule("dead_code", whole_graph, _check_dead, _erase_dead, "unread pure value -> nothing"),
)


@register_pass("eliminate_dead_code", "delete unused nodes, then unused submodules and attributes",
               True)
def eliminate_dead_code(gm: GraphModule, ctx: PassContext) -> PassResult:
    result = apply_rules(gm, DEAD_CODE_RULES)
    modules = [name for name, _ in gm.named_modules()]
    gm.delete_all_unused_submodules()
    remaining = {name for name, _ in gm.named_modules()}
    deleted = {"submodules": [m for m in modules if m not in remaining],
               "attributes": _delete_unused_attributes(gm)}
    result.report.rewrites += [f"deleted {kind}: {', '.join(names)}"
                               for kind, names in deleted.items() if names]
    return PassResult(gm, bool(result.report.rewrites), result.report)


def _delete_unused_attributes(gm: GraphModule) -> list[str]:
    """Delete root parameters, buffers and tensor constants that no get_attr node reads."""
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    tensors = [name for name, _ in gm.named_parameters(recurse=False)]
    tensors += [name for name, _ in gm.named_buffers(recurse=False)]
    tensors += [name for name, value in vars(gm).items() if isinstance(value, torch.Tensor)]
    unused = [name for name in tensors if name not in read]
    for name in unused:
        delattr(gm, name)
    return unused


# ---- constant folding ----

def _reads_constants_only(node: Node) -> bool:
    inputs, gm = node.all_input_nodes, node.graph.owning_module
    return bool(inputs) and all(n.op == "get_attr" and isinstance(_constant(gm, n), torch.Tensor)
                                for n in inputs)


def _evaluate(node: Node, fetch: Callable[[Node], torch.Tensor]):
    args, kwargs = map_arg((node.args, node.kwargs), fetch)
    with torch.no_grad():
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return node.target(*args, **kwargs)


def _constant(gm: GraphModule, node: Node) -> torch.Tensor:
    return attribute(gm, node.target)


def _check_constant(match: Match) -> Plan | Refuse:
    node = match.nodes[0]
    inputs = [_constant(match.gm, n) for n in node.all_input_nodes]
    shape = _evaluate(node, lambda n: _constant(match.gm, n).to("meta"))
    if shape.numel() > max(t.numel() for t in inputs):
        return Refuse(GROWS)
    return Plan(_evaluate(node, lambda n: _constant(match.gm, n)).detach().clone())


def _fold_constant(match: Match, value: torch.Tensor) -> str:
    gm, node = match.gm, match.nodes[0]
    inputs = [_constant(gm, n) for n in node.all_input_nodes]
    name = unique_name(gm, f"_folded_{node.name}")
    parameters = [t for t in inputs if isinstance(t, nn.Parameter)]
    if parameters:  # keep parameters counted as parameters
        grad = any(p.requires_grad for p in parameters)
        gm.register_parameter(name, nn.Parameter(value, requires_grad=grad))
    else:
        gm.register_buffer(name, value)
    with gm.graph.inserting_before(node):
        constant = gm.graph.get_attr(name)
    constant.meta = dict(node.meta)
    bypass(gm, node, constant)
    return f"folded {node.name} into constant {name}"


CONSTANT_RULES = (
    # op(c1, c2) -> c3 for constants c1, c2
    Rule("fold_constant",
         (Op(functions=tuple(PURE_FUNCTIONS), methods=tuple(PURE_METHODS),
             where=_reads_constants_only),),
         _check_constant, _fold_constant, "op(c1, c2) -> c3"),
)


@register_pass("fold_constants", "evaluate pure ops whose inputs are all constants", True)
def fold_constants(gm: GraphModule, ctx: PassContext) -> PassResult:
    return apply_rules(gm, CONSTANT_RULES)
