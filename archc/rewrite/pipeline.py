"""Pass infrastructure: a registry of named passes and pipelines, a context object, the runner.

A pass is a function `(gm, ctx) -> PassResult(graph_module, modified, report)`, registered by name
with `@register_pass(name, summary, preserves_function, options)`. It may rewrite `gm` in place
and must report `modified=False` exactly when it left the graph unchanged, so that a second run
of a pipeline is a no-op. A pass declares its options (`PassOption`: type, default, one-line
help); `ctx.option(pass, name)` reads them, and an unknown or mistyped option is a user error
before anything runs. The engine knows no pass by itself: the catalogue (`passes`) registers its
passes and named pipelines when imported.

`run_pipeline` never touches the caller's module. It works on a copy, propagates shapes once on
meta tensors (`archc.ir.shapes`), and around every pass: refuses models in training mode, times the
pass, runs `graph.lint()` and `recompile()`, records nodes / op histogram / parameters / FLOPs
before and after. Verification (`ctx.verify`, `archc.ir.verify`):

- the copy is float64, so each function-preserving pass is checked in float64 against the graph
  before it: relative error <= `FLOAT64_RTOL` (1e-9), else `PassError` naming the pass and those
  before it. Exact rewrites agree to ~1e-15 there; a wrong identity shows at 1e-3 or more. A pass
  whose rewrites are exact only up to the rounding of the model's own constants says so
  (`PassReport.rounded_in`) and is held to that rounding (`verify.rounding_tolerance`);
- the result is cast back to the model's dtype once (one rounding per weight) and judged against
  the float64 reference by the model's own rounding: relative error <= `max(rtol, 10 * noise)`,
  noise being the input model's own distance from float64. Both figures are reported.

A model that does not run in float64 (it casts explicitly) is worked on and checked in its own
dtype at `rtol`, and the report says why. With `verify=False` the copy shares the caller's
tensors (passes replace tensors, never write them) and each rewrite rounds to the model's dtype.

What verification costs, and what it does not cut. The float64 graph runs once as the reference,
and that run also records the shapes the passes read (`verify.float64_reference`); it runs again
only after a pass that changed the graph (a pass that left it unchanged costs no run), and a
function-preserving pass is compared with the outputs of the graph before it (one reference,
carried forward); the result is judged with one run of it and one of the input model in the
model's dtype. The input is the caller's, at the deploy shape, not a smaller one that the graph
would accept: the passes and the FLOPs they report read the shapes of that input, and at a
smaller one the last stages' maps shrink to 1x1, where a 3x3 kernel's off-centre taps touch only
padding, so a rewrite that misplaced them would pass.
"""

from __future__ import annotations

import functools
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.fx import GraphModule

from archc.common.suggest import did_you_mean
from archc.errors import ArchcError, PassError
from archc.ir import verify
from archc.ir.graph import SOURCE_DTYPE, copy_module, model_dtype
from archc.ir.init import random_input
from archc.ir.ops import op_kind
from archc.ir.shapes import cast_shapes, has_shapes, propagate_shapes, refresh_shapes

TRAINING_MODE = "model is in training mode; call .eval() — BN would use batch statistics"

# A FLOP counter the caller may plug in: graph module (shapes recorded) -> multiply-adds or None.
Measure = Callable[[GraphModule], "int | None"]


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
    verify_seconds: float = 0.0
    error: float | None = None  # relative error against the graph before the pass, if verified
    check: str = ""  # "verified in float64", "not verified: changes the function", ...
    rounded_in: torch.dtype | None = None  # exact only up to the rounding of constants in this
    fired: Counter[str] = field(default_factory=Counter)  # rule name -> rewrites

    def row(self) -> str:
        b, a = self.before, self.after
        nodes = params = flops = "-"
        if b is not None and a is not None:
            nodes = _arrow(b.nodes, a.nodes, str)
            params = _si_arrow(b.params, a.params)
            if b.flops is not None and a.flops is not None:
                flops = _si_arrow(b.flops, a.flops)
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
            lines += grouped_refusals(self.refusals)
        return lines

    def format(self, explain: bool = True) -> str:
        return "\n".join([self.row(), *self.details(explain)])

    __str__ = format


def grouped_refusals(refusals: Sequence[Refusal], shown: int = 3) -> list[str]:
    """One line per rule and reason (the part before its details): the first refusal in full,
    how many there are, and where the next few are."""
    groups: dict[tuple[str, str], list[Refusal]] = {}
    for refusal in refusals:
        groups.setdefault((refusal.rule, refusal.reason.split(": ")[0]), []).append(refusal)
    lines = []
    for items in groups.values():
        first, more = items[0], items[1:]
        count = f" ({len(items)}x)" if more else ""
        where = ""
        if more:
            places = "; ".join(" -> ".join(r.nodes) for r in more[:shown])
            rest = f" and {len(more) - shown} more" if len(more) > shown else ""
            where = f" [also at {places}{rest}]"
        lines.append(f"    refused{count}: {first}{where}")
    return lines


@dataclass
class PassResult:
    graph_module: GraphModule
    modified: bool
    report: PassReport = field(default_factory=PassReport)


PassFn = Callable[[GraphModule, "PassContext"], PassResult]


@dataclass(frozen=True)
class PassOption:
    """An option a pass declares: `--pass-option PASS.NAME=VALUE` on the command line."""

    name: str
    type: type  # int, float, bool or str
    default: Any
    help: str
    check: Callable[[Any], str | None] | None = None  # why a well-typed value is invalid

    def coerce(self, value: Any) -> Any:
        """The value as this option's type (strings are parsed); `ValueError` with why not."""
        if isinstance(value, str) and self.type is not str:
            value = _parse_option_text(value, self.type)
        if self.type is float and type(value) is int:
            value = float(value)
        if type(value) is not self.type:
            raise ValueError(f"expected {_TYPE_NAMES[self.type]}, got {value!r}")
        problem = self.check(value) if self.check else None
        if problem:
            raise ValueError(problem)
        return value


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _parse_option_text(text: str, kind: type) -> Any:
    if kind is bool:
        lowered = text.strip().lower()
        if lowered in ("true", "yes", "1", "on"):
            return True
        if lowered in ("false", "no", "0", "off"):
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"expected {_TYPE_NAMES[kind]}, got {text!r}") from None


@dataclass
class PassContext:
    """Options of one pipeline run (the CLI fills it)."""

    verify: bool = True  # check every function-preserving pass in float64 and the result
    rtol: float = 1e-5  # relative tolerance of the result in the model's dtype (see module doc)
    example_inputs: tuple[Tensor, ...] | None = None  # if None: random inputs of `input_shape`
    input_shape: tuple[int, ...] | None = None
    seed: int = 0  # seed of the random inputs
    dump_after: set[str] | Literal["all"] | None = None  # write gm.code after these passes
    dump_dir: Path | None = None
    explain: bool = False  # the pipeline's report lists every rewrite and refusal
    measure: Measure | None = None  # FLOP counter; without it FLOPs are not reported
    options: dict[str, Any] = field(default_factory=dict)  # per-pass options, "pass.option": value
    progress: Callable[[str], None] | None = None  # called with a line as each pass starts

    def inputs(self, gm: nn.Module) -> tuple[Tensor, ...] | None:
        """The example inputs: given ones, or random ones of `input_shape` in the model's dtype."""
        if self.example_inputs is not None:
            return tuple(self.example_inputs)
        if self.input_shape is None:
            return None
        return (random_input(tuple(self.input_shape), self.seed, model_dtype(gm)),)

    def option(self, pass_name: str, name: str) -> Any:
        """The value of one of a pass's declared options (its default if not given)."""
        declared = {o.name: o for o in get_pass(pass_name).options}[name]
        key = f"{pass_name}.{name}"
        return declared.coerce(self.options[key]) if key in self.options else declared.default


@dataclass(frozen=True)
class Requirement:
    """A precondition a pass declares on the graph it is given, checked before it runs (as
    torch.fx's `PassBase.requires` checks one): `unmet(gm)` names the nodes that break it (none:
    it holds), and the pass `established_by` brings any graph to it."""

    name: str
    unmet: Callable[[GraphModule], list[str]]
    established_by: str

    def check(self, gm: GraphModule, pass_name: str) -> None:
        """`PassError` naming the nodes and the pass to run first, if the graph breaks it."""
        nodes = self.unmet(gm)
        if nodes:
            raise PassError(f"needs {self.name}: run {self.established_by!r} before it "
                            f"({', '.join(nodes[:5])})", pass_name)


@dataclass(frozen=True)
class PassInfo:
    name: str
    summary: str
    preserves_function: bool
    fn: PassFn
    options: tuple[PassOption, ...] = ()
    requires: tuple[Requirement, ...] = ()


_PASSES: dict[str, PassInfo] = {}
_PIPELINES: dict[str, tuple[str, ...]] = {}
NO_CATALOGUE = ("no passes are registered: import the catalogue first "
                "(`import archc.passes`)")


def register_pass(name: str, summary: str, preserves_function: bool,
                  options: Sequence[PassOption] = (), requires: Sequence[Requirement] = ()
                  ) -> Callable[[PassFn], PassFn]:
    """Register `fn(gm, ctx) -> PassResult` under `name`.

    The registered function refuses models in training mode and graphs that break one of the
    pass's `requires`, makes sure the graph's shapes are recorded (propagating them from the
    context's inputs if not), times the pass and fills the report's name, `preserves_function`
    and wall time. It rewrites `gm` in place.
    """

    def decorate(fn: PassFn) -> PassFn:
        @functools.wraps(fn)
        def run(gm: GraphModule, ctx: PassContext) -> PassResult:
            training = _training_modules(gm)
            if training:
                raise PassError(f"{TRAINING_MODE} (training: {', '.join(training[:5])})", name)
            start = time.perf_counter()
            refresh_shapes(gm)
            if not has_shapes(gm):
                propagate_shapes(gm, ctx.inputs(gm))
            for requirement in requires:
                requirement.check(gm, name)
            result = fn(gm, ctx)
            report = replace(result.report, name=name, preserves_function=preserves_function,
                             modified=result.modified, seconds=time.perf_counter() - start)
            return PassResult(result.graph_module, result.modified, report)

        known = _PASSES.get(name)
        if known is not None and known.fn.__qualname__ != fn.__qualname__:
            raise ValueError(f"pass {name!r} is registered twice ({known.fn.__qualname__})")
        _PASSES[name] = PassInfo(name, summary, preserves_function, run, tuple(options),
                                tuple(requires))
        return run

    return decorate


def register_pipeline(name: str, passes: Sequence[str]) -> None:
    """Name an ordered list of passes (and pipelines, expanded when resolved)."""
    _PIPELINES[name] = tuple(passes)


def _training_modules(gm: GraphModule) -> list[str]:
    """Called modules in training mode (GraphModule's own attribute containers do not count)."""
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    return sorted(name for name in called
                  if any(m.training for m in gm.get_submodule(name).modules()))


def get_pass(name: str) -> PassInfo:
    if name not in _PASSES:
        raise ArchcError(_unknown("pass", name, _PASSES) if _PASSES else NO_CATALOGUE)
    return _PASSES[name]


def list_passes() -> list[PassInfo]:
    """Every registered pass, sorted by name."""
    return [info for _, info in sorted(_PASSES.items())]


def pipelines() -> dict[str, tuple[str, ...]]:
    """The registered named pipelines, in registration order."""
    return dict(_PIPELINES)


def resolve_pipeline(text: str) -> list[str]:
    """A comma-separated list of pass names and pipeline names (expanded in place): `default`,
    `none`, `fold_bn,eliminate_dead_code`, `default,align_channels`."""
    if not _PASSES:
        raise ArchcError(NO_CATALOGUE)
    names: list[str] = []
    for name in (part.strip() for part in text.split(",")):
        if name in _PIPELINES:
            names += resolve_pipeline(",".join(_PIPELINES[name])) if _PIPELINES[name] else []
        elif name in _PASSES:
            names.append(name)
        else:
            raise ArchcError(f"{_unknown('pass', name, _PASSES)}; pipelines: "
                             f"{', '.join(_PIPELINES)}")
    return names


def check_options(options: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """`options` ("pass.option" -> value) coerced to the declared types; `ArchcError` for an
    unknown pass or option (with a suggestion), a wrong type or value, or a pass that is not in
    `names` (the pipeline)."""
    checked = {}
    for key, value in options.items():
        pass_name, _, option_name = key.partition(".")
        info = get_pass(pass_name)
        declared = {o.name: o for o in info.options}
        if option_name not in declared:
            valid = f"its options: {', '.join(declared)}" if declared else "it has no options"
            hint = did_you_mean(option_name, declared)
            raise ArchcError(f"pass option {key}: {pass_name} has no option "
                             f"{option_name!r}{hint}; {valid}")
        try:
            checked[key] = declared[option_name].coerce(value)
        except ValueError as exc:
            raise ArchcError(f"pass option {key}: {exc}") from None
        if pass_name not in names:
            raise ArchcError(f"pass option {key}: pass {pass_name!r} is not in the pipeline "
                             f"({', '.join(names) or 'none'})")
    return checked


def _unknown(kind: str, name: str, valid: Iterable[str]) -> str:
    valid = sorted(valid)
    return f"unknown {kind} {name!r}{did_you_mean(name, valid)}; valid: {', '.join(valid)}"


@dataclass
class PipelineResult:
    graph_module: GraphModule
    reports: list[PassReport]
    max_error: float | None  # relative error of the result against the input model, if verified
    explain: bool = False
    exactness: str = ""  # how the passes were checked: "float64", or the model's dtype and why
    artifact_error: float | None = None  # the result in the model's dtype vs float64
    noise: float | None = None  # the input model in its own dtype vs float64
    tolerance: float | None = None  # what artifact_error was allowed

    @property
    def modified(self) -> bool:
        return any(r.modified for r in self.reports)

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.reports)

    @property
    def verify_seconds(self) -> float:
        return sum(r.verify_seconds for r in self.reports)

    @property
    def fired(self) -> Counter[str]:
        """How often each rule rewrote, over every pass."""
        return sum((r.fired for r in self.reports), Counter())

    def format(self, explain: bool | None = None) -> str:
        explain = self.explain if explain is None else explain
        head = (f"{'pass':<24} {'mod':<4} {'nodes':<13} {'params':<17} {'flops':<17} "
                f"{'time':>11}  check")
        lines = [head]
        for report in self.reports:
            lines.append(report.row())
            lines += report.details(explain)
        lines += self.summary()
        return "\n".join(lines)

    def summary(self) -> list[str]:
        """The verification figures, one line each."""
        lines = []
        if self.max_error is not None:
            lines.append(f"pipeline: rel err {self.max_error:.1e} in {self.exactness} against "
                         f"the input model")
        if self.artifact_error is not None:
            noise = "" if self.noise is None else (
                f"; the input model's own rounding: {self.noise:.1e}")
            lines.append(f"result in the model's dtype: rel err {self.artifact_error:.1e} "
                         f"against float64{noise} (tolerance {self.tolerance:.1e})")
        return lines

    __str__ = format


@dataclass
class _Baseline:
    """What verification compares against: the inputs in the working dtype and the outputs of
    the graph before the next pass."""

    inputs: tuple[Tensor, ...]
    outputs: list[Tensor]
    rtol: float


def run_pipeline(model: nn.Module, names: list[str], ctx: PassContext | None = None
                 ) -> PipelineResult:
    """Run the named passes in order on a copy of `model` (traced if not a GraphModule)."""
    ctx = ctx or PassContext()
    infos = [get_pass(name) for name in names]
    check_options(ctx.options, names)
    dumped = set() if ctx.dump_after in (None, "all") else set(ctx.dump_after)
    unknown = sorted(dumped - set(names))
    if unknown:
        raise ArchcError(_unknown("pass in dump_after", unknown[0], names))
    if ctx.dump_after and ctx.dump_dir is None:
        raise ArchcError("dump_after needs a dump_dir")
    inputs = ctx.inputs(model)
    if ctx.verify and inputs is None:
        raise PassError("verification needs example_inputs or input_shape (or verify=False)")
    dtype = model_dtype(model)
    gm, baseline, exactness = _working_copy(model, inputs, ctx, dtype)
    gm.meta[SOURCE_DTYPE] = dtype
    if exactness != "float64":  # else the float64 reference run recorded the shapes
        propagate_shapes(gm, baseline.inputs if baseline else inputs)
    stats = graph_stats(gm, ctx.measure)
    reports: list[PassReport] = []
    exact = True  # every pass that changed the graph preserves the function
    original = baseline.outputs if baseline else None
    pipeline_tolerance = baseline.rtol if baseline else 0.0
    for index, info in enumerate(infos, start=1):
        preceding = tuple(names[:index - 1])
        if ctx.progress is not None:
            ctx.progress(f"pass {index}/{len(infos)}: {info.name}")
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
        after = graph_stats(gm, ctx.measure) if result.modified else stats
        report = replace(report, before=stats, after=after,
                         check=_check_text(result, info, ctx, exactness))
        stats = after
        exact = exact and (info.preserves_function or not result.modified)
        if result.modified and baseline is not None:
            start = time.perf_counter()
            outputs = verify.outputs(gm, baseline.inputs)
            if info.preserves_function:
                report.error = verify.relative_error(baseline.outputs, outputs)
                tolerance = _pass_tolerance(baseline.rtol, report)
                _require_close(report.error, tolerance, info.name, preceding)
                pipeline_tolerance = max(pipeline_tolerance, tolerance)
            baseline.outputs = outputs
            report.verify_seconds = time.perf_counter() - start
        reports.append(report)
        if ctx.dump_after == "all" or (ctx.dump_after and info.name in ctx.dump_after):
            Path(ctx.dump_dir).mkdir(parents=True, exist_ok=True)
            (Path(ctx.dump_dir) / f"{index:02d}_{info.name}.py").write_text(
                dump_source(gm, index, info.name))
    result = PipelineResult(gm, reports, None, ctx.explain, exactness)
    if baseline is not None and exact:
        result.max_error = verify.relative_error(original, baseline.outputs)
        _require_close(result.max_error, pipeline_tolerance, "", tuple(names))
    if model_dtype(gm) != dtype:
        result.graph_module = _cast_back(gm, dtype, inputs)
    if baseline is not None and exact and exactness == "float64":
        _judge_artifact(result, model, inputs, original, ctx.rtol, tuple(names))
    return result


def dump_source(gm: GraphModule, index: int, pass_name: str) -> str:
    """The graph after pass `index` (`pass_name`) as a runnable Python file: a header importing
    every global name torch.fx's code uses (`torch`, `_Tensor_`, the functions it calls), and a
    module class `GraphAfter<Pass>` whose `forward` is the graph's code. The class holds no
    submodules or weights: its forward runs bound to the graph module of that point,
    `GraphAfter<Pass>.forward(graph_module, x)`."""
    code = gm.graph.python_code(root_module="self")
    class_name = "GraphAfter" + "".join(part.capitalize() for part in pass_name.split("_"))
    imports = ["import torch"]
    imports += [_global_source(name, value) for name, value in code.globals.items()
                if not (name == "torch" and value is torch)]
    header = (f'"""The graph after pass {index} ({pass_name}), as torch.fx code.\n\n'
              f"`{class_name}.forward` is the graph; it calls the submodules and reads the\n"
              f"tensors of the graph module it is bound to (this file holds no weights):\n"
              f"`{class_name}.forward(graph_module, x)` runs it.\n" + '"""\n\n')
    forward = "\n".join(f"    {line}" if line.strip() else "" for line in
                        code.src.strip("\n").splitlines())
    return (header + "\n".join(imports) + f"\n\n\nclass {class_name}(torch.nn.Module):\n"
            + forward.rstrip() + "\n")


def _global_source(name: str, value: Any) -> str:
    """A line that binds `name` to `value`, one of the globals of torch.fx's generated code: a
    module import, an import of a named function or class, or a literal (`inf`, the string of a
    postponed annotation such as `_Tensor_ = 'Tensor'`)."""
    import math
    import types

    if isinstance(value, types.ModuleType):
        return f"import {value.__name__} as {name}"
    if value is type(None):
        return f"{name} = type(None)"
    if isinstance(value, float) and not math.isfinite(value):
        return f"{name} = float({str(value)!r})"
    if isinstance(value, (str, int, float, bool)) or value is None:
        return f"{name} = {value!r}"
    module, qualname = getattr(value, "__module__", None), getattr(value, "__qualname__", "")
    if module and qualname.isidentifier():
        return f"from {module} import {qualname} as {name}"
    if module and qualname and "<" not in qualname:
        return f"import {module}\n{name} = {module}.{qualname}"
    return f"{name} = None  # {value!r} has no source form: this file does not run"


def _working_copy(model: nn.Module, inputs: tuple[Tensor, ...] | None, ctx: PassContext,
                  dtype: torch.dtype) -> tuple[GraphModule, _Baseline | None, str]:
    """The graph the passes rewrite, the verification baseline and how exactness is judged."""
    traced = _traced(copy_module(model))  # tracing stores constants on the module it traces
    if not ctx.verify:
        return traced, None, ""
    floating = {t.dtype for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()}
    why = "its tensors have several floating dtypes" if len(floating) > 1 else None
    if why is None:
        found = verify.float64_reference(traced, inputs)
        if isinstance(found, str):
            why = f"it does not run in float64 ({found})"
        else:
            copy, outputs = found
            return copy, _Baseline(verify.in_float64(inputs), outputs, verify.FLOAT64_RTOL), \
                "float64"
    baseline = _Baseline(inputs, verify.outputs(traced, inputs), ctx.rtol)
    return traced, baseline, f"{str(dtype).removeprefix('torch.')} ({why})"


def _traced(model: nn.Module) -> GraphModule:
    return model if isinstance(model, GraphModule) else torch.fx.symbolic_trace(model)


def _cast_back(gm: GraphModule, dtype: torch.dtype, inputs: tuple[Tensor, ...] | None
               ) -> GraphModule:
    """The float64 working graph in the model's dtype, shapes recorded for its inputs (the
    working graph's, retyped, where it has them all)."""
    cast = copy_module(gm, dtype)
    if not cast_shapes(cast, dtype):
        propagate_shapes(cast, inputs)
    return cast


def _judge_artifact(result: PipelineResult, model: nn.Module, inputs: tuple[Tensor, ...],
                    reference: list[Tensor], rtol: float, names: tuple[str, ...]) -> None:
    """The result in the model's dtype against the float64 reference, allowed the input model's
    own rounding (`archc.ir.verify`)."""
    result.noise = verify.relative_error(reference, verify.outputs(model, inputs))
    result.artifact_error = verify.relative_error(
        reference, verify.outputs(result.graph_module, inputs))
    result.tolerance = verify.artifact_tolerance(rtol, result.noise)
    if not result.artifact_error <= result.tolerance:
        raise PassError(
            f"the result in the model's dtype differs from the float64 reference by relative "
            f"error {result.artifact_error:.3g} > {result.tolerance:.3g} (rtol {rtol:g}, the "
            f"input model's own rounding {result.noise:.3g})", "", names)


def _pass_tolerance(rtol: float, report: PassReport) -> float:
    """`rtol`, or the rounding of the model's constants for a pass exact only up to it."""
    if report.rounded_in is None:
        return rtol
    return max(rtol, verify.rounding_tolerance(report.rounded_in))


def _check_text(result: PassResult, info: PassInfo, ctx: PassContext, exactness: str) -> str:
    if not result.modified:
        return "unchanged"
    if not info.preserves_function:
        return "not verified: changes the function"
    if not ctx.verify:
        return "not verified: verify off"
    rounded = result.report.rounded_in
    suffix = (f" up to {str(rounded).removeprefix('torch.')} rounding of the model's constants"
              if rounded is not None else "")
    return f"verified in {exactness.split(' ')[0]}{suffix}"


def _require_close(error: float, rtol: float, pass_name: str, preceding: tuple[str, ...]) -> None:
    if not error <= rtol:  # also catches NaN
        raise PassError(f"output changed: relative error {error:.3g} > rtol {rtol:g}",
                        pass_name, preceding)


def graph_stats(gm: GraphModule, measure: Measure | None = None) -> GraphStats:
    """Nodes, op histogram (placeholders and outputs excluded), parameter count and FLOPs."""
    ops = Counter(op_kind(gm, n) for n in gm.graph.nodes if n.op not in ("placeholder", "output"))
    params = sum(p.numel() for p in gm.parameters())
    flops = measure(gm) if measure is not None else None
    return GraphStats(len(gm.graph.nodes), ops, params, flops)


def _arrow(before: int, after: int, fmt: Callable[[int], str]) -> str:
    return fmt(before) if before == after else f"{fmt(before)}->{fmt(after)}"


def _si(n: int, reference: int | None = None) -> str:
    """`n` in the unit (k, M, G) of `reference` (default `n`), so a before->after pair shares it."""
    size = abs(n if reference is None else max(abs(n), abs(reference)))
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if size >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _si_arrow(before: int, after: int) -> str:
    return _arrow(before, after, lambda n: _si(n, max(abs(before), abs(after))))


def _ops_diff(before: Counter[str], after: Counter[str]) -> str:
    changed = sorted(k for k in before.keys() | after.keys() if before[k] != after[k])
    return ", ".join(f"{k} {before[k]}->{after[k]}" for k in changed)
