"""`archc bench MODEL|SPEC`: the model's deploy form timed in every installed runtime against its
train form, each runtime checked against float64 first (`archc.backends.bench`).

`add_commands` adds the parser to `archc.cli.main`'s subcommands; `HANDLERS` maps the command to
its handler. Parsing imports nothing heavy.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from archc.cli import arguments
from archc.cli.build import add_input_size
from archc.cli.output import Output

MODEL_FORMATS = (".pt", ".pt2")


def add_commands(commands) -> None:
    """Add `bench` to the `archc` subcommands."""
    bench = commands.add_parser(
        "bench",
        help="time a model's deploy form in every installed runtime (ONNX Runtime, OpenVINO, "
        "PyTorch, torch.compile), each checked against float64",
        description="Build SPEC (or read MODEL: an archc checkpoint .pt or a torch.export "
        ".pt2), run the default passes, and time the deploy form in each runtime of "
        "--runtimes against the train form in eager PyTorch: interleaved rounds after "
        "warm-ups, the median and spread, the load average, ratios to the fastest and to the "
        "train form. A runtime that is not installed, cannot load the model or disagrees with "
        "the float64 reference beyond its precision is left out, with the reason.",
    )
    bench.add_argument("model", metavar="MODEL|SPEC",
                       help="a spec file or shipped spec's name, or a .pt / .pt2 model")
    bench.add_argument(
        "--runtimes", type=arguments.runtime_list, default=list(arguments.RUNTIME_NAMES),
        metavar="A,B", help=f"runtimes to time, of {', '.join(arguments.RUNTIME_NAMES)} "
        "(default: all; the ones not installed are left out with the reason)")
    bench.add_argument("--batch", type=arguments.positive_int, default=1, metavar="N",
                       help="batch size (default 1)")
    add_input_size(bench)
    bench.add_argument("--threads", type=arguments.positive_int, default=None, metavar="T",
                       help="intra-op threads of every runtime (default: the cores this process "
                       "may use)")
    bench.add_argument("--rounds", type=arguments.positive_int, default=7, metavar="R",
                       help="interleaved timing rounds (default 7)")
    bench.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                       help="precision of the deploy form: fp32 (default), or bf16 / fp16 in "
                       "the runtimes that compute in them (OpenVINO's inference precision, "
                       "PyTorch on a cast copy); the others are left out with the reason")
    bench.add_argument("--no-ceiling", dest="ceiling", action="store_false",
                       help="skip the convolution ceiling (a large dense 3x3 conv timed in "
                       "every installed runtime at fp32 and bf16, in the same rounds as the "
                       "model; each row's GFLOP/s is reported as a fraction of it)")
    bench.add_argument("--seed", type=arguments.seed, default=0,
                       help="weight and input seed (default 0)")
    bench.add_argument("--rtol", type=arguments.open_unit_interval, default=1e-5,
                       help="fp32 tolerance against float64, raised to 10x the model's own "
                       "rounding where that is larger (default 1e-5)")
    bench.add_argument("--json", action="store_true",
                       help="print one machine-readable JSON report on stdout instead of text")


def _bench(args: argparse.Namespace) -> int:
    out = Output(args)
    train, shape, name = _train_form(args)
    import archc.passes  # noqa: F401 - registers the catalogue
    from archc.backends.bench import bench
    from archc.ir.init import random_input
    from archc.ir.verify import artifact_tolerance
    from archc.rewrite.pipeline import PassContext, resolve_pipeline, run_pipeline

    example = random_input(shape, args.seed)
    out.progress(f"{name}: running the default passes")
    result = run_pipeline(train, resolve_pipeline("default"),
                          PassContext(example_inputs=(example,), rtol=args.rtol, seed=args.seed))
    threads = args.threads or len(os.sched_getaffinity(0))
    report = bench(train, result.graph_module, example, runtimes=args.runtimes, threads=threads,
                   rounds=args.rounds, tolerance=artifact_tolerance(args.rtol, result.noise),
                   dtype=args.dtype, ceiling=args.ceiling, progress=out.progress)
    out.say(_table(report, name, shape))
    out.report({"command": "bench", "name": name, "source": str(args.model),
                "input_shape": list(shape), **report.document()})
    return 0


def _train_form(args: argparse.Namespace):
    """The model as given (eval mode), its benchmark input shape and its name."""
    if Path(args.model).suffix.lower() in MODEL_FORMATS:
        from archc.backends.importers import load_model

        model = load_model(Path(args.model))
        shape = model.input_shape or (1, 3, 224, 224)
        side = args.input_size or shape[-1]
        return model.graph_module.eval(), (args.batch, shape[1], side, side), model.name
    from archc.cli.resources import preflight
    from archc.frontend.loading import load_spec

    spec = load_spec(args.model)
    preflight(spec, batch=args.batch, input_size=args.input_size, budget=None,
              source=str(args.model))
    from archc.frontend import lower

    gm = lower.build(spec, seed=args.seed)
    return gm.eval(), lower.input_shape(spec, args.batch, args.input_size), spec.name


def _table(report, name: str, shape) -> str:
    fastest = report.fastest().timing.median
    train = report.train_form().timing.median
    lines = [f"{name} at {'x'.join(map(str, shape))}, {report.dtype}, {report.threads} thread"
             f"{'s' if report.threads > 1 else ''}, {report.rounds} interleaved rounds of "
             f"{report.iterations} runs; load average "
             f"{report.load_before[0]:.2f} before, {report.load_after[0]:.2f} after",
             f"{'runtime':<20} {'precision':<9} {'median':>10} {'spread (round medians)':>24} "
             f"{'vs fastest':>10} {'vs train':>9} {'GFLOP/s':>8} {'of ceiling':>10}  "
             f"error vs {report.reference}"]
    for row in sorted(report.rows, key=lambda row: row.timing.median):
        fraction = report.fraction(row)
        lines.append(
            f"{row.runtime:<20} {row.precision:<9} {row.timing.median * 1e3:>7.2f} ms "
            f"{_spread(row):>24} {row.timing.median / fastest:>9.2f}x "
            f"{train / row.timing.median:>8.2f}x {row.gflops:>8.1f} "
            f"{'-' if fraction is None else f'{fraction:.0%}':>10}  {row.relative_error:.1e} "
            f"(tolerance {row.tolerance:.1e})")
    lines += [f"left out: {runtime}: {reason}" for runtime, reason in report.left_out.items()]
    lines.append("vs fastest: time / the fastest's; vs train: the train form's time / time "
                 "(a speed-up); GFLOP/s: 2 x executed multiply-adds / time")
    if report.ceiling is not None:
        lines += _ceiling_lines(report.ceiling)
    return "\n".join(lines)


def _spread(row) -> str:
    return f"{min(row.timing.rounds) * 1e3:.2f}-{max(row.timing.rounds) * 1e3:.2f} ms"


def _ceiling_lines(ceiling) -> list[str]:
    batch, channels, side = ceiling.shape[0], ceiling.shape[1], ceiling.shape[2]
    best = [f"{precision} {row.gflops:.1f} GFLOP/s ({row.runtime})"
            for precision in ("fp32", "bf16", "fp16")
            if (row := ceiling.best(precision)) is not None]
    lines = [f"conv ceiling (3x3 conv {channels}->{channels} at {side}x{side}, batch {batch}, "
             f"in the same rounds): {', '.join(best) or 'no runtime measured it'}; "
             "of ceiling: a row's GFLOP/s / the ceiling at its precision"]
    for row in sorted(ceiling.rows, key=lambda row: -row.gflops):
        lines.append(f"  {row.runtime:<18} {row.precision:<9} {row.timing.median * 1e3:>7.2f} ms "
                     f"{_spread(row):>24} {row.gflops:>8.1f} GFLOP/s")
    lines += [f"  left out: {name}: {reason}" for name, reason in ceiling.left_out.items()]
    return lines


HANDLERS = {"bench": _bench}
