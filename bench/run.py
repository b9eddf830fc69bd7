"""archc benchmark harness: train form vs archc's deploy form, side by side in one run.

    python bench/run.py                       # the default spec set, writes docs/performance.md
    python bench/run.py --specs repvgg_a0 --rounds 5 --out /tmp/perf.md

Protocol (DECISIONS.md): ONNX Runtime sessions do not spin-wait between runs (else interleaved
sessions steal each other's cores); every configuration is built and warmed up first (sessions
created once, their creation timed separately); then configurations are *interleaved* in rounds:
each round runs every configuration `--iters` times and keeps that round's median; the result is
the median of the round medians, with the spread (min-max of round medians). Ratios compare medians
measured in the same run. Nothing here is asserted: the numbers go to docs/performance.md.

Measured per spec:
- eager PyTorch: train form vs archc deploy form (default pipeline), intra-op threads as the
  machine has;
- ONNX Runtime (CPU, ORT_ENABLE_ALL, intra-op threads 1 and 2): the baseline a user would
  produce (the train-form module through `torch.onnx.export` with default settings) vs archc's
  ONNX of the deploy form;
- achieved GFLOP/s of the deploy form (archc's multiply-add count x 2 / time) against the
  machine's measured fp32 matrix-multiply peak;
- `archc build` wall time, and `import torch` alone for scale;
- with a CUDA device: fp32 NCHW vs channels_last, fp16, and fp16 after `align_channels`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SPECS = [
    "regnetx_600mf",
    "regnety_600mf",
    "repvgg_a0",
    "mobileone_style",
    "dbb_style",
    "mobilenet_v2",
    "shufflenet_v2_x1_0",
    "resnet50",
]


@dataclass
class Timing:
    rounds: list[float] = field(default_factory=list)  # per-round medians, seconds

    @property
    def median(self) -> float:
        return statistics.median(self.rounds)

    def text(self) -> str:
        return (
            f"{self.median * 1e3:.2f} ms "
            f"[{min(self.rounds) * 1e3:.2f}-{max(self.rounds) * 1e3:.2f}]"
        )


def interleaved(configs: dict, rounds: int, iters: int, warmup: int) -> dict[str, Timing]:
    """Time every callable in `configs`, interleaved round by round."""
    for run in configs.values():
        for _ in range(warmup):
            run()
    timings = {name: Timing() for name in configs}
    for _ in range(rounds):
        for name, run in configs.items():
            samples = []
            for _ in range(iters):
                start = time.perf_counter()
                run()
                samples.append(time.perf_counter() - start)
            timings[name].rounds.append(statistics.median(samples))
    return timings


def matmul_peak_gflops(threads: int, size: int = 1024, repeats: int = 20) -> float:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def ort_session(model_bytes: bytes, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # idle workers must not spin: with interleaved sessions, one session's spinning thread pool
    # steals the cores from the next one (measured: a 2x penalty on whichever runs second)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    start = time.perf_counter()
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    created = time.perf_counter() - start
    name = session.get_inputs()[0].name
    return session, name, created


def baseline_onnx(module, example) -> bytes:
    """What a user would otherwise ship: torch.onnx.export with its default settings."""
    import torch

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "baseline.onnx"
        with contextlib.redirect_stdout(io.StringIO()):
            torch.onnx.export(module, (example,), str(path))
        import onnx

        return onnx.load(str(path)).SerializeToString()  # inlines external data, if any


def count_ops(model_bytes: bytes, op_type: str) -> int:
    import onnx

    return sum(node.op_type == op_type for node in onnx.load_from_string(model_bytes).graph.node)


def bench_spec(name: str, args) -> dict:
    import torch

    import archc
    from archc.analysis import complexity
    from archc.init import random_input
    from archc.pipeline import PassContext, resolve_pipeline, run_pipeline

    spec = archc.load_spec(ROOT / "specs" / f"{name}.yaml")
    shape = (args.batch, spec.input.channels, args.input_size, args.input_size)
    x = random_input(shape, seed=1)
    train = archc.build(spec, init="random")
    deploy = run_pipeline(
        train, resolve_pipeline("default"), PassContext(example_inputs=(x,))
    ).graph_module
    flops = complexity(deploy, shape)[0]
    result = {
        "name": name,
        "shape": shape,
        "flops_train": complexity(train, shape)[0],
        "flops_deploy": flops,
    }

    torch.set_num_threads(args.eager_threads)
    with torch.no_grad():
        eager = interleaved(
            {"train": lambda: train(x), "deploy": lambda: deploy(x)},
            args.rounds,
            args.iters,
            args.warmup,
        )
    result["eager"] = eager

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "archc.onnx"
        archc.export_onnx(deploy, path, x)
        archc_bytes = path.read_bytes()
    base_bytes = baseline_onnx(train, x)
    result["convs"] = {
        "baseline": count_ops(base_bytes, "Conv"),
        "archc": count_ops(archc_bytes, "Conv"),
    }
    feed = x.numpy()
    configs, created = {}, {}
    for threads in args.ort_threads:
        for label, data in (("baseline", base_bytes), ("archc", archc_bytes)):
            session, input_name, seconds = ort_session(data, threads)
            key = f"{label}@{threads}"
            created[key] = seconds
            configs[key] = lambda s=session, n=input_name: s.run(None, {n: feed})
    result["ort"] = interleaved(configs, args.rounds, args.iters, args.warmup)
    result["session_seconds"] = created
    return result


def bench_gpu(name: str, args) -> dict[str, Timing]:
    """Deploy form on CUDA: NCHW fp32, channels_last fp32, channels_last fp16, and channels_last
    fp16 after align_channels (multiple 8), interleaved; each run synchronizes the device."""
    import torch

    import archc
    from archc.init import random_input
    from archc.pipeline import PassContext, resolve_pipeline, run_pipeline

    spec = archc.load_spec(ROOT / "specs" / f"{name}.yaml")
    shape = (args.gpu_batch, spec.input.channels, args.input_size, args.input_size)
    x = random_input(shape, seed=1)
    train = archc.build(spec, init="random")
    variants = {}
    for label, pipeline in (("deploy", "default"), ("aligned", "default,align_channels")):
        ctx = PassContext(example_inputs=(x,), options={"align_channels.multiple": 8})
        variants[label] = run_pipeline(train, resolve_pipeline(pipeline), ctx).graph_module
    cl = torch.channels_last
    models = {
        "fp32 NCHW": (variants["deploy"].cuda(), x.cuda()),
        "fp32 channels_last": (
            variants["deploy"].cuda().to(memory_format=cl),
            x.cuda().to(memory_format=cl),
        ),
        "fp16 channels_last": (
            variants["deploy"].cuda().half().to(memory_format=cl),
            x.cuda().half().to(memory_format=cl),
        ),
        "fp16 channels_last aligned": (
            variants["aligned"].cuda().half().to(memory_format=cl),
            x.cuda().half().to(memory_format=cl),
        ),
    }

    def runner(model, inputs):
        def run():
            with torch.no_grad():
                model(inputs)
            torch.cuda.synchronize()

        return run

    configs = {label: runner(*pair) for label, pair in models.items()}
    return interleaved(configs, args.rounds, args.iters, args.warmup)


def time_command(command: list[str], repeats: int) -> Timing:
    timing = Timing()
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, cwd=ROOT)
        timing.rounds.append(time.perf_counter() - start)
    return timing


def machine() -> str:
    import onnxruntime
    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores; Python {platform.python_version()}, "
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}"
    )


def report(
    results: list[dict],
    peak: dict[int, float],
    build: Timing,
    import_torch: Timing,
    gpu: dict[str, dict[str, Timing]],
    args,
) -> str:
    lines = [
        "# Performance",
        "",
        "Measured by `python bench/run.py` (see its docstring for the protocol). Times are "
        "the median of per-round medians with the [min-max] of round medians; rounds "
        f"interleave the configurations ({args.rounds} rounds x {args.iters} runs, "
        f"{args.warmup} warm-ups). Ratios > 1 mean archc's deploy form is faster.",
        "",
        f"Machine: {machine()}. Batch {args.batch}, input {args.input_size}x"
        f"{args.input_size}. A shared, noisy VM: read ratios, not absolute times.",
        "",
        "## Eager PyTorch: train form vs archc deploy form",
        "",
        f"intra-op threads: {args.eager_threads}",
        "",
        "| spec | MACs train -> deploy | train | deploy | speed-up |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        eager = r["eager"]
        lines.append(
            f"| {r['name']} | {r['flops_train'] / 1e9:.2f}G -> "
            f"{r['flops_deploy'] / 1e9:.2f}G | {eager['train'].text()} | "
            f"{eager['deploy'].text()} | "
            f"{eager['train'].median / eager['deploy'].median:.2f}x |"
        )
    lines += [
        "",
        "## ONNX Runtime (CPU, ORT_ENABLE_ALL): default export of the train form vs archc's ONNX",
        "",
        "| spec | threads | Conv nodes baseline / archc | baseline | archc | speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        for threads in args.ort_threads:
            base, ours = r["ort"][f"baseline@{threads}"], r["ort"][f"archc@{threads}"]
            lines.append(
                f"| {r['name']} | {threads} | {r['convs']['baseline']} / "
                f"{r['convs']['archc']} | {base.text()} | {ours.text()} | "
                f"{base.median / ours.median:.2f}x |"
            )
    lines += [
        "",
        "## Achieved throughput of the deploy form vs the matmul peak",
        "",
        "Peak: best of repeated 1024x1024 fp32 `torch.mm`: "
        + ", ".join(f"{peak[t]:.1f} GFLOP/s at {t} thread(s)" for t in sorted(peak))
        + ".",
        "",
        "| spec | eager deploy | fraction of peak | ORT archc (2 threads) | fraction |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        flop = 2 * r["flops_deploy"] * args.batch
        eager = flop / r["eager"]["deploy"].median / 1e9
        ort_threads = max(args.ort_threads)
        ort = flop / r["ort"][f"archc@{ort_threads}"].median / 1e9
        lines.append(
            f"| {r['name']} | {eager:.1f} GFLOP/s | "
            f"{eager / peak[args.eager_threads]:.0%} | {ort:.1f} GFLOP/s | "
            f"{ort / peak[ort_threads]:.0%} |"
        )
    lines += [
        "",
        "## Tool cost",
        "",
        f"- `archc build specs/regnetx_600mf.yaml -o model.onnx` (export, simplify, verify): "
        f"{build.median:.1f} s [{min(build.rounds):.1f}-{max(build.rounds):.1f}]",
        f"- `python -c 'import torch'` alone: {import_torch.median:.2f} s",
        "",
        "## GPU",
        "",
    ]
    if not gpu:
        lines += [
            "Not measured: this machine has no CUDA device. On a machine with one, the "
            "harness fills this section: the deploy form in fp32 NCHW, fp32 channels_last, "
            "fp16 channels_last, and fp16 channels_last after `align_channels` (multiple 8),"
            " interleaved, batch `--gpu-batch`.",
            "",
        ]
        return "\n".join(lines)
    import torch

    lines += [
        f"Device: {torch.cuda.get_device_name()}, batch {args.gpu_batch}.",
        "",
        "| spec | variant | time | vs fp32 NCHW |",
        "|---|---|---|---|",
    ]
    for name, timings in gpu.items():
        base = timings["fp32 NCHW"].median
        for label, timing in timings.items():
            lines.append(f"| {name} | {label} | {timing.text()} | {base / timing.median:.2f}x |")
    return "\n".join(lines + [""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--specs", default=",".join(DEFAULT_SPECS))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--eager-threads", type=int, default=2)
    parser.add_argument("--ort-threads", default="1,2")
    parser.add_argument("--build-repeats", type=int, default=3)
    parser.add_argument("--gpu-batch", type=int, default=32)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "performance.md")
    args = parser.parse_args()
    args.ort_threads = [int(t) for t in args.ort_threads.split(",")]

    peak = {t: matmul_peak_gflops(t) for t in sorted({1, 2, args.eager_threads})}
    results = []
    for name in args.specs.split(","):
        print(f"benchmarking {name} ...", file=sys.stderr, flush=True)
        results.append(bench_spec(name, args))
    with tempfile.TemporaryDirectory() as folder:
        archc_cli = [
            sys.executable,
            "-m",
            "archc",
            "build",
            "specs/regnetx_600mf.yaml",
            "-o",
            str(Path(folder) / "model.onnx"),
        ]
        build = time_command(archc_cli, args.build_repeats)
    import_torch = time_command([sys.executable, "-c", "import torch"], args.build_repeats)
    import torch

    gpu = {}
    if torch.cuda.is_available():
        for name in args.specs.split(","):
            print(f"benchmarking {name} on {torch.cuda.get_device_name()} ...", file=sys.stderr)
            gpu[name] = bench_gpu(name, args)
    text = report(results, peak, build, import_torch, gpu, args)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
