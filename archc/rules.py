"""Rewrite rules as data: pattern -> check -> rewrite, and a fixpoint applier.

A pattern is a chain of op matchers `(m_0, ..., m_k)`; it matches nodes `n_0 -> ... -> n_k` where
every `n_{i+1}` takes `n_i` as its first argument. The applier tries every node as the anchor `n_k`
and walks the chain backwards, so a node anchors at most one match per rule. A shape that is not
a chain (a sum of parallel branches) anchors on one node, narrowed by `Op.where`, and `check`
inspects the rest.

`check(match)` returns None (the rewrite is legal) or the reason it is not; `rewrite(match)`
mutates the graph and returns one readable line ("folded s1.bn into s1.conv"). `apply_rules` sweeps
the rules in order (earlier rules win) until a sweep changes nothing; the refusals of that last
sweep are the ones reported, so they describe the final graph.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Node
from torch.fx.passes.shape_prop import ShapeProp

from archc.pipeline import PassReport, PassResult, Refusal

MAX_SWEEPS = 100


@dataclass(frozen=True)
class Op:
    """Matches a node by what it computes: a module type, a function or a Tensor method name,
    and optionally a structural predicate on the node (`where`)."""

    modules: tuple[type[nn.Module], ...] = ()
    functions: tuple[Callable, ...] = ()
    methods: tuple[str, ...] = ()
    where: Callable[[Node], bool] | None = None

    def matches(self, gm: GraphModule, node: Node) -> bool:
        if node.op == "call_module":
            found = bool(self.modules) and isinstance(gm.get_submodule(node.target), self.modules)
        elif node.op == "call_function":
            found = node.target in self.functions
        elif node.op == "call_method":
            found = node.target in self.methods
        else:
            return False
        return found and (self.where is None or self.where(node))


@dataclass(frozen=True)
class Match:
    gm: GraphModule
    nodes: tuple[Node, ...]  # producer first, the anchor last

    def module(self, index: int) -> nn.Module:
        return self.gm.get_submodule(self.nodes[index].target)


@dataclass(frozen=True)
class Rule:
    name: str
    pattern: tuple[Op, ...]
    check: Callable[[Match], str | None]  # None: legal; else the reason the rule refuses
    rewrite: Callable[[Match], str]  # mutates the graph; returns what it did
    identity: str  # the identity the rewrite relies on, e.g. "x * 1 -> x"

    def match(self, gm: GraphModule, anchor: Node) -> Match | None:
        if not self.pattern[-1].matches(gm, anchor):
            return None
        nodes = [anchor]
        for op in reversed(self.pattern[:-1]):
            producer = nodes[0].args[0] if nodes[0].args else None
            if not isinstance(producer, Node) or not op.matches(gm, producer):
                return None
            nodes.insert(0, producer)
        return Match(gm, tuple(nodes))


def apply_rules(gm: GraphModule, rules: tuple[Rule, ...] | list[Rule]) -> PassResult:
    """Apply `rules` until none fires; report every rewrite and the final refusals."""
    rewrites: list[str] = []
    for _ in range(MAX_SWEEPS):
        refusals: list[Refusal] = []
        changed = False
        for rule in rules:
            for node in list(gm.graph.nodes):
                if getattr(node, "_erased", False):  # erased by an earlier rewrite of this sweep
                    continue
                match = rule.match(gm, node)
                if match is None:
                    continue
                reason = rule.check(match)
                if reason is None:
                    rewrites.append(rule.rewrite(match))
                    changed = True
                else:
                    refusals.append(Refusal(rule.name, tuple(map(describe, match.nodes)), reason))
        if not changed:
            return PassResult(gm, bool(rewrites), PassReport(rewrites=rewrites, refusals=refusals))
    raise RuntimeError(f"rules {[r.name for r in rules]} did not reach a fixpoint")


# ---- helpers for patterns, checks and rewrites ----

def describe(node: Node) -> str:
    """A module's qualified name for call_module nodes, else the node's name."""
    return node.target if node.op == "call_module" else node.name


def arg(node: Node, position: int, keyword: str, default=None):
    """A call's argument given positionally or by keyword."""
    if len(node.args) > position:
        return node.args[position]
    return node.kwargs.get(keyword, default)


def set_arg(node: Node, position: int, keyword: str, value) -> None:
    """Set a call's argument where it is given (positionally or by keyword), else by keyword."""
    if len(node.args) > position:
        node.update_arg(position, value)
    else:
        node.update_kwarg(keyword, value)


def unique_user(node: Node) -> Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def has_other_users(node: Node, user: Node) -> bool:
    """Whether the tensor `node` is read by anything besides `user` (the graph output counts)."""
    return any(other is not user for other in node.users)


def module_uses(gm: GraphModule, module: nn.Module) -> int:
    """How often the graph uses `module`: calls (under any alias) plus `get_attr` reads of its
    parameters or buffers."""
    names = {name for name, m in gm.named_modules(remove_duplicate=False) if m is module}
    return sum(1 for node in gm.graph.nodes
               if (node.op == "call_module" and node.target in names)
               or (node.op == "get_attr" and node.target.rpartition(".")[0] in names))


def called_once(gm: GraphModule, node: Node) -> bool:
    """Whether the module of call_module `node` is used by this node only."""
    return module_uses(gm, gm.get_submodule(node.target)) == 1


def in_training(*modules: nn.Module) -> bool:
    return any(m.training for m in modules)


def bypass(gm: GraphModule, node: Node, replacement: Node) -> None:
    """Send the users of `node` to `replacement`, erase `node` and delete its module if unused."""
    node.replace_all_uses_with(replacement)
    gm.graph.erase_node(node)
    if node.op == "call_module":
        delete_if_unused(gm, node.target)


def delete_if_unused(gm: GraphModule, target: str) -> None:
    if not module_uses(gm, gm.get_submodule(target)):
        gm.delete_submodule(target)


def set_weights(module: nn.Module, weight: Tensor, bias: Tensor | None) -> None:
    """Replace `module.weight` (and `.bias`) by new parameters in the old weight's dtype.

    New Parameter objects, not in-place copies: a tied weight elsewhere keeps its value.
    """
    like = module.weight
    module.weight = nn.Parameter(weight.to(like), requires_grad=like.requires_grad)
    if bias is not None:
        module.bias = nn.Parameter(bias.to(like), requires_grad=like.requires_grad)


def node_shape(node: Node) -> tuple[int, ...] | None:
    """The output shape recorded by shape propagation, if any."""
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def node_dtype(node: Node) -> torch.dtype | None:
    meta = node.meta.get("tensor_meta")
    return getattr(meta, "dtype", None)


def propagate_shapes(gm: GraphModule, inputs: tuple[Tensor, ...] | None) -> None:
    """Record shapes and dtypes in `node.meta["tensor_meta"]` by running the graph once on the
    example inputs (cheaper here than fake tensors, whose first use costs seconds); no-op
    without inputs."""
    if inputs is not None:
        with torch.no_grad():
            ShapeProp(gm).propagate(*inputs)
