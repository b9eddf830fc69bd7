"""The `archc` command line.

Argument parsing imports nothing heavy: `archc --help` and argument errors never import torch.
User errors (`ArchcError`) print one line `error: ...` and exit 2; anything else is an internal bug:
a traceback and exit 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

OUTPUT_FORMATS = (".onnx", ".pt", ".pt2")  # mirrors archc.export.FORMATS without importing torch


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def _output_path(text: str) -> Path:
    path = Path(text)
    if path.suffix.lower() not in OUTPUT_FORMATS:
        raise argparse.ArgumentTypeError(
            f"cannot tell the format of {text!r}: use one of {', '.join(OUTPUT_FORMATS)}"
        )
    return path


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="archc",
        description="archc: a graph-rewriting architecture compiler for convolutional networks.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    build = commands.add_parser(
        "build",
        help="lower a spec to a verified ONNX / torch.export / checkpoint file",
        description="Lower SPEC to a torch.fx graph and emit it; the format follows the extension "
        "of OUT: .onnx (single file, verified in ONNX Runtime), .pt2 (torch.export), "
        ".pt (archc checkpoint: spec + state_dict).",
    )
    build.add_argument("spec", type=Path, help="spec file (YAML or JSON)")
    build.add_argument(
        "-o",
        "--output",
        type=_output_path,
        required=True,
        metavar="OUT",
        help="output file: .onnx, .pt2 or .pt",
    )
    build.add_argument(
        "--input-size",
        type=_positive_int,
        metavar="N",
        help="square input side (default: the spec's input.size)",
    )
    build.add_argument(
        "--batch",
        type=_positive_int,
        default=1,
        metavar="N",
        help="batch size of the example input (default 1)",
    )
    build.add_argument(
        "--dynamic-batch",
        action="store_true",
        help="make the batch dimension dynamic (.onnx, .pt2)",
    )
    build.add_argument(
        "--opset", type=_positive_int, default=18, metavar="N", help="ONNX opset (default 18)"
    )
    build.add_argument("--seed", type=int, default=0, help="weight/input seed (default 0)")
    build.add_argument(
        "--init",
        choices=("pycls", "random"),
        default="pycls",
        help="pycls initialisation (default) or random weights with randomized BN "
        "statistics (what verification tests use)",
    )
    build.add_argument("--no-simplify", action="store_true", help="skip onnx-simplifier")
    build.add_argument(
        "--rtol",
        type=float,
        default=1e-5,
        help="relative tolerance of the parity check (default 1e-5)",
    )

    info = commands.add_parser(
        "info",
        help="per-stage complexity table of a spec",
        description="Stages and complexity (flops = multiply-adds, params, "
        "acts; pycls rules, computed from the graph).",
    )
    info.add_argument("spec", type=Path, help="spec file (YAML or JSON)")
    info.add_argument(
        "--input-size",
        type=_positive_int,
        metavar="N",
        help="square input side (default: the spec's input.size)",
    )
    info.add_argument("--json", action="store_true", help="machine-readable output")

    schema = commands.add_parser("schema", help="print the JSON Schema of the spec language")
    schema.add_argument("-o", "--output", type=Path, metavar="FILE", help="write to FILE")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    from archc.errors import ArchcError

    try:
        return {"build": _build, "info": _info, "schema": _schema}[args.command](args)
    except ArchcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def _build(args: argparse.Namespace) -> int:
    from archc.spec import load_spec

    spec = load_spec(args.spec)  # spec errors surface before torch is imported
    from archc import export, lower
    from archc.analysis import complexity_report
    from archc.init import random_input

    gm = lower.build(spec, seed=args.seed, init=args.init)
    shape = lower.input_shape(spec, args.batch, args.input_size)
    report = complexity_report(gm, shape).total
    example = random_input(shape, args.seed)
    suffix = args.output.suffix.lower()
    if suffix == ".onnx":
        emitted = export.export_onnx(
            gm,
            args.output,
            example,
            opset=args.opset,
            dynamic_batch=args.dynamic_batch,
            simplify=not args.no_simplify,
            rtol=args.rtol,
        )
    elif suffix == ".pt2":
        emitted = export.export_program(
            gm, args.output, example, dynamic_batch=args.dynamic_batch, rtol=args.rtol
        )
    else:
        emitted = export.save_checkpoint(gm, spec.to_dict(), args.output, example, rtol=args.rtol)
    print(
        f"{spec.name}: {report.params:,} params, {report.flops / 1e6:,.1f}M flops "
        f"(multiply-adds), {report.acts / 1e6:,.2f}M acts per sample at "
        f"{'x'.join(map(str, shape[1:]))}"
    )
    details = "; ".join([f"{emitted.bytes / 1e6:.1f} MB", *emitted.notes])
    print(f"wrote {emitted.path} ({details})")
    print(
        f"verified with {emitted.verified_with} against eager PyTorch: max abs error "
        f"{emitted.max_abs_error:.2e}, relative {emitted.relative_error:.2e} "
        f"(tolerance {args.rtol:g})"
    )
    return 0


def _info(args: argparse.Namespace) -> int:
    from archc.spec import load_spec

    spec = load_spec(args.spec)
    from archc import lower
    from archc.analysis import complexity_report

    gm = lower.build(spec, device="meta")
    shape = lower.input_shape(spec, 1, args.input_size)
    report = complexity_report(gm, shape)
    rows = []
    stages = spec.stages()
    for name, cx in report.stages.items():
        row = {"stage": name, "flops": cx.flops, "params": cx.params, "acts": cx.acts}
        if name.startswith("s") and name[1:].isdigit():
            stage = stages[int(name[1:]) - 1]
            row.update(
                block=stage.block,
                depth=stage.depth,
                width=stage.width,
                group_width=stage.group_width,
                stride=stage.stride,
                bottleneck=stage.bottleneck,
                se_ratio=stage.se_ratio,
            )
        rows.append(row)
    total = report.total
    if args.json:
        print(
            json.dumps(
                {
                    "name": spec.name,
                    "input_shape": list(shape),
                    "flops": total.flops,
                    "params": total.params,
                    "acts": total.acts,
                    "stages": rows,
                },
                indent=1,
            )
        )
        return 0
    print(f"{spec.name}  input {'x'.join(map(str, shape))}  (flops = multiply-adds)")
    header = (
        f"{'stage':<6} {'block':<15} {'depth':>5} {'width':>6} {'gw':>5} {'stride':>6} "
        f"{'flops':>15} {'params':>12} {'acts':>12}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['stage']:<6} {row.get('block', ''):<15} {row.get('depth', ''):>5} "
            f"{row.get('width', ''):>6} {row.get('group_width') or '':>5} "
            f"{row.get('stride', ''):>6} "
            f"{row['flops']:>15,} {row['params']:>12,} {row['acts']:>12,}"
        )
    print("-" * len(header))
    print(f"{'total':<42} {total.flops:>15,} {total.params:>12,} {total.acts:>12,}")
    return 0


def _schema(args: argparse.Namespace) -> int:
    from archc.spec import json_schema

    text = json.dumps(json_schema(), indent=2) + "\n"
    if args.output is None:
        sys.stdout.write(text)
        return 0
    from archc.fileio import atomic_output

    with atomic_output(args.output) as temporary:
        temporary.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
