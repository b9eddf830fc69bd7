"""`archc bench`: one model's deploy form timed in every installed runtime, each checked first,
against the machine's measured convolution ceiling.

Runtimes (`RUNTIMES`): `ort` (archc's ONNX in ONNX Runtime, full graph optimizations), `openvino`
(the same ONNX converted by OpenVINO, CPU plugin: `archc.backends.openvino_ir`), `torch`
(the deploy graph in eager PyTorch), `torch-compile` (the deploy graph through `torch.compile`,
inductor), `executorch` (the `.pte` program lowered to XNNPACK in ExecuTorch's runtime:
`archc.backends.executorch_pte`). The train form in eager PyTorch (float32) is always timed too,
as the baseline.

Precision (`dtype`): fp32, or bf16 / fp16 for the runtimes that compute in them (`DTYPES`):
OpenVINO's inference precision hint (the precision it reports using is the row's), and PyTorch
(eager and compiled) on a copy of the deploy form cast to that format. ONNX Runtime and
ExecuTorch run archc's models in fp32 only and are left out at the others, with that reason.

Check. Before it is timed, every runtime runs the benchmark input and its output is compared with
the train form run in float64 (`archc.ir.verify`); a runtime further from it than the tolerance
of the precision it computes in (the artifact tolerance at fp32, `export.dtype_tolerance` at
the reduced precisions) is left out with that reason, as is one that is not installed or
fails to load the model: the table never reports the speed of a wrong answer.

Ceiling. What a convolution can reach on this machine, measured rather than assumed: one large
dense 3x3 convolution (`CEILING_CHANNELS` in and out at `CEILING_SIDE` x `CEILING_SIDE`, batch
1; dense and wide enough that no runtime is limited by memory traffic or overhead) timed in every
installed runtime of `CEILING_RUNTIMES` at fp32 and bf16 (ExecuTorch only where the model is
timed in it too: its runtime is not loaded otherwise), each checked like a model. The ceiling of
a precision is the fastest of them in GFLOP/s (2 x the multiply-adds archc counts,
`archc.ir.analysis.executed_flops`, over the median time); a model's row reports its own
GFLOP/s counted the same way and the fraction of the ceiling at its precision. The ceiling's
configurations take turns with the model's in the same rounds, so both see the same load.

Timing: `archc.common.timing.interleaved` (warm-ups, then the configurations take turns in
rounds; median of round medians and the spread), all runtimes at the same intra-op thread count,
the number of runs per round chosen so that the slowest configuration's round takes about
`ROUND_SECONDS`; the load average is read before and after, since other processes distort it.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule

from archc.backends.export import DEFAULT_OPSET, DEPLOY_DTYPES, EmitReport, onnx_bytes
from archc.backends.openvino_ir import precision_tolerance
from archc.common.extras import installed, missing_extra
from archc.common.timing import Timing, interleaved
from archc.errors import first_line
from archc.ir.verify import float64_function, relative_error

RUNTIMES = ("ort", "openvino", "torch", "torch-compile", "executorch")
# the precisions each runtime computes archc's models in (module docstring)
DTYPES = {"ort": ("fp32",), "openvino": ("fp32", "bf16", "fp16"),
          "torch": ("fp32", "bf16", "fp16"), "torch-compile": ("fp32", "bf16", "fp16"),
          "executorch": ("fp32",)}
TRAIN_FORM = "torch (train form)"
# the convolution ceiling: runtimes (torch.compile would run the same kernel as eager torch)
CEILING_RUNTIMES = ("ort", "openvino", "torch", "executorch")
CEILING_DTYPES = ("fp32", "bf16")
CEILING_CHANNELS = 256
CEILING_SIDE = 28
CEILING_PREFIX = "conv ceiling: "
ROUND_SECONDS = 0.2
MAX_ITERATIONS = 20
WARMUP = 3


class Unavailable(Exception):
    """A runtime that cannot run the model here; the message is the reason."""


@dataclass
class Prepared:
    run: Callable[[torch.Tensor], torch.Tensor]
    precision: str = "fp32"
    feed: Callable[[torch.Tensor], torch.Tensor] = lambda x: x  # the input as `run` takes it


@dataclass
class Row:
    runtime: str
    precision: str
    timing: Timing
    relative_error: float
    tolerance: float
    gflops: float | None = None  # 2 x executed multiply-adds / median time


@dataclass
class Candidate:
    """One configuration to check and time: `load` prepares it, run on `x`, judged against
    `reference` (float64); `flop`: floating-point operations of one run."""
    name: str
    load: Callable[[], Prepared]
    x: torch.Tensor
    reference: Callable[[torch.Tensor], torch.Tensor]
    flop: float


@dataclass
class Ceiling:
    """The convolution ceiling (module docstring): every runtime's row, and the fastest per
    precision."""
    rows: list[Row]
    left_out: dict[str, str]
    shape: tuple[int, ...]

    def best(self, precision: str) -> Row | None:
        rows = [row for row in self.rows if row.precision == precision]
        return max(rows, key=lambda row: row.gflops) if rows else None

    def fraction(self, row: Row) -> float | None:
        best = self.best(row.precision)
        return None if best is None or row.gflops is None else row.gflops / best.gflops

    def document(self) -> dict:
        best = {precision: {"runtime": row.runtime, "gflops": row.gflops}
                for precision in CEILING_DTYPES + ("fp16",)
                if (row := self.best(precision)) is not None}
        return {"conv": f"3x3 conv {self.shape[1]}->{self.shape[1]} at "
                        f"{self.shape[2]}x{self.shape[3]}, batch {self.shape[0]}",
                "ceiling": best, "rows": [_row_document(row) for row in self.rows],
                "left_out": dict(self.left_out)}


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
    dtype: str = "fp32"
    ceiling: Ceiling | None = None
    notes: list[str] = field(default_factory=list)

    def fastest(self) -> Row:
        return min(self.rows, key=lambda row: row.timing.median)

    def train_form(self) -> Row:
        return next(row for row in self.rows if row.runtime == TRAIN_FORM)

    def fraction(self, row: Row) -> float | None:
        """`row`'s share of the ceiling at its precision (None without one)."""
        return None if self.ceiling is None else self.ceiling.fraction(row)

    def document(self) -> dict:
        fastest, train = self.fastest().timing.median, self.train_form().timing.median
        return {
            "reference": self.reference, "threads": self.threads, "rounds": self.rounds,
            "iterations_per_round": self.iterations, "dtype": self.dtype,
            "load_average": {"before": list(self.load_before), "after": list(self.load_after)},
            "rows": [{**_row_document(row), "vs_fastest": row.timing.median / fastest,
                      "speedup_over_train_form": train / row.timing.median,
                      "fraction_of_ceiling": self.fraction(row)}
                     for row in self.rows],
            "left_out": dict(self.left_out), "notes": list(self.notes),
            "ceiling": None if self.ceiling is None else self.ceiling.document(),
        }


def _row_document(row: Row) -> dict:
    return {"runtime": row.runtime, "precision": row.precision,
            "median_ms": row.timing.median * 1e3, "min_ms": min(row.timing.rounds) * 1e3,
            "max_ms": max(row.timing.rounds) * 1e3, "gflops": row.gflops,
            "relative_error": row.relative_error, "tolerance": row.tolerance}


def _ort(onnx: bytes, threads: int) -> Prepared:
    from archc.backends.onnx_runtime import cpu_session

    session = cpu_session(onnx, threads)
    name = session.get_inputs()[0].name
    return Prepared(lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0]))


def _openvino(onnx: bytes, threads: int, dtype: str = "fp32") -> Prepared:
    problem = missing_extra("openvino", "openvino", "the openvino runtime")
    if problem:
        raise Unavailable(problem)
    import io

    from archc.backends import openvino_ir

    model = openvino_ir.require().convert_model(io.BytesIO(onnx))
    compiled, used = openvino_ir.compile_cpu(model, dtype, threads)
    return Prepared(openvino_ir.runner(compiled), used)


def _torch(deploy: GraphModule, dtype: str, compiled: bool) -> Prepared:
    """The deploy graph in PyTorch at `dtype` (a cast copy below fp32), eager or compiled."""
    model = deploy
    if dtype != "fp32":
        model = copy.deepcopy(deploy).to(DEPLOY_DTYPES[dtype])
    if compiled:
        model = torch.compile(model)
    return Prepared(lambda x: model(x).float(), dtype,
                    feed=lambda x: x.to(DEPLOY_DTYPES[dtype]))


def _executorch(deploy: GraphModule, x: torch.Tensor) -> Prepared:
    problem = missing_extra("executorch", "executorch", "the executorch runtime")
    if problem:
        raise Unavailable(problem)
    from archc.backends import executorch_pte

    data, _, _ = executorch_pte.program_bytes(deploy, x)
    return Prepared(executorch_pte.runner(data))


def prepare(runtime: str, deploy: GraphModule, x: torch.Tensor, onnx: Callable[[], bytes],
            threads: int, dtype: str = "fp32") -> Prepared:
    """`runtime` loaded with the deploy form for inputs shaped like `x` (`onnx()` gives its ONNX
    bytes), computing in `dtype`; `Unavailable` with the reason when it cannot run here."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; one of {', '.join(RUNTIMES)}")
    if dtype not in DTYPES[runtime]:
        raise Unavailable(f"archc runs {runtime} at {', '.join(DTYPES[runtime])} only, not "
                          f"{dtype}")
    try:
        if runtime == "ort":
            return _ort(onnx(), threads)
        if runtime == "openvino":
            return _openvino(onnx(), threads, dtype)
        if runtime in ("torch", "torch-compile"):
            return _torch(deploy, dtype, compiled=runtime == "torch-compile")
        return _executorch(deploy, x)
    except Unavailable:
        raise
    except Exception as exc:  # a runtime that cannot load the model: its own exception types
        raise Unavailable(f"cannot load the model: {first_line(exc)}") from None


def checked_run(prepared: Prepared, x: torch.Tensor, reference: Callable, tolerance: float
                ) -> tuple[Callable[[], object], float]:
    """The runtime's first run on `x` checked against `reference` (on its first call a model may
    compile, so the check doubles as a warm-up); the timed callable and the relative error.
    `Unavailable` if it fails or is beyond `tolerance`."""
    with torch.no_grad():
        try:
            fed = prepared.feed(x)
            output = prepared.run(fed)
        except Exception as exc:  # a runtime failing on the input: its own exception types
            raise Unavailable(f"fails to run the model: {first_line(exc)}") from None
        error = relative_error(reference(x), output.double())
    if not error <= tolerance:
        raise Unavailable(f"disagrees with the float64 reference: relative error {error:.3g} > "
                          f"tolerance {tolerance:g} ({prepared.precision})")

    def run() -> None:
        with torch.no_grad():
            prepared.run(fed)

    return run, error


def executed_flop(gm: GraphModule, x: torch.Tensor) -> float:
    """Floating-point operations of one run of `gm` on `x`: 2 x the multiply-adds archc counts
    (`archc.ir.analysis.executed_flops`, per sample) x the batch."""
    from archc.ir.analysis import complexity_report, executed_flops

    complexity_report(gm, tuple(x.shape))
    return 2.0 * executed_flops(gm) * x.shape[0]


def ceiling_conv(channels: int | None = None, side: int | None = None, seed: int = 0
                 ) -> tuple[GraphModule, torch.Tensor]:
    """The ceiling's convolution (3x3, `channels` in and out, default `CEILING_CHANNELS`,
    padding 1, random weights) and an input of batch 1 at `side` x `side` (`CEILING_SIDE`)."""
    channels, side = channels or CEILING_CHANNELS, side or CEILING_SIDE
    generator = torch.Generator().manual_seed(seed)
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator)
                          / (3 * channels ** 0.5))
        conv.bias.copy_(torch.randn(channels, generator=generator))
    gm = torch.fx.symbolic_trace(torch.nn.Sequential(conv)).eval()
    return gm, torch.randn(1, channels, side, side, generator=generator)


def _onnx_of(gm: GraphModule, x: torch.Tensor) -> Callable[[], bytes]:
    """The graph's ONNX bytes (static batch), made on first call and kept."""
    cache: list[bytes] = []

    def onnx() -> bytes:
        if not cache:
            cache.append(onnx_bytes(gm, x, EmitReport(None, "onnx"), opset=DEFAULT_OPSET,
                                    dynamic_batch=False, simplify=True, exporter="auto"))
        return cache[0]

    return onnx


def ceiling_candidates(threads: int, *, channels: int | None = None, side: int | None = None,
                       dtypes: tuple[str, ...] = CEILING_DTYPES,
                       runtimes: tuple[str, ...] | None = None) -> list[Candidate]:
    """The ceiling's configurations: the convolution in every runtime of `runtimes` (default
    `CEILING_RUNTIMES`) at every precision of `dtypes` the runtime computes in."""
    gm, x = ceiling_conv(channels, side)
    reference, _ = float64_function(gm, x)
    onnx, flop = _onnx_of(gm, x), executed_flop(gm, x)
    return [Candidate(f"{CEILING_PREFIX}{runtime} {dtype}",
                      lambda r=runtime, d=dtype: prepare(r, gm, x, onnx, threads, d),
                      x, reference, flop)
            for runtime in (runtimes or CEILING_RUNTIMES) for dtype in dtypes
            if dtype in DTYPES[runtime]]


@contextlib.contextmanager
def threads_set(threads: int, executorch: bool) -> Iterator[None]:
    """PyTorch's intra-op threads (and ExecuTorch's XNNPACK pool, if `executorch` and it is
    installed) at `threads` for the block, restored after."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    with contextlib.ExitStack() as pools:
        if executorch and installed("executorch"):
            from archc.backends import executorch_pte

            pools.enter_context(executorch_pte.threads_set(threads))
        try:
            yield
        finally:
            torch.set_num_threads(saved)


def measure(candidates: list[Candidate], rounds: int, tolerance: float,
            progress: Callable[[str], None] = lambda text: None
            ) -> tuple[list[Row], dict[str, str], int, tuple, tuple]:
    """Check every candidate, then time the ones that passed interleaved: their rows (in the
    candidates' order), the reasons of the others, runs per round, the load before and after."""
    configs: dict[str, Callable[[], object]] = {}
    checked: dict[str, tuple[str, float, float, float]] = {}
    left_out: dict[str, str] = {}
    for candidate in candidates:
        progress(f"bench: loading and checking {candidate.name}")
        try:
            prepared = candidate.load()
            allowed = precision_tolerance(prepared.precision, tolerance)
            configs[candidate.name], error = checked_run(prepared, candidate.x,
                                                         candidate.reference, allowed)
            checked[candidate.name] = (prepared.precision, error, allowed, candidate.flop)
        except Unavailable as reason:
            left_out[candidate.name] = str(reason)
    iterations = _iterations(configs)
    progress(f"bench: {rounds} interleaved rounds of {iterations} runs")
    before = os.getloadavg()
    timings = interleaved(configs, rounds, iterations, WARMUP)
    after = os.getloadavg()
    rows = []
    for name in configs:
        precision, error, allowed, flop = checked[name]
        timing = timings[name]
        rows.append(Row(name, precision, timing, error, allowed, flop / timing.median / 1e9))
    return rows, left_out, iterations, before, after


def _ceiling(rows: list[Row], left_out: dict[str, str], shape: tuple[int, ...]) -> Ceiling:
    """The ceiling's rows (named without their prefix) out of a measurement's."""
    def own(name: str) -> str:
        return name.removeprefix(CEILING_PREFIX)

    ours = [Row(own(row.runtime), row.precision, row.timing, row.relative_error, row.tolerance,
                row.gflops) for row in rows if row.runtime.startswith(CEILING_PREFIX)]
    return Ceiling(ours, {own(name): why for name, why in left_out.items()
                          if name.startswith(CEILING_PREFIX)}, shape)


def conv_ceiling(threads: int, rounds: int = 5, *, channels: int | None = None,
                 side: int | None = None, dtypes: tuple[str, ...] = CEILING_DTYPES,
                 progress: Callable[[str], None] = lambda text: None) -> Ceiling:
    """The convolution ceiling alone at `threads` threads (module docstring)."""
    candidates = ceiling_candidates(threads, channels=channels, side=side, dtypes=dtypes)
    with threads_set(threads, executorch=True):
        rows, left_out, *_ = measure(candidates, rounds, 1e-5, progress)
    return _ceiling(rows, left_out, tuple(candidates[0].x.shape))


def bench(train: GraphModule, deploy: GraphModule, x: torch.Tensor, *, runtimes: list[str],
          threads: int, rounds: int, tolerance: float, dtype: str = "fp32",
          ceiling: bool = True, progress: Callable[[str], None] = lambda text: None
          ) -> BenchReport:
    """Time the train form and `runtimes` (the deploy form, at `dtype`) on `x`, and with
    `ceiling` the convolution ceiling in the same rounds (module docstring). `tolerance`: what
    an fp32 runtime may differ from float64 by (the artifact tolerance)."""
    reference, reference_name = float64_function(train, x)
    onnx = _onnx_of(deploy, x)
    flop_train, flop_deploy = executed_flop(train, x), executed_flop(deploy, x)
    candidates = [Candidate(TRAIN_FORM, lambda: Prepared(train), x, reference, flop_train)]
    candidates += [Candidate(runtime, lambda r=runtime: prepare(r, deploy, x, onnx, threads,
                                                                dtype),
                             x, reference, flop_deploy) for runtime in runtimes]
    # ExecuTorch's runtime (its thread pool, its CPU probe) is loaded only when it was asked for
    conv = ceiling_candidates(threads, dtypes=tuple(dict.fromkeys((*CEILING_DTYPES, dtype))),
                              runtimes=tuple(r for r in CEILING_RUNTIMES
                                             if r != "executorch" or r in runtimes)
                              ) if ceiling else []
    with threads_set(threads, executorch="executorch" in runtimes):
        rows, left_out, iterations, before, after = measure(candidates + conv, rounds,
                                                            tolerance, progress)
    found = _ceiling(rows, left_out, tuple(conv[0].x.shape)) if conv else None
    model_rows = [row for row in rows if not row.runtime.startswith(CEILING_PREFIX)]
    model_left_out = {name: why for name, why in left_out.items()
                      if not name.startswith(CEILING_PREFIX)}
    return BenchReport(model_rows, model_left_out, reference_name, threads, rounds, iterations,
                       before, after, dtype, found)


def _iterations(configs: dict[str, Callable[[], object]]) -> int:
    """Runs per round: the slowest configuration's round takes about `ROUND_SECONDS`."""
    import time

    slowest = 0.0
    for run in configs.values():
        start = time.perf_counter()
        run()
        slowest = max(slowest, time.perf_counter() - start)
    return max(1, min(MAX_ITERATIONS, int(ROUND_SECONDS / max(slowest, 1e-6))))
