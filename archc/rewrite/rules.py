"""The rewrite engine: rules as data, one fixpoint driver for every pass.

A rule is pattern -> check -> rewrite.

- The pattern says where the rule may apply. Most are chains of op matchers `(m_0, ..., m_k)`:
  nodes `n_0 -> ... -> n_k` where every `n_{i+1}` takes `n_i` as its first argument, anchored at
  `n_k`. A shape that is no chain (a tree of adds, a reshape-spelled channel shuffle, a conv
  reached back through BNs and pads) is a `Matcher`: a function of an anchor node that returns
  the matched nodes or None. Either way a node anchors at most one match per rule and sweep. A
  rule over the whole graph (dead code, channel layouts) has the matcher `whole_graph`: it
  anchors at the graph's output node, so its check runs once per sweep.
- The check decides legality and does the work the rewrite needs. It returns one of four
  outcomes, and nothing else (anything else is an archc bug, raised as `RuleError`):
  `Plan(value)` applies: `value` is what the rewrite needs (the folded weights' inputs, the merged
  conv's geometry and weights), and `Plan(value, refusals)` also reports the parts of the match it
  leaves alone; `Skip()` applies nothing and says nothing (another rule's business, or nothing to
  do); `Refuse(reason)` applies nothing and says why; `Refused(refusals)` applies nothing and says
  why for several parts (`without_plan(refusals)` is `Refused` or, with no refusal, `Skip`).
- The rewrite applies the plan, `rewrite(match, plan.value)`, mutating the graph, and returns one
  readable line per change ("folded s1.bn into s1.conv"), or `Done(line, rounded=dtype)` for a
  change that is exact only up to the rounding of the model's own constants in `dtype` (a bias
  the graph cancels with a constant it computed in float32): the pass's report then says so,
  and verification allows that rounding.

`apply_rules` sweeps the rules in order (earlier rules win; within a rule, nodes in graph order)
until a sweep rewrites nothing, then reports every rewrite and the refusals of that last sweep,
which therefore describe the final graph. A sweep may share a memo among its rules (`memo`, built
fresh per sweep, e.g. the linear-op reading of `archc.rewrite.linear_chains`). After each rewrite
the shapes of the nodes it created are computed (`archc.ir.shapes.refresh_shapes`), so every rule
sees current shapes. At most `MAX_SWEEPS` sweeps: rules that keep rewriting each other are an archc
bug, raised as `FixpointError`.
"""

from __future__ import annotations

import reprlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Node

from archc.ir.graph import ALIASES, describe, is_erased, module_aliases
from archc.ir.shapes import refresh_shapes
from archc.rewrite.pipeline import PassReport, PassResult, Refusal

MAX_SWEEPS = 100


class FixpointError(RuntimeError):
    """Rules kept rewriting: an internal error (exit code 1), never a user's."""


class RuleError(RuntimeError):
    """A check returned something that is no outcome (`Plan`, `Skip`, `Refuse`, `Refused`): an
    internal error (exit code 1), never a user's."""


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
    memo: Any = None  # the sweep's shared memo, if the rule set has one

    @property
    def anchor(self) -> Node:
        return self.nodes[-1]

    def module(self, index: int) -> nn.Module:
        return self.gm.get_submodule(self.nodes[index].target)


@dataclass(frozen=True)
class Refuse:
    """A refusal, and the outcome of a check that refuses for one reason: why, where (default:
    the match's nodes) and under which rule name (default: the rule's own; a rule with several
    sides names each)."""

    reason: str
    nodes: tuple[Node | str, ...] = ()
    rule: str | None = None


@dataclass(frozen=True)
class Refused:
    """A failed check with several refusals (at least one), each with its own nodes."""

    refusals: tuple[Refuse, ...]


@dataclass(frozen=True)
class Skip:
    """A check with nothing to do and nothing to say: the rule does not apply here."""


@dataclass(frozen=True)
class Plan:
    """A passed check: `value` is what the rewrite needs, `rewrite(match, value)`; `refusals`
    report the parts of the match the rewrite leaves alone."""

    value: Any = None
    refusals: tuple[Refuse, ...] = ()


# What a check returns: apply (with refusals for what it leaves out), skip silently, or refuse.
Outcome = Plan | Skip | Refuse | Refused


def without_plan(refusals: Sequence[Refuse]) -> Refused | Skip:
    """The outcome of a check that found nothing to apply: its refusals, or `Skip()` if none."""
    return Refused(tuple(refusals)) if refusals else Skip()


@dataclass(frozen=True)
class Done:
    """A rewrite's line, exact only up to the rounding of the model's constants in `rounded`."""

    line: str
    rounded: torch.dtype | None = None


# A matcher: (graph module, anchor node, sweep memo) -> the matched nodes, anchor last, or None.
Matcher = Callable[[GraphModule, Node, Any], "tuple[Node, ...] | None"]


def whole_graph(gm: GraphModule, node: Node, memo: Any) -> tuple[Node, ...] | None:
    """The matcher of a rule over the whole graph: it anchors at the graph's output node, the one
    node every graph has once, so the rule's check runs once per sweep."""
    return (node,) if node.op == "output" else None


@dataclass(frozen=True)
class Rule:
    name: str
    pattern: tuple[Op, ...] | Matcher
    check: Callable[[Match], Outcome]
    rewrite: Callable[[Match, Any], str | Done | list[str | Done]] | None  # applies a Plan's value
    identity: str  # the identity the rewrite relies on, e.g. "x * 1 -> x"

    def match(self, gm: GraphModule, anchor: Node, memo: Any = None) -> Match | None:
        if callable(self.pattern):
            nodes = self.pattern(gm, anchor, memo)
            return None if nodes is None else Match(gm, tuple(nodes), memo)
        if not self.pattern[-1].matches(gm, anchor):
            return None
        nodes = [anchor]
        for op in reversed(self.pattern[:-1]):
            producer = nodes[0].args[0] if nodes[0].args else None
            if not isinstance(producer, Node) or not op.matches(gm, producer):
                return None
            nodes.insert(0, producer)
        return Match(gm, tuple(nodes), memo)


@dataclass
class _Sweep:
    rewrites: list[str] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)
    rounded: torch.dtype | None = None
    fired: Counter[str] = field(default_factory=Counter)


def apply_rules(gm: GraphModule, rules: Sequence[Rule],
                memo: Callable[[GraphModule], Any] | None = None) -> PassResult:
    """Apply `rules` until none fires; report every rewrite and the final sweep's refusals."""
    try:
        return _sweeps(gm, rules, memo)
    finally:
        gm.meta.pop(ALIASES, None)


def _sweeps(gm: GraphModule, rules: Sequence[Rule], memo) -> PassResult:
    rewrites: list[str] = []
    history: list[list[str]] = []
    rounded = None
    fired: Counter[str] = Counter()
    for _ in range(MAX_SWEEPS):
        gm.meta[ALIASES] = module_aliases(gm)
        sweep = _Sweep()
        shared = memo(gm) if memo is not None else None
        for rule in rules:
            for node in list(gm.graph.nodes):
                if not is_erased(node):
                    _try(gm, rule, node, shared, sweep)
        rewrites += sweep.rewrites
        rounded = rounded or sweep.rounded
        fired += sweep.fired
        if not sweep.rewrites:
            return PassResult(gm, bool(rewrites), PassReport(
                rewrites=rewrites, refusals=sweep.refusals, rounded_in=rounded, fired=fired))
        history.append(sweep.rewrites)
    last = "; ".join(history[-1][:3])
    raise FixpointError(
        f"internal error: rules {', '.join(r.name for r in rules)} did not reach a fixpoint in "
        f"{MAX_SWEEPS} sweeps (the last sweep still rewrote: {last})")


def _try(gm: GraphModule, rule: Rule, node: Node, memo: Any, sweep: _Sweep) -> None:
    match = rule.match(gm, node, memo)
    if match is None:
        return
    plan, refusals = _read_outcome(rule, match, rule.check(match))
    for refusal in refusals:
        nodes = refusal.nodes or match.nodes
        names = tuple(n if isinstance(n, str) else describe(n) for n in nodes)
        sweep.refusals.append(Refusal(refusal.rule or rule.name, names, refusal.reason))
    if plan is not None:
        done = rule.rewrite(match, plan.value)
        sweep.fired[rule.name] += 1
        for item in [done] if isinstance(done, (str, Done)) else done:
            if isinstance(item, Done):
                sweep.rewrites.append(item.line)
                sweep.rounded = sweep.rounded or item.rounded
            else:
                sweep.rewrites.append(item)
        refresh_shapes(gm)


def _read_outcome(rule: Rule, match: Match, outcome: Outcome
                  ) -> tuple[Plan | None, tuple[Refuse, ...]]:
    """(the plan to apply or None, the refusals to report) of a check's outcome; anything that is
    no outcome is a `RuleError`."""
    if isinstance(outcome, Plan):
        plan, refusals = outcome, outcome.refusals
    elif isinstance(outcome, Skip):
        plan, refusals = None, ()
    elif isinstance(outcome, Refuse):
        plan, refusals = None, (outcome,)
    elif isinstance(outcome, Refused) and outcome.refusals:
        plan, refusals = None, outcome.refusals
    else:
        raise RuleError(
            f"internal error: the check of rule {rule.name} at {describe(match.anchor)} returned "
            f"{reprlib.repr(outcome)}, not Plan(value), Skip(), Refuse(reason) or "
            f"Refused(refusals) with at least one refusal")
    if not all(isinstance(refusal, Refuse) for refusal in refusals):
        raise RuleError(f"internal error: the check of rule {rule.name} at "
                        f"{describe(match.anchor)} gave refusals that are not Refuse: "
                        f"{reprlib.repr(refusals)}")
    return plan, tuple(refusals)


def always(match: Match) -> Plan:
    """A check for rules whose pattern is their whole condition: apply, with nothing to plan."""
    return Plan()
