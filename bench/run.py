"""archc benchmark harness: train form vs archc's deploy form, and what archc itself costs.

    python bench/run.py                               # every section, into docs/performance.md
    python bench/run.py --sections pass-cost          # one section; the others stay as they are
    python bench/run.py --specs repvgg_a0 --rounds 5 --out /tmp/perf.md

Each section of docs/performance.md sits between `<!-- begin: NAME -->` and `<!-- end: NAME -->`
markers; a run rewrites only the sections it measured, so a noisy measurement can be repeated
alone. Sections: `deploy` (eager, ONNX Runtime, throughput), `families`, `pass-cost`,
`tool-cost`, `gpu`.

Protocol: ONNX Runtime sessions do not spin-wait between runs (else interleaved
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
  machine's measured fp32 convolution ceiling (`archc.backends.bench.conv_ceiling`: a large dense
  3x3 conv in every installed runtime, the fastest one's GFLOP/s) at the same thread count;
- `archc build` wall time of every shipped spec (and of torch.onnx's exporter on one), each
  against an `import torch` run just before it (`tool-cost`: specs up to 1 GFLOP get
  `--tool-cost-rounds` rounds, default 3, larger ones `--tool-cost-large-rounds`, default 1);
- per re-parameterization family written the way model libraries write them (tests/wild):
  archc's fused form vs the authors' hand-written conversion, eager and ONNX Runtime;
- the default pipeline's own cost on graphs of growing size: the passes with verification off,
  and verification (float64 copy, reference runs, per-pass checks, the result's check) apart;
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

from archc.common.timing import Timing, interleaved

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("deploy", "families", "pass-cost", "tool-cost", "gpu")
# Pass cost: the RegNetY zoo from small to the largest, and one block repeated to growing depth
# (nodes grow with depth at a fixed width, so time per node shows whether the cost is linear).
PASS_COST_SPECS = ["regnety_200mf", "regnety_800mf", "regnety_3.2gf", "regnety_8.0gf",
                   "regnety_32gf"]
PASS_COST_DEPTHS = [4, 8, 16, 32, 64]
DEFAULT_SPECS = [
    "regnetx_600mf",
    "regnety_600mf",
    "repvgg_a0",
    "mobileone_s0",
    "mobileone_s1",
    "fastvit_t8",
    "repvit_m0_9",
    "vanillanet_5",
    "mobilenet_v2_depthshrinker",
    "dbb_style",
    "mobilenet_v2",
    "shufflenet_v2_x1_0",
    "resnet50",
]


def ort_session(model_bytes: bytes, threads: int):
    """An optimized, non-spinning CPU session (`archc.backends.onnx_runtime.cpu_session`), its
    input name and the seconds its creation took."""
    from archc.backends.onnx_runtime import cpu_session

    start = time.perf_counter()
    session = cpu_session(model_bytes, threads)
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
    import archc.passes  # noqa: F401 - registers the catalogue
    from archc.ir import verify
    from archc.ir.analysis import complexity_report, executed_flops

    def executed(gm, shape) -> int:
        """Multiply-adds per sample the graph executes, BN included (`archc.ir.analysis`)."""
        complexity_report(gm, shape)
        return executed_flops(gm)
    from archc.ir.init import random_input
    from archc.rewrite.pipeline import PassContext, resolve_pipeline, run_pipeline

    spec = archc.load_spec(ROOT / "specs" / f"{name}.yaml")
    shape = (args.batch, spec.input.channels, args.input_size, args.input_size)
    x = random_input(shape, seed=1)
    train = archc.build(spec, init="random")
    deploy = run_pipeline(
        train, resolve_pipeline("default"), PassContext(example_inputs=(x,))
    ).graph_module
    flops = executed(deploy, shape)
    result = {
        "name": name,
        "shape": shape,
        "flops_train": executed(train, shape),
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
        # verified as `archc build` verifies: at 1e-5, or 10x the model's own fp32 rounding
        noise = verify.rounding_noise(deploy, (x,))
        archc.export_onnx(deploy, path, x, rtol=verify.artifact_tolerance(1e-5, noise))
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
    import archc.passes  # noqa: F401 - registers the catalogue
    from archc.ir.init import random_input
    from archc.rewrite.pipeline import PassContext, resolve_pipeline, run_pipeline

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
    load = " ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return (
        f"{cpu}, {os.cpu_count()} cores (load average {load} when the run ended); Python "
        f"{platform.python_version()}, torch {torch.__version__}, onnxruntime "
        f"{onnxruntime.__version__}"
    )


def bench_families(args) -> list[dict]:
    """archc's deploy form of each family vs the hand-written one, interleaved, eager and ORT."""
    import copy

    import torch

    import archc.passes  # noqa: F401 - registers the catalogue
    from archc.backends.export import export_onnx
    from archc.ir.init import random_input, randomize
    from archc.rewrite.pipeline import PassContext, resolve_pipeline, run_pipeline

    sys.path.insert(0, str(ROOT))
    from tests.wild.families import NETWORKS
    from tests.wild.layers import reparameterize

    torch.set_num_threads(args.eager_threads)
    rows = []
    for family, (cls, shape) in NETWORKS.items():
        print(f"benchmarking the {family} family ...", file=sys.stderr, flush=True)
        shape = (args.batch, *shape[1:]) if len(shape) == 4 else shape
        if len(shape) == 4:
            shape = (*shape[:2], args.family_size, args.family_size)
        model = randomize(cls(), 0, calibration_input=random_input((2, *shape[1:]), 1)).eval()
        x = random_input(shape, 2)
        hand = reparameterize(copy.deepcopy(model)).eval()
        ours = run_pipeline(model, resolve_pipeline("default"),
                            PassContext(example_inputs=(x,))).graph_module
        hand_traced = torch.fx.symbolic_trace(hand)
        with torch.no_grad():
            eager = interleaved({"hand": lambda m=hand, v=x: m(v),
                                 "archc": lambda m=ours, v=x: m(v)},
                                args.rounds, args.iters, args.warmup)
        configs = {}
        with tempfile.TemporaryDirectory() as folder:
            for label, gm in (("hand", hand_traced), ("archc", ours)):
                path = Path(folder) / f"{label}.onnx"
                export_onnx(gm, path, x)
                session, name, _ = ort_session(path.read_bytes(), max(args.ort_threads))
                configs[label] = (lambda s=session, n=name, v=x: s.run(None, {n: v.numpy()}))
        ort = interleaved(configs, args.rounds, args.iters, args.warmup)
        layers = {label: sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
                             for m in gm.modules()) for label, gm in (("hand", hand_traced),
                                                                      ("archc", ours))}
        rows.append({"family": family, "shape": shape, "layers": layers, "eager": eager,
                     "ort": ort})
    return rows


def families_section(rows: list[dict], args) -> str:
    lines = [
        "## Re-parameterization families: archc's fused form vs the hand-written conversion",
        "",
        "`python bench/run.py --sections families`: the small networks of `tests/wild` (each "
        "family written the way model libraries write it), converted by the authors' own "
        "per-block `reparameterize()` and by archc's default pipeline, timed interleaved "
        f"({args.rounds} rounds x {args.iters} runs), eager PyTorch at {args.eager_threads} "
        f"threads and ONNX Runtime at {max(args.ort_threads)}. A ratio of 1.00x means the same "
        "speed; archc's form has at most the hand-written layer count (it also folds what the "
        "authors' code leaves, e.g. FastViT's ConvFFN BatchNorms and layer scales).",
        "",
        f"Machine: {machine()}.",
        "",
        "| family | input | layers hand / archc | eager hand | eager archc | ratio | ORT hand | "
        "ORT archc | ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        eager, ort = row["eager"], row["ort"]
        lines.append(
            f"| {row['family']} | {'x'.join(map(str, row['shape']))} | {row['layers']['hand']} / "
            f"{row['layers']['archc']} | {eager['hand'].text()} | {eager['archc'].text()} | "
            f"{eager['hand'].median / eager['archc'].median:.2f}x | {ort['hand'].text()} | "
            f"{ort['archc'].text()} | {ort['hand'].median / ort['archc'].median:.2f}x |")
    return "\n".join(lines)


def pass_cost_model(name: str):
    """A spec graph for the pass-cost table: a zoo spec, or `depth<N>`: N RepVGG-style train-form
    blocks of 64 channels (conv-BN, conv-BN and a BN identity per block), every one mergeable."""
    import archc

    if not name.startswith("depth"):
        return archc.build(ROOT / "specs" / f"{name}.yaml")
    depth = int(name.removeprefix("depth"))
    spec = {"name": name, "input": {"size": 32}, "num_classes": 10, "stem": {"type": "simple"},
            "body": {"type": "anynet", "stages": [
                {"block": "repvgg", "depth": depth, "width": 64, "stride": 1}]}}
    return archc.build(spec)


def bench_pass_cost(args) -> list[dict]:
    """The default pipeline's cost per graph, rounds interleaved over the graphs: the passes with
    verification off, and the whole run with verification on (its verification share apart)."""
    import archc.passes  # noqa: F401 - registers the catalogue
    from archc.ir.init import random_input
    from archc.rewrite.pipeline import PassContext, resolve_pipeline, run_pipeline

    names = [*args.pass_cost_specs, *(f"depth{d}" for d in PASS_COST_DEPTHS)]
    graphs = {}
    for name in names:
        gm = pass_cost_model(name)
        side = 224 if not name.startswith("depth") else 32
        graphs[name] = (gm, random_input((1, 3, side, side), seed=1))
    pipeline = resolve_pipeline("default")
    rows = {name: {"name": name, "nodes": len(gm.graph.nodes),
                   "params": sum(p.numel() for p in gm.parameters()),
                   "passes": [], "verify_on": [], "verification": []}
            for name, (gm, _) in graphs.items()}
    for _ in range(args.pass_cost_rounds):
        for name, (gm, x) in graphs.items():
            start = time.perf_counter()
            run_pipeline(gm, pipeline, PassContext(example_inputs=(x,), verify=False))
            rows[name]["passes"].append(time.perf_counter() - start)
            start = time.perf_counter()
            result = run_pipeline(gm, pipeline, PassContext(example_inputs=(x,)))
            total = time.perf_counter() - start
            rows[name]["verify_on"].append(total)
            rows[name]["verification"].append(total - result.seconds)
    return list(rows.values())


def deploy_section(results: list[dict], ceiling: dict, args) -> str:
    lines = [
        "Measured by `python bench/run.py --sections deploy` (see its docstring for the protocol)."
        " Times are the median of per-round medians with the [min-max] of round medians; rounds "
        f"interleave the configurations ({args.rounds} rounds x {args.iters} runs, "
        f"{args.warmup} warm-ups). Ratios > 1 mean archc's deploy form is faster.",
        "",
        f"Machine: {machine()}. Batch {args.batch}, input {args.input_size}x"
        f"{args.input_size}. A shared, noisy VM: read ratios, not absolute times.",
        "",
        "## Eager PyTorch: train form vs archc deploy form",
        "",
        f"intra-op threads: {args.eager_threads}. MACs: multiply-adds per sample the graph "
        "executes (pycls' count plus one per element of every BatchNorm that remains).",
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
        "## Achieved throughput of the deploy form vs the convolution ceiling",
        "",
        "Ceiling: a "
        + next(iter(ceiling.values())).document()["conv"]
        + ", timed in every installed runtime at fp32 (interleaved rounds, median; "
        "`archc.backends.bench.conv_ceiling`), the fastest one's GFLOP/s: "
        + ", ".join(f"{_best(ceiling[t])} at {t} thread(s)" for t in sorted(ceiling))
        + ". GFLOP/s = 2 x archc's multiply-add count / median time.",
        "",
        "| spec | eager deploy | fraction of ceiling | ORT archc "
        f"({max(args.ort_threads)} threads) | fraction |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        flop = 2 * r["flops_deploy"] * args.batch
        eager = flop / r["eager"]["deploy"].median / 1e9
        ort_threads = max(args.ort_threads)
        ort = flop / r["ort"][f"archc@{ort_threads}"].median / 1e9
        lines.append(
            f"| {r['name']} | {eager:.1f} GFLOP/s | "
            f"{eager / ceiling[args.eager_threads].best('fp32').gflops:.0%} | {ort:.1f} GFLOP/s | "
            f"{ort / ceiling[ort_threads].best('fp32').gflops:.0%} |"
        )
    return "\n".join(lines)


def _best(ceiling) -> str:
    row = ceiling.best("fp32")
    return f"{row.gflops:.1f} GFLOP/s ({row.runtime})"


def pass_cost_section(rows: list[dict], args) -> str:
    def median(values: list[float]) -> str:
        return f"{statistics.median(values):.2f} s [{min(values):.2f}-{max(values):.2f}]"

    lines = [
        "## Pass cost: the default pipeline on graphs of growing size",
        "",
        f"`python bench/run.py --sections pass-cost`: {args.pass_cost_rounds} rounds, each running "
        "every graph once with verification off and once with it on (median [min-max] of the "
        "rounds; time after `import`, the graph already built). *Passes* is `run_pipeline` with "
        "`verify=False`: copying the graph structure, one shape propagation (a real run for "
        "graphs up to 100M params, meta tensors beyond), the seven passes and their reports. "
        "*Verification* is what verification adds: the float64 "
        "copy, the float64 reference run, a float64 run after every pass that changed the graph, "
        "and the result's float32 check. `depthN` is N RepVGG-style train-form blocks of 64 "
        "channels at 32x32, each folded and merged; its per-node time shows the cost is linear in "
        "graph size.",
        "",
        f"Machine: {machine()}.",
        "",
        "| graph | nodes | params | passes (verify off) | ms per node | verification | "
        "total with verification |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        per_node = statistics.median(row["passes"]) / row["nodes"] * 1e3
        lines.append(
            f"| {row['name']} | {row['nodes']} | {row['params'] / 1e6:.1f}M | "
            f"{median(row['passes'])} | {per_node:.2f} | {median(row['verification'])} | "
            f"{median(row['verify_on'])} |"
        )
    return "\n".join(lines)


IMPORT_TORCH = ["-c", "import torch"]
SMALL_GFLOPS = 1.0  # specs up to this many GFLOPs are held to TOOL_COST_BOUND
TOOL_COST_BOUND = 5.0  # x import torch, median of the per-round ratios
# Other ways to build one spec, timed in the small specs' rounds: label -> python's arguments
TOOL_COST_VARIANTS = {
    "archc build specs/regnetx_600mf.yaml -o model.onnx --onnx-exporter torch": [
        "-m", "archc", "build", "specs/regnetx_600mf.yaml", "-o", "{folder}/model.onnx",
        "--onnx-exporter", "torch"],
    # torch imported before archc's CLI runs: OpenMP keeps torch's default wait policy
    "archc build specs/mobilenet_v3_large.yaml -o model.onnx, OpenMP's default wait policy": [
        "-c", "import sys, torch; from archc.cli.main import main; sys.exit(main(['build', "
        "'specs/mobilenet_v3_large.yaml', '-o', '{folder}/model.onnx']))"],
}


@dataclass
class ToolCost:
    """The wall times of one command over its rounds, each next to the `import torch` run just
    before it."""

    gflops: float | None = None  # of the spec built (archc's count), None for a variant
    times: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)  # time / the paired import torch

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)


def shipped_spec_gflops() -> dict[str, float]:
    """Every shipped spec and its GFLOPs by archc's count (multiply-adds per sample at the spec's
    input size, `archc.frontend.analytic_complexity`, equal to the graph's count), smallest
    first."""
    from archc.frontend.analytic_complexity import spec_complexity
    from archc.frontend.loading import load_spec

    gflops = {path.stem: spec_complexity(load_spec(path))[0] / 1e9
              for path in (ROOT / "specs").glob("*.yaml")}
    return dict(sorted(gflops.items(), key=lambda item: (item[1], item[0])))


def _wall_time(arguments: list[str]) -> float:
    start = time.perf_counter()
    run = subprocess.run([sys.executable, *arguments], capture_output=True, text=True, cwd=ROOT)
    elapsed = time.perf_counter() - start
    if run.returncode != 0:
        raise SystemExit(f"`{' '.join(arguments)}` failed: {run.stderr.strip()[-2000:]}")
    return elapsed


def bench_tool_cost(rounds: int, large_rounds: int) -> tuple[dict[str, ToolCost], list[float]]:
    """`archc build SPEC -o model.onnx` of every shipped spec, each run in a fresh process right
    after a fresh `python -c 'import torch'`, its ratio to that run. Rounds interleave the specs:
    each round builds every spec once, smallest first; specs up to SMALL_GFLOPS get `rounds`
    rounds and larger ones `large_rounds` (their builds take up to a minute each). The variants
    run in the small specs' rounds. Returns the costs and every `import torch` time."""
    costs = {name: ToolCost(gflops) for name, gflops in shipped_spec_gflops().items()}
    commands = {name: ["-m", "archc", "build", f"specs/{name}.yaml", "-o", "{folder}/model.onnx"]
                for name in costs}
    commands.update(TOOL_COST_VARIANTS)
    costs.update({label: ToolCost() for label in TOOL_COST_VARIANTS})
    imports: list[float] = []
    with tempfile.TemporaryDirectory() as folder:
        for round_index in range(max(rounds, large_rounds)):
            for label, arguments in commands.items():
                gflops = costs[label].gflops
                wanted = rounds if gflops is None or gflops <= SMALL_GFLOPS else large_rounds
                if round_index >= wanted:
                    continue
                print(f"tool cost: round {round_index + 1}, {label}", file=sys.stderr, flush=True)
                imports.append(_wall_time(IMPORT_TORCH))
                elapsed = _wall_time([a.format(folder=folder) for a in arguments])
                costs[label].times.append(elapsed)
                costs[label].ratios.append(elapsed / imports[-1])
    return costs, imports


def tool_cost_section(costs: dict[str, ToolCost], imports: list[float], rounds: int,
                      large_rounds: int) -> str:
    specs = {name: cost for name, cost in costs.items() if cost.gflops is not None}
    small = {name: cost for name, cost in specs.items() if cost.gflops <= SMALL_GFLOPS}
    over = [name for name, cost in small.items() if cost.ratio > TOOL_COST_BOUND]
    worst = max(small, key=lambda name: small[name].ratio)
    slowest = max(specs, key=lambda name: statistics.median(specs[name].times))
    slowest_time = statistics.median(specs[slowest].times)
    verdict = (f"all {len(small)} within {TOOL_COST_BOUND:g}x `import torch`" if not over else
               f"{len(over)} of {len(small)} over {TOOL_COST_BOUND:g}x `import torch`: "
               f"{', '.join(over)}")
    lines = [
        "## Tool cost",
        "",
        "`archc build SPEC -o model.onnx` of every shipped spec, each in a fresh process right "
        "after a fresh `python -c 'import torch'` (`python bench/run.py --sections tool-cost`); "
        "a spec's ratio is the median over rounds of its build time over that `import torch`, "
        "so both see the same load. Rounds interleave the specs (each round builds every spec "
        f"once); specs up to {SMALL_GFLOPS:g} GFLOP get {rounds} rounds "
        f"(`--tool-cost-rounds`), larger ones {large_rounds} (`--tool-cost-large-rounds`). "
        "GFLOPs are archc's count: multiply-adds per sample at the spec's input size. "
        "`archc build` lowers the spec, folds BN, verifies every pass that changed the graph in "
        "float64 and the fp32 result, writes the ONNX file (archc's own translation) and checks "
        "it in ONNX Runtime at two batch sizes. The CLI lets idle OpenMP threads sleep "
        "(`archc/cli/main.py`); the row with OpenMP's default wait policy is the same build "
        "of mobilenet_v3_large with torch imported first, so that they spin between ops as "
        "they do by default.",
        "",
        f"Machine: {machine()}.",
        "",
        f"`import torch`: {statistics.median(imports):.2f} s median "
        f"[{min(imports):.2f}-{max(imports):.2f}] over {len(imports)} runs. Specs up to "
        f"{SMALL_GFLOPS:g} GFLOP: {verdict} (largest ratio: {worst}, "
        f"{small[worst].ratio:.2f}x). Slowest build: {slowest}, {slowest_time:.1f} s "
        f"({specs[slowest].ratio:.1f}x `import torch`).",
        "",
        f"| spec | GFLOPs | rounds | build, median | range | x import torch | "
        f"within {TOOL_COST_BOUND:g}x |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, cost in costs.items():
        gflops = "-" if cost.gflops is None else f"{cost.gflops:.2f}"
        held = cost.gflops is not None and cost.gflops <= SMALL_GFLOPS
        within = ("yes" if cost.ratio <= TOOL_COST_BOUND else "**no**") if held else "-"
        label = name if cost.gflops is not None else f"`{name}`"
        lines.append(f"| {label} | {gflops} | {len(cost.times)} | "
                     f"{statistics.median(cost.times):.2f} s | {min(cost.times):.2f}-"
                     f"{max(cost.times):.2f} s | {cost.ratio:.2f} | {within} |")
    return "\n".join(lines)


def gpu_section(gpu: dict[str, dict[str, Timing]], args) -> str:
    lines = ["## GPU", ""]
    if not gpu:
        lines += [
            "Not measured: this machine has no CUDA device. On a machine with one, the "
            "harness fills this section: the deploy form in fp32 NCHW, fp32 channels_last, "
            "fp16 channels_last, and fp16 channels_last after `align_channels` (multiple 8),"
            " interleaved, batch `--gpu-batch`.",
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
    return "\n".join(lines)


def write_sections(path: Path, sections: dict[str, str]) -> str:
    """Replace (or append) each named section of the markdown file; keep the others."""
    text = path.read_text() if path.exists() else "# Performance\n"
    for name, body in sections.items():
        begin, end = f"<!-- begin: {name} -->", f"<!-- end: {name} -->"
        block = f"{begin}\n{body.rstrip()}\n{end}"
        if begin in text and end in text:
            before, rest = text.split(begin, 1)
            text = before + block + rest.split(end, 1)[1]
        else:
            text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated sections to measure: {', '.join(SECTIONS)}")
    parser.add_argument("--specs", default=",".join(DEFAULT_SPECS),
                        help="specs of the deploy and gpu sections")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds per timing")
    parser.add_argument("--iters", type=int, default=5, help="runs per configuration and round")
    parser.add_argument("--warmup", type=int, default=20, help="warm-up runs per configuration")
    parser.add_argument("--batch", type=int, default=1, help="batch of the CPU timings")
    parser.add_argument("--input-size", type=int, default=224, help="square input side")
    parser.add_argument("--eager-threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--ort-threads", default="1,2",
                        help="ONNX Runtime intra-op thread counts to compare")
    parser.add_argument("--tool-cost-rounds", type=int, default=3,
                        help=f"tool-cost rounds of the specs up to {SMALL_GFLOPS:g} GFLOPs")
    parser.add_argument("--tool-cost-large-rounds", type=int, default=1,
                        help=f"tool-cost rounds of the specs above {SMALL_GFLOPS:g} GFLOPs")
    parser.add_argument("--pass-cost-specs", default=",".join(PASS_COST_SPECS),
                        help="zoo specs of the pass-cost section")
    parser.add_argument("--pass-cost-rounds", type=int, default=3,
                        help="rounds of the pass-cost section")
    parser.add_argument("--family-size", type=int, default=64,
                        help="input side of the families section's networks")
    parser.add_argument("--gpu-batch", type=int, default=32, help="batch of the GPU timings")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "performance.md",
                        help="the markdown file whose sections are rewritten")
    args = parser.parse_args()
    args.ort_threads = [int(t) for t in args.ort_threads.split(",")]
    args.pass_cost_specs = [s for s in args.pass_cost_specs.split(",") if s]
    wanted = args.sections.split(",")
    unknown = sorted(set(wanted) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section {unknown[0]!r}; sections: {', '.join(SECTIONS)}")

    sections = {}
    if "deploy" in wanted:
        from archc.backends.bench import conv_ceiling

        ceiling = {t: conv_ceiling(t, args.rounds, dtypes=("fp32",))
                   for t in sorted({*args.ort_threads, args.eager_threads})}
        results = []
        for name in args.specs.split(","):
            print(f"benchmarking {name} ...", file=sys.stderr, flush=True)
            results.append(bench_spec(name, args))
        sections["deploy"] = deploy_section(results, ceiling, args)
    if "families" in wanted:
        sections["families"] = families_section(bench_families(args), args)
    if "pass-cost" in wanted:
        print("benchmarking the pipeline's own cost ...", file=sys.stderr, flush=True)
        sections["pass-cost"] = pass_cost_section(bench_pass_cost(args), args)
    if "tool-cost" in wanted:
        rounds = (args.tool_cost_rounds, args.tool_cost_large_rounds)
        sections["tool-cost"] = tool_cost_section(*bench_tool_cost(*rounds), *rounds)
    if "gpu" in wanted:
        import torch

        gpu = {}
        if torch.cuda.is_available():
            for name in args.specs.split(","):
                print(f"benchmarking {name} on {torch.cuda.get_device_name()} ...",
                      file=sys.stderr)
                gpu[name] = bench_gpu(name, args)
        sections["gpu"] = gpu_section(gpu, args)
    print(write_sections(args.out, sections))


if __name__ == "__main__":
    main()
