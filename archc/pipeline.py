"""Pass infrastructure: a registry of named passes, a context object and the pipeline runner.

A pass is a function `(gm, ctx) -> PassResult(graph_module, modified, report)`, registered by name
with `@register_pass(name, summary, preserves_function)`. It may rewrite `gm` in place; it must
report `modified=False` exactly when it left the graph unchanged, so that a second run of a pipeline
is a no-op. Built-in passes live in `passes/` and register on first use of the registry.

`run_pipeline` works on a deep copy of the model (the caller's module is never touched) and, around
every pass: refuses models in training mode, times the pass, runs `graph.lint()` and
`recompile()`, records nodes / op histogram / parameters / FLOPs before and after, and with
`ctx.verify` compares the outputs on a random input. The relative error is

    err = max|y_after - y_before| / max|y_before|        (over every output tensor)

and a function-preserving pass with `err > ctx.rtol` raises `PassError` naming the pass and the
passes before it. The whole pipeline is checked the same way against the input model.
"""

from __future__ import annotations

import copy
import difflib
import functools
import importlib
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Node
from torch.utils._pytree import tree_leaves

from archc.errors import ArchcError, PassError
from archc.init import random_input

TRAINING_MODE = "model is in training mode; call .eval() — BN would use batch statistics"

# A FLOP counter the caller may plug in: (graph module, example inputs) -> multiply-adds or None.
Measure = Callable[[GraphModule, tuple[Tensor, ...]], "int | None"]


@dataclass(frozen=True)
class Refusal:
    """A rule matched but did not fire: why (shown by `--explain`)."""

    rule: str
    nodes: tuple[str, ...]  # the matched nodes, producer first
    reason: str

    def __str__(self) -> str:
        return f"{self.rule} at {' -> '.join(self.nodes)}: {self.reason}"


@dataclass(frozen=True)
class GraphStats:
    """Size of a graph: nodes, op histogram, parameter count and (if measurable) FLOPs."""

    nodes: int
    ops: Counter[str]  # op kind (module type, function name, Tensor.method) -> count
    params: int  # numel of every nn.Parameter (BN running statistics are buffers: not counted)
    flops: int | None = None


@dataclass
class PassReport:
    """What one pass did. The pass fills `rewrites` and `refusals`; the registry and the pipeline
    runner fill the rest."""

    name: str = ""
    preserves_function: bool = True
    modified: bool = False
    rewrites: list[str] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)
    before: GraphStats | None = None
    after: GraphStats | None = None
    seconds: float = 0.0
    error: float | None = None  # relative error against the graph before the pass, if verified
    check: str = ""  # "verified", "not verified: changes the function", ...

    def row(self) -> str:
        b, a = self.before, self.after
        nodes = params = flops = "-"
        if b is not None and a is not None:
            nodes = _arrow(b.nodes, a.nodes, str)
            params = _arrow(b.params, a.params, _si)
            if b.flops is not None and a.flops is not None:
                flops = _arrow(b.flops, a.flops, _si)
        check = self.check + (f" (rel err {self.error:.1e})" if self.error is not None else "")
        return (f"{self.name:<24} {'yes' if self.modified else 'no':<4} {nodes:<13} {params:<17} "
                f"{flops:<17} {self.seconds * 1e3:>8.1f} ms  {check}")

    def details(self, explain: bool) -> list[str]:
        lines = []
        if self.before is not None and self.after is not None:
            ops = _ops_diff(self.before.ops, self.after.ops)
            if ops:
                lines.append(f"    ops: {ops}")
        if explain:
            lines += [f"    rewrote: {r}" for r in self.rewrites]
            lines += [f"    refused: {r}" for r in self.refusals]
        return lines

    def format(self, explain: bool = True) -> str:
        return "\n".join([self.row(), *self.details(explain)])

    __str__ = format


@dataclass
class PassResult:
    graph_module: GraphModule
    modified: bool
    report: PassReport = field(default_factory=PassReport)


PassFn = Callable[[GraphModule, "PassContext"], PassResult]


@dataclass
class PassContext:
    """Options of one pipeline run (the CLI fills it)."""

    verify: bool = True  # compare outputs before/after every function-preserving pass
    rtol: float = 1e-5  # max relative error max|Δ| / max|ref| accepted by verification
    example_inputs: tuple[Tensor, ...] | None = None  # if None: random inputs of `input_shape`
    input_shape: tuple[int, ...] | None = None
    seed: int = 0  # seed of the random inputs
    dump_after: set[str] | Literal["all"] | None = None  # write gm.code after these passes
    dump_dir: Path | None = None
    explain: bool = False  # the pipeline's report lists every rewrite and refusal
    measure: Measure | None = None  # FLOP counter; without it FLOPs are not reported
    options: dict[str, Any] = field(default_factory=dict)  # per-pass options, "pass.option": value

    def inputs(self, gm: nn.Module) -> tuple[Tensor, ...] | None:
        """The example inputs: given ones, or random ones of `input_shape` in the model's dtype."""
        if self.example_inputs is not None:
            return tuple(self.example_inputs)
        if self.input_shape is None:
            return None
        tensors = [*gm.parameters(), *gm.buffers()]
        dtype = next((t.dtype for t in tensors if t.is_floating_point()), torch.float32)
        return (random_input(tuple(self.input_shape), self.seed, dtype),)


@dataclass(frozen=True)
class PassInfo:
    name: str
    summary: str
    preserves_function: bool
    fn: PassFn


_PASSES: dict[str, PassInfo] = {}


def register_pass(name: str, summary: str, preserves_function: bool) -> Callable[[PassFn], PassFn]:
    """Register `fn(gm, ctx) -> PassResult` under `name`.

    The registered function refuses models in training mode, times the pass and fills the
    report's name, `preserves_function` and wall time. It rewrites `gm` in place.
    """

    def decorate(fn: PassFn) -> PassFn:
        @functools.wraps(fn)
        def run(gm: GraphModule, ctx: PassContext) -> PassResult:
            training = _training_modules(gm)
            if training:
                raise PassError(f"{TRAINING_MODE} (training: {', '.join(training[:5])})", name)
            start = time.perf_counter()
            result = fn(gm, ctx)
            report = replace(result.report, name=name, preserves_function=preserves_function,
                             modified=result.modified, seconds=time.perf_counter() - start)
            return PassResult(result.graph_module, result.modified, report)

        known = _PASSES.get(name)
        if known is not None and known.fn.__qualname__ != fn.__qualname__:
            raise ValueError(f"pass {name!r} is registered twice ({known.fn.__qualname__})")
        _PASSES[name] = PassInfo(name, summary, preserves_function, run)
        return run

    return decorate


def _training_modules(gm: GraphModule) -> list[str]:
    """Called modules in training mode (GraphModule's own attribute containers do not count)."""
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    return sorted(name for name in called
                  if any(m.training for m in gm.get_submodule(name).modules()))


def _registry() -> dict[str, PassInfo]:
    from passes.pipelines import PASS_MODULES

    for module in PASS_MODULES:
        importlib.import_module(module)
    return _PASSES


def get_pass(name: str) -> PassInfo:
    passes = _registry()
    if name not in passes:
        raise ArchcError(_unknown("pass", name, passes))
    return passes[name]


def list_passes() -> list[tuple[str, str, bool]]:
    """(name, summary, preserves_function) of every registered pass, sorted by name."""
    return [(p.name, p.summary, p.preserves_function) for _, p in sorted(_registry().items())]


def resolve_pipeline(text: str) -> list[str]:
    """A comma-separated list of pass names and pipeline names (`passes.pipelines.PIPELINES`,
    expanded in place): `default`, `none`, `fold_bn,eliminate_dead_code`, `default,align_channels`.
    """
    from passes.pipelines import PIPELINES

    names: list[str] = []
    passes = _registry()
    for name in (part.strip() for part in text.split(",")):
        if name in PIPELINES:
            names += PIPELINES[name]
        elif name in passes:
            names.append(name)
        else:
            pipelines = ", ".join(PIPELINES)
            raise ArchcError(f"{_unknown('pass', name, passes)}; pipelines: {pipelines}")
    return names


def _unknown(kind: str, name: str, valid: Iterable[str]) -> str:
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown {kind} {name!r}{hint}; valid: {', '.join(valid)}"


@dataclass
class PipelineResult:
    graph_module: GraphModule
    reports: list[PassReport]
    max_error: float | None  # relative error of the result against the input model, if verified
    explain: bool = False

    @property
    def modified(self) -> bool:
        return any(r.modified for r in self.reports)

    def format(self, explain: bool | None = None) -> str:
        explain = self.explain if explain is None else explain
        head = (f"{'pass':<24} {'mod':<4} {'nodes':<13} {'params':<17} {'flops':<17} "
                f"{'time':>11}  check")
        lines = [head]
        for report in self.reports:
            lines.append(report.row())
            lines += report.details(explain)
        if self.max_error is not None:
            lines.append(f"pipeline: rel err {self.max_error:.1e} against the input model")
        return "\n".join(lines)

    __str__ = format


def run_pipeline(model: nn.Module, names: list[str], ctx: PassContext | None = None
                 ) -> PipelineResult:
    """Run the named passes in order on a deep copy of `model` (traced if not a GraphModule)."""
    ctx = ctx or PassContext()
    infos = [get_pass(name) for name in names]
    dumped = set() if ctx.dump_after in (None, "all") else set(ctx.dump_after)
    unknown = sorted(dumped - set(names))
    if unknown:
        raise ArchcError(_unknown("pass in dump_after", unknown[0], names))
    if ctx.dump_after and ctx.dump_dir is None:
        raise ArchcError("dump_after needs a dump_dir")
    gm = copy.deepcopy(model)
    if not isinstance(gm, GraphModule):
        gm = torch.fx.symbolic_trace(gm)
    inputs = ctx.inputs(gm)
    if ctx.verify and inputs is None:
        raise PassError("verification needs example_inputs or input_shape (or verify=False)")
    original = previous = _outputs(gm, inputs) if ctx.verify else None
    stats = graph_stats(gm, inputs, ctx.measure)
    reports: list[PassReport] = []
    exact = True  # every pass that changed the graph preserves the function
    for index, info in enumerate(infos, start=1):
        preceding = tuple(names[:index - 1])
        code = gm.code
        result = info.fn(gm, ctx)
        gm, report = result.graph_module, result.report
        try:
            gm.graph.lint()
        except RuntimeError as error:
            raise PassError(f"left an invalid graph: {error}", info.name, preceding) from error
        gm.recompile()
        if not result.modified and gm.code != code:
            raise PassError("reported modified=False but changed the graph", info.name, preceding)
        after = graph_stats(gm, inputs, ctx.measure) if result.modified else stats
        report = replace(report, before=stats, after=after, check=_check_text(result, info, ctx))
        stats = after
        exact = exact and (info.preserves_function or not result.modified)
        if result.modified and ctx.verify:
            outputs = _outputs(gm, inputs)
            if info.preserves_function:
                report.error = relative_error(previous, outputs)
                _require_close(report.error, ctx.rtol, info.name, preceding)
            previous = outputs
        reports.append(report)
        if ctx.dump_after == "all" or (ctx.dump_after and info.name in ctx.dump_after):
            Path(ctx.dump_dir).mkdir(parents=True, exist_ok=True)
            (Path(ctx.dump_dir) / f"{index:02d}_{info.name}.py").write_text(gm.code)
    max_error = None
    if ctx.verify and exact:
        max_error = relative_error(original, previous)
        _require_close(max_error, ctx.rtol, "", tuple(names))
    return PipelineResult(gm, reports, max_error, ctx.explain)


def _check_text(result: PassResult, info: PassInfo, ctx: PassContext) -> str:
    if not result.modified:
        return "unchanged"
    if not info.preserves_function:
        return "not verified: changes the function"
    return "verified" if ctx.verify else "not verified: verify off"


def _require_close(error: float, rtol: float, pass_name: str, preceding: tuple[str, ...]) -> None:
    if not error <= rtol:  # also catches NaN
        raise PassError(f"output changed: relative error {error:.3g} > rtol {rtol:g}",
                        pass_name, preceding)


def _outputs(gm: GraphModule, inputs: tuple[Tensor, ...]) -> list[Tensor]:
    with torch.no_grad():
        return [t for t in tree_leaves(gm(*inputs)) if isinstance(t, Tensor)]


def relative_error(reference: list[Tensor], candidate: list[Tensor]) -> float:
    """max|Δ| / max|reference| over all tensors (max|Δ| if the reference is 0); NaN where the
    reference is finite, or a change of structure or shape, gives inf."""
    if len(reference) != len(candidate) or any(r.shape != c.shape
                                               for r, c in zip(reference, candidate)):
        return float("inf")
    delta = scale = 0.0
    for ref, out in zip(reference, candidate):
        ref, out = ref.detach().double(), out.detach().double()
        diff = (out - ref).abs()
        diff = torch.where(ref.isnan() & out.isnan(), 0.0, diff.nan_to_num(nan=float("inf")))
        if diff.numel():
            delta = max(delta, diff.max().item())
            scale = max(scale, ref.nan_to_num(nan=0.0).abs().max().item())
    return delta / scale if scale > 0 else delta


def op_kind(gm: GraphModule, node: Node) -> str:
    """Module type, function name or `Tensor.method` computed by a node."""
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    return node.op


def graph_stats(gm: GraphModule, inputs: tuple[Tensor, ...] | None = None,
                measure: Measure | None = None) -> GraphStats:
    """Nodes, op histogram (placeholders and outputs excluded), parameter count and FLOPs."""
    ops = Counter(op_kind(gm, n) for n in gm.graph.nodes if n.op not in ("placeholder", "output"))
    params = sum(p.numel() for p in gm.parameters())
    flops = measure(gm, inputs) if measure is not None and inputs is not None else None
    return GraphStats(len(gm.graph.nodes), ops, params, flops)


def _arrow(before: int, after: int, fmt: Callable[[int], str]) -> str:
    return fmt(before) if before == after else f"{fmt(before)}->{fmt(after)}"


def _si(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _ops_diff(before: Counter[str], after: Counter[str]) -> str:
    changed = sorted(k for k in before.keys() | after.keys() if before[k] != after[k])
    return ", ".join(f"{k} {before[k]}->{after[k]}" for k in changed)
