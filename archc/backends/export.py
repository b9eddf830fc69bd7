"""Emitters: ONNX and torch.export (.pt2), verified, written atomically; the deploy dtype/layout.

Every emit is checked against the eager graph it came from on a random input: the ONNX file in ONNX
Runtime with graph optimizations disabled (so the file itself is checked, not ORT's rewrite of it),
`.pt2` by reloading it from the bytes written (`archc.backends.checkpoint` and
`archc.backends.emit_python` check theirs the same way, with `verify_emitted`). Relative error is
`max|y - y_ref| / max|y_ref|` (`archc.ir.verify`); above the tolerance the emit fails and nothing is
written.

ONNX path: archc's own node-by-node translation of the graph (`archc.backends.onnx_direct`: fast,
and the deploy graph's names kept) or, for a graph outside its vocabulary,
`torch.onnx.export(dynamo=True, optimize=True, external_data=False)` followed by onnx-simplifier
(kept only if its own numeric check passes), at a pinned opset; then the ONNX Runtime parity run.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import types
import typing
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.fx import GraphModule

from archc.common.fileio import atomic_output
from archc.errors import ExportError, first_line
from archc.ir.graph import copy_module
from archc.ir.verify import (
    artifact_tolerance,
    below_normal,
    max_abs_error,
    outputs,
    relative_error,
    rounding_noise,
)

DEFAULT_OPSET = 18
ONNX_EXPORTERS = ("auto", "archc", "torch")


@dataclass
class EmitReport:
    path: Path
    format: str
    bytes: int = 0
    verified_with: str = ""
    reference: str = "eager PyTorch"  # what the output was compared with
    max_abs_error: float = float("nan")
    relative_error: float = float("nan")
    rtol: float = 1e-5  # the tolerance it was verified at
    precision: str = ""  # the precision the runtime ran it at, where the runtime chooses (OpenVINO)
    notes: list[str] = field(default_factory=list)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence exporter chatter (progress prints, torchvision-missing warnings)."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


class _SchemaHints(types.ModuleType):
    """The `typing` module as torch's program deserializer sees it during `load_program`, with
    `get_type_hints` computed once per (class, namespaces): the deserializer asks for the hints of
    its schema dataclasses once per serialized object (10,000 times for a ResNet-50, a third of a
    load's time), and a class's hints in a fixed namespace do not change."""

    def __init__(self) -> None:
        super().__init__("typing")
        self._hints: dict[tuple, tuple] = {}  # key -> (hints, the namespaces the ids name)

    def __getattr__(self, name: str):
        return getattr(typing, name)

    def get_type_hints(self, obj, globalns=None, localns=None, include_extras=False):
        key = (obj, id(globalns), id(localns), include_extras)
        if key not in self._hints:  # holding the namespaces keeps their ids from being reused
            hints = typing.get_type_hints(obj, globalns, localns, include_extras)
            self._hints[key] = (hints, globalns, localns)
        return self._hints[key][0]


def load_program(source, extra_files: dict[str, str] | None = None):
    """`torch.export.load(source, extra_files=...)`, with the deserializer's type hints cached
    (`_SchemaHints`) for the load; where torch's serializer module has no `typing` global (another
    torch version), a plain load. A load that starts in another thread meanwhile finds the cache
    in place, uses it (the same hints) and leaves it to this one to undo."""
    from torch._export.serde import serialize

    if getattr(serialize, "typing", None) is not typing:
        return torch.export.load(source, extra_files=extra_files)
    serialize.typing = _SchemaHints()
    try:
        return torch.export.load(source, extra_files=extra_files)
    finally:
        serialize.typing = typing


def _trace_input(example_input: torch.Tensor, dynamic_batch: bool) -> torch.Tensor:
    """With a dynamic batch, trace at batch >= 2: torch.export specializes a batch of 1."""
    if dynamic_batch and example_input.shape[0] == 1:
        return torch.cat([example_input, example_input.flip(-1)], 0)
    return example_input


def _check_inputs(example_input: torch.Tensor, dynamic_batch: bool) -> list[torch.Tensor]:
    """The example input, and with a dynamic batch also a batch of another size."""
    if not dynamic_batch:
        return [example_input]
    return [example_input, torch.cat([example_input, example_input.flip(-1), example_input], 0)]


def verify_emitted(report: EmitReport, gm, run, example_input: torch.Tensor,
                   dynamic_batch: bool, rtol: float) -> None:
    """Compare `run(x)` with eager `gm(x)` on every check input; keep the worst error."""
    worst = (0.0, 0.0)
    for x in _check_inputs(example_input, dynamic_batch):
        with torch.no_grad():
            check_output(report, gm(x), run(x), rtol)
        worst = max(worst, (report.relative_error, report.max_abs_error))
    report.relative_error, report.max_abs_error = worst
    if dynamic_batch:
        sizes = [x.shape[0] for x in _check_inputs(example_input, dynamic_batch)]
        report.notes.append(f"dynamic batch checked at {sizes[0]} and {sizes[1]}")


def _input_name(gm: GraphModule) -> str:
    placeholders = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise ExportError(f"expected a graph with one input, found {len(placeholders)}")
    return str(placeholders[0])


def check_output(report: EmitReport, reference: torch.Tensor, output: torch.Tensor,
                 rtol: float) -> None:
    """Record the emitted artifact's error on one input in `report`; `ExportError` if it is not
    within `rtol` or the output shape differs."""
    if tuple(output.shape) != tuple(reference.shape):
        raise ExportError(
            f"{report.verified_with}: output shape {tuple(output.shape)} "
            f"!= eager {tuple(reference.shape)}"
        )
    report.rtol = rtol
    report.max_abs_error = max_abs_error(reference, output)
    report.relative_error = relative_error(reference, output)
    if not report.relative_error <= rtol:
        raise ExportError(
            f"{report.verified_with} output differs from eager PyTorch: relative error "
            f"{report.relative_error:.3g} > tolerance {rtol:g}"
        )


def export_onnx(
    gm: GraphModule,
    path: str | Path,
    example_input: torch.Tensor,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = False,
    simplify: bool = True,
    rtol: float = 1e-5,
    exporter: str = "auto",
) -> EmitReport:
    """Export to a single-file ONNX model, verified in ONNX Runtime. Returns the report.

    `exporter`: "archc" translates the graph node by node (`archc.backends.onnx_direct`), "torch"
    uses `torch.onnx.export`, "auto" the first and, for a graph outside its vocabulary, the
    second."""
    report = EmitReport(Path(path), "onnx", verified_with="onnxruntime (graph optimizations off)")
    gm = gm.eval()
    data = onnx_bytes(gm, example_input, report, opset=opset, dynamic_batch=dynamic_batch,
                      simplify=simplify, exporter=exporter)
    session = _onnxruntime_session(data)
    verify_emitted(report, gm, session, example_input, dynamic_batch, rtol)
    with atomic_output(report.path) as temporary:
        temporary.write_bytes(data)
    report.bytes = len(data)
    return report


def onnx_bytes(gm: GraphModule, example_input: torch.Tensor, report: EmitReport, *, opset: int,
               dynamic_batch: bool, simplify: bool, exporter: str) -> bytes:
    """The graph as a checked single-file ONNX model (not yet run); the exporter used and the
    simplifier's effect are noted in `report`. `exporter`: see `export_onnx`."""
    import onnx

    from archc.backends.onnx_direct import Untranslatable, translate

    if exporter not in ONNX_EXPORTERS:
        raise ExportError(f"unknown ONNX exporter {exporter!r}; one of {', '.join(ONNX_EXPORTERS)}")
    model = None
    if exporter != "torch":
        try:
            model = translate(gm, example_input, opset=opset, dynamic_batch=dynamic_batch)
            report.notes.append("exporter: archc's direct translation")
        except Untranslatable as exc:
            if exporter == "archc":
                raise ExportError(f"no direct ONNX translation: {exc}") from None
            report.notes.append(f"exporter: torch.onnx (no direct translation: {exc})")
    if model is None:
        model = _torch_onnx_export(gm, example_input, opset, dynamic_batch)
        if simplify:  # archc's translation leaves nothing to fold: constants are constants
            model = _simplify(model, report)
    data = model.SerializeToString()
    onnx.checker.check_model(data)  # the bytes: a model would be serialized once more
    return data


def _torch_onnx_export(gm: GraphModule, example_input: torch.Tensor, opset: int,
                       dynamic_batch: bool):
    dynamic_shapes = {_input_name(gm): {0: torch.export.Dim("batch")}} if dynamic_batch else None
    try:
        with quiet(), torch.no_grad():
            program = torch.onnx.export(
                gm,
                (_trace_input(example_input, dynamic_batch),),
                dynamo=True,
                optimize=True,
                external_data=False,
                opset_version=opset,
                input_names=["input"],
                output_names=["output"],
                dynamic_shapes=dynamic_shapes,
                verbose=False,
            )
    except Exception as exc:  # the exporter raises many unrelated types
        raise ExportError(
            f"ONNX export failed: {type(exc).__name__}: {str(exc).splitlines()[0]}"
        ) from exc
    return program.model_proto


def _simplify(model, report: EmitReport):
    import onnxsim

    try:
        with quiet():
            simplified, ok = onnxsim.simplify(model, check_n=2)
    except Exception as exc:  # onnxsim failures must not lose a valid export
        report.notes.append(f"onnx-simplifier skipped: {type(exc).__name__}")
        return model
    if not ok:
        report.notes.append("onnx-simplifier result failed its check; kept the exporter's graph")
        return model
    before, after = len(model.graph.node), len(simplified.graph.node)
    report.notes.append(f"onnx-simplifier: {before} -> {after} nodes")
    return simplified


def _onnxruntime_session(model_bytes: bytes):
    """A callable running the model in ONNX Runtime (CPU, graph optimizations disabled)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        (output,) = session.run(None, {name: x.numpy()})
        return torch.from_numpy(output)

    return run


def export_program(
    gm: GraphModule,
    path: str | Path,
    example_input: torch.Tensor,
    *,
    dynamic_batch: bool = False,
    rtol: float = 1e-5,
    spec: dict | None = None,
) -> EmitReport:
    """torch.export to a `.pt2` archive, reloaded and verified. `spec`, archc's spec of a model
    whose parameters and buffers the program holds under the spec model's own names, is stored in
    the archive (`SPEC_FILE`, read back by `program_spec`)."""
    report = EmitReport(Path(path), "pt2", verified_with="torch.export.load")
    dynamic_shapes = {_input_name(gm): {0: torch.export.Dim("batch")}} if dynamic_batch else None
    try:
        with quiet():
            program = torch.export.export(
                gm.eval(),
                (_trace_input(example_input, dynamic_batch),),
                dynamic_shapes=dynamic_shapes,
            )
    except Exception as exc:
        raise ExportError(
            f"torch.export failed: {type(exc).__name__}: {str(exc).splitlines()[0]}"
        ) from exc
    buffer = io.BytesIO()
    extra = {SPEC_FILE: json.dumps(spec, sort_keys=True)} if spec is not None else None
    torch.export.save(program, buffer, extra_files=extra)
    data = buffer.getvalue()
    reloaded = load_program(io.BytesIO(data)).module()
    verify_emitted(report, gm, reloaded, example_input, dynamic_batch, rtol)
    with atomic_output(report.path) as temporary:
        temporary.write_bytes(data)
    report.bytes = len(data)
    return report


SPEC_FILE = "archc_spec.json"  # the extra file of a program written from a spec model


def program_spec(path: str | Path) -> dict | None:
    """The spec `export_program` stored in the `.pt2` at `path`, or None if it holds none."""
    extra = {SPEC_FILE: ""}
    try:
        with quiet():
            load_program(str(path), extra)
    except Exception as exc:
        raise ExportError(f"{path}: not a torch.export program ({first_line(exc)})") from None
    text = extra[SPEC_FILE]
    if not text:
        return None
    try:
        spec = json.loads(text)
    except ValueError as exc:
        raise ExportError(f"{path}: its {SPEC_FILE} is not JSON ({exc})") from None
    if not isinstance(spec, dict):
        raise ExportError(f"{path}: its {SPEC_FILE} holds a {type(spec).__name__}, not a spec")
    return spec


def same_weights(program_gm: torch.nn.Module, spec_model: torch.nn.Module) -> bool:
    """Whether `program_gm` holds float32 weights under exactly the names of `spec_model` (no pass
    folded or renamed any), so that the spec of `spec_model` describes the program too."""
    state = program_gm.state_dict()
    return state.keys() == spec_model.state_dict().keys() and all(
        value.dtype == torch.float32 for value in state.values() if value.is_floating_point())


DEPLOY_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def dtype_tolerance(dtype: torch.dtype, rtol: float) -> float:
    """Relative tolerance of a model run in `dtype`: `rtol` for float32 and wider, else 10 units
    of the format's rounding (fp16 ~1e-2, bf16 ~8e-2)."""
    if dtype in (torch.float32, torch.float64):
        return rtol
    return max(rtol, 10 * torch.finfo(dtype).eps)


@dataclass
class DeployForm:
    graph_module: GraphModule
    example_input: torch.Tensor
    rtol: float  # tolerance for checks of this form
    cast_error: float = 0.0  # relative error of the cast/layout change against float32
    notes: list[str] = field(default_factory=list)


def deploy_form(
    gm: GraphModule,
    example_input: torch.Tensor,
    *,
    dtype: str = "fp32",
    channels_last: bool = False,
    rtol: float = 1e-5,
    source: torch.nn.Module | None = None,
) -> DeployForm:
    """Cast a (folded, float32) graph to the deploy dtype and memory format, checked against it.

    Weights are folded in float64/float32 by the passes first, then cast: folding in half
    precision loses accuracy (`docs/rewrites.md`, R1). A reduced-precision form is allowed the
    rounding the model suffers in that format by itself (`archc.ir.verify`): `source`, the model
    before the passes (default `gm`), cast to the format, against `source` in float32."""
    import copy

    target = DEPLOY_DTYPES[dtype]
    if target == torch.float32 and not channels_last:
        return DeployForm(gm, example_input, rtol)
    tolerance = dtype_tolerance(target, rtol)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    cast = copy.deepcopy(gm).to(target).to(memory_format=memory_format).eval()
    x = example_input.to(dtype=target, memory_format=memory_format)
    reference = outputs(gm, (example_input,))
    own = ""
    if target != torch.float32:
        source = gm if source is None else source
        source_reference = reference if source is gm else outputs(source, (example_input,))
        noise = rounding_noise(copy_module(source, target), (example_input.to(target),),
                               source_reference)
        tolerance = artifact_tolerance(tolerance, noise)
        why = below_normal(source_reference, target)
        own = f"; the model's own {dtype} rounding: {noise:.1e}" + (f"; {why}" if why else "")
    form = DeployForm(cast, x, tolerance)
    form.cast_error = relative_error(reference, outputs(cast, (x,)))
    if not form.cast_error <= tolerance:
        raise ExportError(
            f"the {dtype} model differs from float32 by relative error "
            f"{form.cast_error:.3g} > tolerance {tolerance:.3g}{own}"
        )
    form.notes.append(
        f"{dtype}{', channels_last' if channels_last else ''}: relative error "
        f"{form.cast_error:.2e} against float32 (tolerance {tolerance:.3g}{own})"
    )
    return form
