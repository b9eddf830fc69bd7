"""ExecuTorch programs (`.pte`) lowered to the XNNPACK backend, run in ExecuTorch's runtime bindings
against the float64 reference, written atomically.

Lowering: `torch.export` of the deploy graph at the example input's shape, then
`executorch.exir.to_edge_transform_and_lower` with the `XnnpackPartitioner` (XNNPACK's CPU kernels
take every op they support; the rest stay portable ExecuTorch ops) and `to_executorch()`.
ExecuTorch plans its memory ahead for the largest shapes a program takes, so a dynamic batch
has an upper bound (`batch_bound`: 8, or three times the example's batch), and the program is
checked at the example's batch, three times it and the bound (measured: a bound of 16 declared
to `torch.export` ran only up to 15 in ExecuTorch 1.5.1, so the bound is run, not assumed); with
a static batch, at the example's batch only. int8 programs (`calibration`) have a static
batch. The program's bytes are loaded by `executorch.runtime.Runtime`, run on those inputs, and
held at fp32 to the artifact tolerance (`archc.ir.verify`: `--rtol`, or ten times the model's
own float32 rounding) against the float64 model.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.fx import GraphModule

from archc.backends.export import EmitReport, verify_emitted
from archc.common.extras import missing_extra
from archc.common.fileio import atomic_output
from archc.errors import ExportError, first_line
from archc.ir.verify import float64_function

EXTRA = "executorch"
MAX_BATCH = 8  # upper bound of a dynamic batch (`batch_bound`); memory is planned for it


def require(purpose: str = "writing ExecuTorch programs (.pte)") -> None:
    """`ExportError` naming the extra if ExecuTorch is not installed."""
    problem = missing_extra("executorch", EXTRA, purpose)
    if problem:
        raise ExportError(problem)


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """ExecuTorch's C++ runtime logs CPU probing on file descriptor 2 when it loads; Python
    exceptions still carry any failure."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def canonical(x: torch.Tensor) -> torch.Tensor:
    """`x` with the row-major strides of its shape. A tensor whose size-1 dimensions carry other
    strides (one transposed from NHWC with one channel) still counts as contiguous in torch, but
    ExecuTorch reads a dim order from the strides: exported so, the program gains strided copies;
    run so, XNNPACK rejects the input's shape."""
    expected, step = [], 1
    for size in reversed(x.shape):
        expected.insert(0, step)
        step *= size
    if list(x.stride()) == expected:
        return x
    return torch.empty(x.shape, dtype=x.dtype).copy_(x)


def calibration_batches(x: torch.Tensor, batch: int) -> list[torch.Tensor]:
    """`x` in chunks of exactly `batch` (the program's static batch); a short last chunk is filled
    with the first images again, so that no padding enters the calibrated ranges."""
    if len(x) % batch:
        x = torch.cat([x, x.repeat(batch // len(x) + 1, 1, 1, 1)[:batch - len(x) % batch]])
    return [canonical(chunk) for chunk in x.split(batch)]


def _quantized(exported, example_input: torch.Tensor, calibration: torch.Tensor,
               per_channel: bool):
    """The exported program quantized to int8 by XNNPACK's quantizer (pt2e): symmetric int8
    weights per output channel (or per tensor), int8 activations calibrated on `calibration`
    (min/max observers), re-exported for lowering."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = XNNPACKQuantizer()
    quantizer.set_global(get_symmetric_quantization_config(is_per_channel=per_channel))
    prepared = prepare_pt2e(exported.module(), quantizer)
    for chunk in calibration_batches(calibration, example_input.shape[0]):
        prepared(chunk)
    converted = convert_pt2e(prepared)
    return torch.export.export(converted, (example_input,))


def batch_bound(example_input: torch.Tensor) -> int:
    """The largest batch a dynamic-batch program takes: `MAX_BATCH`, or three times the example's
    batch where that is larger (the batch the check runs besides the example's)."""
    return max(MAX_BATCH, 3 * example_input.shape[0])


def program_bytes(gm: GraphModule, example_input: torch.Tensor,
                  calibration: torch.Tensor | None = None, per_channel: bool = True,
                  max_batch: int | None = None) -> tuple[bytes, int, int]:
    """The graph lowered to XNNPACK as `.pte` bytes, with how many of its compute nodes XNNPACK
    took (delegate calls) and how many stayed portable ops. With `calibration` (images), int8
    through XNNPACK's quantizer first (`_quantized`; static batch). With `max_batch`, the batch
    dimension is dynamic from 1 to `max_batch`."""
    require()
    from archc.backends.export import _trace_input, quiet

    dynamic = None
    if max_batch is not None:
        dynamic = ({0: torch.export.Dim("batch", min=1, max=max_batch)},)
        example_input = _trace_input(example_input, True)

    try:
        with quiet(), _native_stderr_silenced(), torch.no_grad():
            # torchao (imported by the lowering) reports its optional CUDA kernels on stderr
            from executorch.backends.xnnpack.partition.xnnpack_partitioner import (
                XnnpackPartitioner,
            )
            from executorch.exir import to_edge_transform_and_lower

            example_input = canonical(example_input)
            exported = torch.export.export(gm.eval(), (example_input,), dynamic_shapes=dynamic)
            if calibration is not None:
                exported = _quantized(exported, example_input, calibration, per_channel)
            lowered = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])
            program = lowered.to_executorch()
    except Exception as exc:  # exporter, quantizer and lowering raise many types
        step = "int8 quantization or lowering" if calibration is not None else "lowering"
        raise ExportError(f"ExecuTorch {step} failed: {first_line(exc)}") from None
    calls = [node for node in lowered.exported_program().graph.nodes if node.op == "call_function"]
    delegated = sum("call_delegate" in str(node.target) for node in calls)
    portable = sum("getitem" not in str(node.target) for node in calls) - delegated
    return program.buffer, delegated, portable


def runner(data: bytes) -> Callable[[torch.Tensor], torch.Tensor]:
    """A `.pte` program's `forward` in ExecuTorch's runtime, as a function of a torch batch."""
    require()
    from executorch.runtime import Runtime

    with _native_stderr_silenced():
        program = Runtime.get().load_program(data)
        method = program.load_method("forward")

    def run(x: torch.Tensor) -> torch.Tensor:
        # the program reads `data` in place: the closure keeps both alive as long as `run`
        return method.execute([canonical(x)])[0] if program and data else None

    return run


@contextlib.contextmanager
def threads_set(count: int) -> Iterator[None]:
    """XNNPACK's thread pool in ExecuTorch sized to `count` threads (as `archc bench --threads`
    sizes the other runtimes'), restored after. ExecuTorch calls the reset unsafe while a program
    runs; none runs while it is called here."""
    from archc.backends.export import quiet

    with quiet(), _native_stderr_silenced():  # torchao and the CPU probe report on loading
        from executorch.extension.pybindings import portable_lib

        saved = portable_lib._threadpool_get_thread_count()
        portable_lib._unsafe_reset_threadpool(count)
    try:
        yield
    finally:
        with _native_stderr_silenced():
            portable_lib._unsafe_reset_threadpool(saved)


def export_executorch(gm: GraphModule, path: str | Path, example_input: torch.Tensor, *,
                      rtol: float = 1e-5, dynamic_batch: bool = False) -> EmitReport:
    """Write `path` (.pte), verified in ExecuTorch's runtime (module docstring)."""
    from archc.backends.export import check_output

    report = EmitReport(Path(path), "pte", verified_with="ExecuTorch runtime (XNNPACK)")
    gm = gm.eval()
    bound = batch_bound(example_input) if dynamic_batch else None
    data, delegated, portable = program_bytes(gm, example_input, max_batch=bound)
    reference, report.reference = float64_function(gm, example_input)
    with _native_stderr_silenced():
        run = runner(data)
        verify_emitted(report, reference, run, example_input, dynamic_batch, rtol)
        if bound is not None:
            largest = example_input[torch.arange(bound) % example_input.shape[0]]
            checked = report.relative_error, report.max_abs_error
            check_output(report, reference(largest), run(largest).double(), rtol)
            report.relative_error, report.max_abs_error = max(
                checked, (report.relative_error, report.max_abs_error))
    report.notes = [note for note in report.notes if not note.startswith("dynamic batch")]
    report.notes.append(f"XNNPACK delegate calls: {delegated}, portable ops left: {portable}")
    batch = example_input.shape[0]
    if bound is None:
        report.notes.append(f"static batch {batch}")
    else:
        sizes = ", ".join(map(str, dict.fromkeys([batch, 3 * batch, bound])))
        report.notes.append(f"dynamic batch 1 to {bound} (memory planned for {bound}), checked "
                            f"at {sizes}")
    with atomic_output(report.path) as temporary:
        temporary.write_bytes(data)
    report.bytes = len(data)
    return report
