"""`archc bench`: one model's deploy form timed in every installed runtime, each checked first.

Runtimes (`RUNTIMES`): `ort` (archc's ONNX in ONNX Runtime, full graph optimizations), `openvino`
(the same ONNX converted by OpenVINO, CPU plugin at f32: `archc.backends.openvino_ir`), `torch`
(the deploy graph in eager PyTorch), `torch-compile` (the deploy graph through `torch.compile`,
inductor), `executorch` (the `.pte` program lowered to XNNPACK in ExecuTorch's runtime:
`archc.backends.executorch_pte`). The train form in eager PyTorch is always timed too, as the
baseline.

Check. Before it is timed, every runtime runs the benchmark input and its output is compared with
the train form run in float64 (`archc.ir.verify`); a runtime further from it than the tolerance
of the precision it computes in (the artifact tolerance at fp32, `export.dtype_tolerance` at
OpenVINO's reduced precisions) is left out with that reason, as is one that is not installed or
fails to load the model: the table never reports the speed of a wrong answer.

Timing: `archc.common.timing.interleaved` (warm-ups, then the runtimes take turns in rounds;
median of round medians and the spread), all runtimes at the same intra-op thread count, the
number of runs per round chosen so that the slowest runtime's round takes about
`ROUND_SECONDS`; the load average is read before and after, since other processes distort it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule

from archc.backends.export import DEFAULT_OPSET, EmitReport, onnx_bytes
from archc.common.extras import installed, missing_extra
from archc.common.timing import Timing, interleaved
from archc.errors import first_line
from archc.ir.verify import float64_function, relative_error

RUNTIMES = ("ort", "openvino", "torch", "torch-compile", "executorch")
TRAIN_FORM = "torch (train form)"
ROUND_SECONDS = 0.2
MAX_ITERATIONS = 20
WARMUP = 3


class Unavailable(Exception):
    """A runtime that cannot run the model here; the message is the reason."""


@dataclass
class Prepared:
    run: Callable[[torch.Tensor], torch.Tensor]
    precision: str = "fp32"
    tolerance: float = 0.0


@dataclass
class Row:
    runtime: str
    precision: str
    timing: Timing
    relative_error: float
    tolerance: float


@dataclass
class BenchReport:
    rows: list[Row]
    left_out: dict[str, str]  # runtime -> why it is not in the table
    reference: str
    threads: int
    rounds: int
    iterations: int
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    notes: list[str] = field(default_factory=list)

    def fastest(self) -> Row:
        return min(self.rows, key=lambda row: row.timing.median)

    def train_form(self) -> Row:
        return next(row for row in self.rows if row.runtime == TRAIN_FORM)

    def document(self) -> dict:
        fastest, train = self.fastest().timing.median, self.train_form().timing.median
        return {
            "reference": self.reference, "threads": self.threads, "rounds": self.rounds,
            "iterations_per_round": self.iterations,
            "load_average": {"before": list(self.load_before), "after": list(self.load_after)},
            "rows": [{"runtime": row.runtime, "precision": row.precision,
                      "median_ms": row.timing.median * 1e3,
                      "min_ms": min(row.timing.rounds) * 1e3,
                      "max_ms": max(row.timing.rounds) * 1e3,
                      "vs_fastest": row.timing.median / fastest,
                      "speedup_over_train_form": train / row.timing.median,
                      "relative_error": row.relative_error, "tolerance": row.tolerance}
                     for row in self.rows],
            "left_out": dict(self.left_out), "notes": list(self.notes),
        }


def _ort(onnx: bytes, threads: int) -> Prepared:
    from archc.backends.onnx_runtime import cpu_session

    session = cpu_session(onnx, threads)
    name = session.get_inputs()[0].name
    return Prepared(lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0]))


def _openvino(onnx: bytes, threads: int) -> Prepared:
    problem = missing_extra("openvino", "openvino", "the openvino runtime")
    if problem:
        raise Unavailable(problem)
    import io

    from archc.backends import openvino_ir

    model = openvino_ir.require().convert_model(io.BytesIO(onnx))
    compiled, used = openvino_ir.compile_cpu(model, "fp32", threads)
    return Prepared(openvino_ir.runner(compiled), used)


def _torch_compile(deploy: GraphModule) -> Prepared:
    compiled = torch.compile(deploy)
    return Prepared(compiled)


def _executorch(deploy: GraphModule, x: torch.Tensor) -> Prepared:
    problem = missing_extra("executorch", "executorch", "the executorch runtime")
    if problem:
        raise Unavailable(problem)
    from archc.backends import executorch_pte

    data, _, _ = executorch_pte.program_bytes(deploy, x)
    return Prepared(executorch_pte.runner(data))


def prepare(runtime: str, deploy: GraphModule, x: torch.Tensor, onnx: Callable[[], bytes],
            threads: int) -> Prepared:
    """`runtime` loaded with the deploy form for inputs shaped like `x` (`onnx()` gives its ONNX
    bytes); `Unavailable` with the reason when it cannot run here."""
    try:
        if runtime == "ort":
            return _ort(onnx(), threads)
        if runtime == "openvino":
            return _openvino(onnx(), threads)
        if runtime == "torch":
            return Prepared(deploy)
        if runtime == "torch-compile":
            return _torch_compile(deploy)
        if runtime == "executorch":
            return _executorch(deploy, x)
    except Unavailable:
        raise
    except Exception as exc:  # a runtime that cannot load the model: its own exception types
        raise Unavailable(f"cannot load the model: {first_line(exc)}") from None
    raise ValueError(f"unknown runtime {runtime!r}; one of {', '.join(RUNTIMES)}")


def checked_run(prepared: Prepared, x: torch.Tensor, reference: Callable, tolerance: float
                ) -> tuple[Callable[[], object], float]:
    """The runtime's first run on `x` checked against `reference` (on its first call a model may
    compile, so the check doubles as a warm-up); the timed callable and the relative error.
    `Unavailable` if it fails or is beyond `tolerance`."""
    with torch.no_grad():
        try:
            output = prepared.run(x)
        except Exception as exc:  # a runtime failing on the input: its own exception types
            raise Unavailable(f"fails to run the model: {first_line(exc)}") from None
        error = relative_error(reference(x), output.double())
    if not error <= tolerance:
        raise Unavailable(f"disagrees with the float64 reference: relative error {error:.3g} > "
                          f"tolerance {tolerance:g} ({prepared.precision})")

    def run() -> None:
        with torch.no_grad():
            prepared.run(x)

    return run, error


def bench(train: GraphModule, deploy: GraphModule, x: torch.Tensor, *, runtimes: list[str],
          threads: int, rounds: int, tolerance: float,
          progress: Callable[[str], None] = lambda text: None) -> BenchReport:
    """Time the train form and `runtimes` (the deploy form) on `x` (module docstring).
    `tolerance`: what an fp32 runtime may differ from float64 by (the artifact tolerance)."""
    from archc.backends.openvino_ir import precision_tolerance

    reference, reference_name = float64_function(train, x)
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    pools = contextlib.ExitStack()
    if "executorch" in runtimes and installed("executorch"):
        from archc.backends.executorch_pte import threads_set

        pools.enter_context(threads_set(threads))
    onnx_cache: list[bytes] = []

    def onnx() -> bytes:
        if not onnx_cache:
            onnx_cache.append(onnx_bytes(deploy, x, EmitReport(None, "onnx"), opset=DEFAULT_OPSET,
                                         dynamic_batch=False, simplify=True, exporter="auto"))
        return onnx_cache[0]

    try:
        configs: dict[str, Callable[[], object]] = {}
        rows: dict[str, tuple[str, float, float]] = {}
        left_out: dict[str, str] = {}
        for name, load in [(TRAIN_FORM, lambda: Prepared(train)),
                           *((r, lambda r=r: prepare(r, deploy, x, onnx, threads))
                             for r in runtimes)]:
            progress(f"bench: loading and checking {name}")
            try:
                prepared = load()
                allowed = precision_tolerance(prepared.precision, tolerance)
                configs[name], error = checked_run(prepared, x, reference, allowed)
                rows[name] = (prepared.precision, error, allowed)
            except Unavailable as reason:
                left_out[name] = str(reason)
        iterations = _iterations(configs)
        progress(f"bench: {rounds} interleaved rounds of {iterations} runs")
        before = os.getloadavg()
        timings = interleaved(configs, rounds, iterations, WARMUP)
        after = os.getloadavg()
    finally:
        torch.set_num_threads(saved_threads)
        pools.close()
    table = []
    for name in configs:
        precision, error, allowed = rows[name]
        table.append(Row(name, precision, timings[name], error, allowed))
    return BenchReport(table, left_out, reference_name, threads, rounds, iterations, before,
                       after)


def _iterations(configs: dict[str, Callable[[], object]]) -> int:
    """Runs per round: the slowest configuration's round takes about `ROUND_SECONDS`."""
    import time

    slowest = 0.0
    for run in configs.values():
        start = time.perf_counter()
        run()
        slowest = max(slowest, time.perf_counter() - start)
    return max(1, min(MAX_ITERATIONS, int(ROUND_SECONDS / max(slowest, 1e-6))))
