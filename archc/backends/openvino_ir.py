"""OpenVINO IR (`.xml` + `.bin`): converted by OpenVINO's own converter from the ONNX archc writes,
run in OpenVINO's CPU plugin against the float64 reference, both files written atomically.

Conversion. The deploy graph goes to ONNX as for `.onnx` (`export.onnx_bytes`: archc's direct
translation, else torch's exporter), with the same dynamic batch dimension; `openvino.convert_model`
reads those bytes, and `openvino.save_model(..., compress_to_fp16=False)` writes the IR. The
weights stay float32: save_model's default fp16 compression would change every weight by fp16
rounding before a precision was ever chosen.

Precision. The CPU plugin picks its inference precision itself (bf16 on CPUs with native bf16,
f32 elsewhere), so archc always sets `INFERENCE_PRECISION_HINT`: f32 unless `--dtype` asks for
bf16 or f16, and reads back the precision the compiled model uses (a CPU without native f16 runs
an f16 request in bf16). The model read back from the bytes written is run on the example input
and, with a dynamic batch, a batch of another size, and its relative error from the float64 model
(`archc.ir.verify`) is held to the tolerance of the precision used: the artifact tolerance (the
model's own float32 rounding) for f32, `export.dtype_tolerance` (10 units of the format's
rounding, as `--dtype` is judged for the other formats) for bf16 and f16.
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.fx import GraphModule

from archc.backends.export import (
    DEFAULT_OPSET,
    DEPLOY_DTYPES,
    EmitReport,
    dtype_tolerance,
    onnx_bytes,
    verify_emitted,
)
from archc.common.extras import missing_extra
from archc.common.fileio import atomic_output
from archc.errors import ExportError, first_line
from archc.ir.verify import float64_function

EXTRA = "openvino"
# archc's --dtype names -> OpenVINO's element types for INFERENCE_PRECISION_HINT, and back
HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
DTYPES = {hint: name for name, hint in HINTS.items()}


def require(purpose: str = "writing OpenVINO IR (.xml)"):
    """The `openvino` module; `ExportError` naming the extra if it is not installed."""
    problem = missing_extra("openvino", EXTRA, purpose)
    if problem:
        raise ExportError(problem)
    import openvino

    return openvino


def compile_cpu(model, dtype: str = "fp32", threads: int | None = None):
    """`model` (an `openvino.Model`) compiled for the CPU plugin at the inference precision of
    `dtype` ("fp32", "bf16", "fp16"), one stream; returns (compiled model, the precision it uses,
    as an archc dtype name read back from the compiled model)."""
    openvino = require()
    import openvino.properties as properties
    import openvino.properties.hint as hints

    config = {hints.inference_precision: HINTS[dtype], properties.num_streams: 1}
    if threads is not None:
        config[properties.inference_num_threads] = threads
    compiled = openvino.Core().compile_model(model, "CPU", config)
    used = compiled.get_property(hints.inference_precision).get_type_name()
    return compiled, DTYPES.get(used, used)


def runner(compiled) -> Callable[[torch.Tensor], torch.Tensor]:
    """A compiled single-input model as a function of a float32 torch batch."""
    request = compiled.create_infer_request()

    def run(x: torch.Tensor) -> torch.Tensor:
        results = request.infer([np.ascontiguousarray(x.detach().float().numpy())])
        return torch.from_numpy(np.array(results[compiled.output(0)]))

    return run


def read_ir(xml: bytes, weights: bytes):
    """An `openvino.Model` from the bytes of an .xml and its .bin."""
    openvino = require()
    tensor = openvino.Tensor(np.frombuffer(weights, dtype=np.uint8).copy())
    return openvino.Core().read_model(xml.decode(), tensor)


def precision_tolerance(used: str, rtol: float) -> float:
    """What a run at OpenVINO's precision `used` may differ from float64 by: `rtol` (the artifact
    tolerance) at f32, `export.dtype_tolerance` at bf16 and f16."""
    return dtype_tolerance(DEPLOY_DTYPES.get(used, torch.float32), rtol)


def export_openvino(
    gm: GraphModule,
    path: str | Path,
    example_input: torch.Tensor,
    *,
    dtype: str = "fp32",
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = False,
    simplify: bool = True,
    exporter: str = "auto",
    rtol: float = 1e-5,
) -> EmitReport:
    """Write `path` (.xml) and the .bin beside it, verified in OpenVINO's CPU plugin at the
    precision `dtype` asks for (module docstring). Returns the report; its `precision` is the
    precision OpenVINO used."""
    openvino = require()
    path = Path(path)
    report = EmitReport(path, "openvino")
    gm = gm.eval()
    data = onnx_bytes(gm, example_input, report, opset=opset, dynamic_batch=dynamic_batch,
                      simplify=simplify, exporter=exporter)
    try:
        model = openvino.convert_model(io.BytesIO(data))
    except Exception as exc:  # the converter raises its own and generic types
        raise ExportError(f"OpenVINO could not convert the ONNX model: {first_line(exc)}"
                          ) from None
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as folder:
        written = Path(folder) / "model.xml"
        openvino.save_model(model, written, compress_to_fp16=False)
        xml = written.read_bytes()
        weights = written.with_suffix(".bin").read_bytes()
    compiled, used = compile_cpu(read_ir(xml, weights), dtype)
    report.precision = used
    reference, reference_name = float64_function(gm, example_input)
    report.verified_with, report.reference = f"OpenVINO CPU ({used})", reference_name
    tolerance = precision_tolerance(used, rtol)
    verify_emitted(report, reference, runner(compiled), example_input, dynamic_batch, tolerance)
    report.notes.append(f"OpenVINO {openvino.get_version().split('-')[0]} CPU inference "
                        f"precision {used}" + (f" (asked {dtype})" if used != dtype else ""))
    with atomic_output(path.with_suffix(".bin")) as bin_temporary, \
            atomic_output(path) as xml_temporary:
        bin_temporary.write_bytes(weights)
        xml_temporary.write_bytes(xml)
    report.bytes = len(xml) + len(weights)
    return report
