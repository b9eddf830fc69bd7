"""Design-space benchmarks: sampling speed, analytic vs graph complexity, sweep throughput.

    python bench/spaces.py                  # design-spaces section of docs/performance.md
    python bench/spaces.py --rounds 5 --out /tmp/spaces.md

Protocol (as bench/run.py): configurations interleaved in rounds, the median of the
rounds reported with their spread [min-max]; ratios compare medians of the same run.

Measured:
- sampling: `Space.samples(n, seed)` (seed = round) for the shipped RegNetX space (360-400 MF
  and the paper's params/acts limits) and AnyNetX_A: samples/s, tries/s and the acceptance rate;
- one model's complexity: the analytic twin (`archc.frontend.analytic_complexity.spec_complexity`)
  vs
  `archc.ir.analysis.complexity` of the built graph (`device="meta"`), on RegNetX samples;
- sweep throughput: `archc space sweep` (a subprocess, as a user runs it: start-up included) of
  tiny RegNetX models (input 32, 2 epochs on digits) with `--workers 1` and `--workers 2`:
  models per minute and the 2-vs-1 ratio; and, to read that ratio, how much work two
  single-thread processes get done at once compared with one.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from run import ROOT, machine  # bench/run.py: the shared protocol helpers

from archc.common.timing import Timing

TINY_REGNETX = ["--set", "base.input.size=32", "--set", "base.num_classes=10",
                "--set", "window.flops=[300000,1000000]", "--set", "window.params=null",
                "--set", "window.acts=null"]


def bench_sampling(rounds: int, n: int) -> dict[str, dict]:
    from archc.space.design_space import SamplingStats, load_space

    spaces = {name: load_space(ROOT / "spaces" / f"{name}.yaml")
              for name in ("regnetx", "anynetx_a")}
    results = {name: {"time": Timing(), "tries": [], "accepted": []} for name in spaces}
    for space in spaces.values():  # warm-up: imports, the first validation
        list(space.samples(5, 0))
    for round_index in range(rounds):
        for name, space in spaces.items():
            stats, start = SamplingStats(), time.perf_counter()
            for _ in space.samples(n, round_index, stats):
                pass
            results[name]["time"].rounds.append(time.perf_counter() - start)
            results[name]["tries"].append(stats.tries)
            results[name]["accepted"].append(stats.accepted)
    return results


def bench_complexity(samples: int) -> dict[str, float]:
    from archc.frontend import lower
    from archc.frontend.analytic_complexity import spec_complexity
    from archc.frontend.loading import spec_from_mapping
    from archc.ir import analysis
    from archc.space.design_space import load_space

    specs = [spec_from_mapping(s.spec)
             for s in load_space(ROOT / "spaces/regnetx.yaml").samples(samples + 1, 99)]
    analysis.complexity(lower.build(specs[0], device="meta"), 224)  # warm-up
    analytic, graph = [], []
    for spec in specs[1:]:
        start = time.perf_counter()
        for _ in range(100):
            spec_complexity(spec)
        analytic.append((time.perf_counter() - start) / 100)
        start = time.perf_counter()
        analysis.complexity(lower.build(spec, device="meta"), spec.input.size)
        graph.append(time.perf_counter() - start)
    return {"analytic": statistics.median(analytic), "graph": statistics.median(graph)}


def bench_sweeps(rounds: int, models: int, epochs: int, folder: Path) -> dict[int, Timing]:
    samples = folder / "samples.jsonl"
    subprocess.run([sys.executable, "-m", "archc", "space", "sample",
                    str(ROOT / "spaces/regnetx.yaml"), "-n", str(models), "-o", str(samples),
                    *TINY_REGNETX], check=True, capture_output=True)
    timings = {1: Timing(), 2: Timing()}
    for round_index in range(rounds):
        for workers in timings:
            results = folder / f"results-{workers}-{round_index}.jsonl"
            command = [sys.executable, "-m", "archc", "space", "sweep", str(samples),
                       "--data", "digits", "--epochs", str(epochs), "--batch-size", "256",
                       "-o", str(results), "--workers", str(workers)]
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True, cwd=ROOT)
            timings[workers].rounds.append(time.perf_counter() - start)
    return timings


CONV_LOOP = ("import time, torch\ntorch.set_num_threads(1)\nx = torch.randn(64, 32, 16, 16)\n"
             "w = torch.randn(32, 32, 3, 3)\nstart = time.perf_counter()\n"
             "for _ in range(300): torch.conv2d(x, w, padding=1)\n"
             "print(time.perf_counter() - start)")


def bench_parallel_cpu(rounds: int) -> dict[int, float]:
    """Seconds of one single-thread conv loop when 1 or 2 copies run at once: how much a second
    worker process can add on this machine."""
    seconds: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(rounds):
        for copies in seconds:
            processes = [subprocess.Popen([sys.executable, "-c", CONV_LOOP],
                                          stdout=subprocess.PIPE, text=True)
                         for _ in range(copies)]
            seconds[copies] += [float(p.communicate()[0]) for p in processes]
    return {copies: statistics.median(values) for copies, values in seconds.items()}


def report(sampling, complexity, sweeps, parallel, args) -> str:
    lines = [
        "## Design spaces",
        "",
        f"Measured by `python bench/spaces.py --rounds {args.rounds}` (protocol in its "
        f"docstring): {machine()}.",
        "",
        f"### Sampling ({args.samples:,} models per round, seed = round)",
        "",
        "| space | time | samples/s | tries/s | acceptance |",
        "|---|---|---|---|---|",
    ]
    for name, result in sampling.items():
        seconds = result["time"].median
        tries = statistics.median(result["tries"])
        accepted = sum(result["accepted"]) / sum(result["tries"])
        lines.append(f"| {name} | {seconds:.1f} s [{min(result['time'].rounds):.1f}-"
                     f"{max(result['time'].rounds):.1f}] | {args.samples / seconds:.0f} | "
                     f"{tries / seconds:,.0f} | {accepted:.2%} |")
    ratio = complexity["graph"] / complexity["analytic"]
    lines += [
        "",
        "### Complexity of one model",
        "",
        f"Median over {args.complexity_samples} RegNetX samples: the analytic twin "
        f"{complexity['analytic'] * 1e6:.0f} us, `archc.ir.analysis.complexity` of the built "
        f"meta-device graph {complexity['graph'] * 1e3:.0f} ms ({ratio:,.0f}x).",
        "",
        f"### Sweep throughput ({args.sweep_models} tiny RegNetX models, input 32, "
        f"{args.sweep_epochs} epochs on digits, `archc space sweep` start-up included)",
        "",
        "| workers | wall time | models/min |",
        "|---|---|---|",
    ]
    for workers, timing in sweeps.items():
        lines.append(f"| {workers} | {timing.median:.1f} s [{min(timing.rounds):.1f}-"
                     f"{max(timing.rounds):.1f}] | {60 * args.sweep_models / timing.median:.1f} |")
    speedup = sweeps[1].median / sweeps[2].median
    scaling = 2 * parallel[1] / parallel[2]
    lines += ["", f"2 workers vs 1: {speedup:.2f}x the throughput. For scale, a single-thread "
              f"conv loop takes {parallel[1]:.2f} s alone and {parallel[2]:.2f} s with a second "
              f"copy running: two processes get {scaling:.2f}x the work of one done on this "
              f"machine, before the workers' start-up (importing torch and scikit-learn in "
              f"each).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per timing")
    parser.add_argument("--samples", type=int, default=1000,
                        help="models drawn per sampling round")
    parser.add_argument("--complexity-samples", type=int, default=5,
                        help="RegNetX samples whose complexity is computed both ways")
    parser.add_argument("--sweep-models", type=int, default=12, help="models per timed sweep")
    parser.add_argument("--sweep-epochs", type=int, default=2, help="epochs per swept model")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "performance.md",
                        help="the markdown file whose design-spaces section is rewritten")
    args = parser.parse_args()
    print("sampling ...", file=sys.stderr, flush=True)
    sampling = bench_sampling(args.rounds, args.samples)
    print("complexity ...", file=sys.stderr, flush=True)
    complexity = bench_complexity(args.complexity_samples)
    print("sweeps ...", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as folder:
        sweeps = bench_sweeps(args.rounds, args.sweep_models, args.sweep_epochs, Path(folder))
    parallel = bench_parallel_cpu(args.rounds)
    from run import write_sections  # bench/run.py, beside this script

    body = report(sampling, complexity, sweeps, parallel, args)
    print(write_sections(args.out, {"design-spaces": body}))


if __name__ == "__main__":
    main()
