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

from archc import cli_space

OUTPUT_FORMATS = (".onnx", ".pt", ".pt2", ".py")
FUSE_FORMATS = (".pt2", ".onnx", ".py")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def _output_path(formats: tuple[str, ...]):
    def parse(text: str) -> Path:
        path = Path(text)
        if path.suffix.lower() not in formats:
            raise argparse.ArgumentTypeError(
                f"cannot tell the format of {text!r}: use one of {', '.join(formats)}"
            )
        return path

    return parse


def _shape(text: str) -> tuple[int, ...]:
    """N,C,H,W (or N,C,L / N,C,D,H,W for 1-D / 3-D convs, N,F for a linear model)."""
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape like 1,3,224,224") from None
    if not 2 <= len(shape) <= 5:
        raise argparse.ArgumentTypeError(
            f"{text!r} has {len(shape)} sizes: give N,C,H,W (2 to 5 sizes, batch first)")
    if min(shape) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape of positive sizes")
    return shape


def _add_deploy_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("deploy form (.onnx, .pt2, .py)")
    group.add_argument(
        "--dtype",
        choices=("fp32", "fp16", "bf16"),
        default="fp32",
        help="cast the emitted model after folding in float32 (default fp32); "
        "verified at 10 units of the format's rounding",
    )
    group.add_argument(
        "--channels-last",
        action="store_true",
        help="emit the PyTorch module and its inputs in torch.channels_last "
        "memory format (.pt2, .py)",
    )


def _pass_option(text: str) -> tuple[str, str]:
    """`PASS.OPTION=VALUE`; the value is parsed by the pass's declared option type."""
    key, sep, value = text.partition("=")
    if not sep or "." not in key:
        raise argparse.ArgumentTypeError(f"{text!r} is not PASS.OPTION=VALUE")
    return key, value


def _add_pass_options(parser: argparse.ArgumentParser, default_text: str) -> None:
    group = parser.add_argument_group("passes")
    group.add_argument(
        "--passes",
        default=None,
        metavar="PIPELINE",
        help=f"'default', 'none' or a comma-separated list of pass names "
        f"({default_text}; `archc passes` lists them)",
    )
    group.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="do not compare outputs before/after each function-preserving pass",
    )
    group.add_argument(
        "--dump-after",
        nargs=2,
        metavar=("PASS|all", "DIR"),
        help="write the graph's code after PASS (or every pass) into DIR",
    )
    group.add_argument(
        "--explain",
        action="store_true",
        help="list every rewrite, and where a rule almost matched, why it refused",
    )
    group.add_argument(
        "--pass-option",
        type=_pass_option,
        action="append",
        default=[],
        metavar="PASS.OPTION=VALUE",
        help="an option of one pass in the pipeline, e.g. align_channels.multiple=16 (repeatable)",
    )
    group.add_argument(
        "--rtol",
        type=float,
        default=1e-5,
        help="relative tolerance of every verification (default 1e-5)",
    )


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
        type=_output_path(OUTPUT_FORMATS),
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
        "--static-batch",
        action="store_true",
        help="fix the batch size of .onnx / .pt2 outputs to --batch (default: any batch size, "
        "verified at two)",
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
    _add_pass_options(build, "default: 'default'; a .pt checkpoint keeps the spec form")
    _add_deploy_options(build)

    fuse = commands.add_parser(
        "fuse",
        help="run the pass pipeline on a checkpoint and emit the deploy form",
        description="Read CKPT (an archc checkpoint .pt, a torch.export program .pt2, or a whole "
        "pickled nn.Module with --trust-pickle), run the passes (default: fold BN, "
        "merge branches and linear convs), verify, and emit OUT: .pt2 (default "
        "<name>.fused.pt2), .onnx, or .py (a standalone module + <name>.weights.pt).",
    )
    fuse.add_argument("checkpoint", type=Path, metavar="CKPT", help=".pt or .pt2 file")
    fuse.add_argument(
        "-o",
        "--output",
        type=_output_path(FUSE_FORMATS),
        metavar="OUT",
        help="output file: .pt2, .onnx or .py (default CKPT's name + .fused.pt2)",
    )
    fuse.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow a whole pickled nn.Module: unpickling runs its code",
    )
    fuse.add_argument(
        "--input-shape",
        type=_shape,
        metavar="N,C,H,W",
        help="example input shape (default: from the spec or the program; for a pickled "
        "module its first layer's channels at 224x224)",
    )
    fuse.add_argument(
        "--opset",
        type=_positive_int,
        default=18,
        metavar="N",
        help="ONNX opset for .onnx output (default 18)",
    )
    fuse.add_argument(
        "--static-batch",
        action="store_true",
        help="fix the batch size of .onnx / .pt2 outputs to the example input's (default: any "
        "batch size, verified at two)",
    )
    fuse.add_argument("--seed", type=int, default=0, help="seed of the verification inputs")
    _add_pass_options(fuse, "default: 'default'")
    _add_deploy_options(fuse)

    commands.add_parser("passes", help="list the registered passes and named pipelines")

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
    cli_space.add_commands(commands)  # space sample|sweep|analyze|fit, train, eval
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    from archc.errors import ArchcError

    try:
        commands = {
            "build": _build,
            "fuse": _fuse,
            "info": _info,
            "schema": _schema,
            "passes": _passes,
            **cli_space.HANDLERS,
        }
        return commands[args.command](args)
    except ArchcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def _build(args: argparse.Namespace) -> int:
    from archc.loading import load_spec

    spec = load_spec(args.spec)  # spec errors surface before torch is imported
    from archc import checkpoint, lower
    from archc.analysis import complexity_report
    from archc.errors import ArchcError
    from archc.init import random_input

    pipeline = _pipeline(args)

    gm = lower.build(spec, seed=args.seed, init=args.init)
    shape = lower.input_shape(spec, args.batch, args.input_size)
    report = complexity_report(gm, shape).total
    example = random_input(shape, args.seed)
    if args.output.suffix.lower() == ".pt":
        if args.passes not in (None, "none") or args.dtype != "fp32" or args.channels_last:
            raise ArchcError(
                "a .pt checkpoint stores the spec's own float32 (train) form; run passes with "
                "`archc fuse model.pt`, or emit .onnx / .pt2 / .py"
            )
        emitted = checkpoint.save_checkpoint(gm, spec.to_dict(), args.output, example,
                                             rtol=args.rtol)
    else:
        gm, noise = _run_passes(gm, args, example, pipeline)
        emitted = _emit(gm, args.output, example, args, spec.name, str(args.spec), noise)
    print(
        f"{spec.name}: {report.params:,} params, {report.flops / 1e6:,.1f}M flops "
        f"(multiply-adds), {report.acts / 1e6:,.2f}M acts per sample at "
        f"{'x'.join(map(str, shape[1:]))} (spec form)"
    )
    _print_emitted(emitted)
    return 0


def _emit(gm, output: Path, example, args: argparse.Namespace, name: str, source: str,
          noise: float | None):
    """Cast to the deploy dtype/layout, then write `output` in the format of its extension,
    verified at `--rtol` or, for a model whose own float32 rounding is larger, at a multiple of
    that rounding (`noise`: measured by the pipeline, else here)."""
    from archc import export, verify
    from archc.errors import ExportError

    suffix = output.suffix.lower()
    if suffix == ".onnx" and args.channels_last:
        raise ExportError(
            "ONNX is NCHW by specification; channels_last is the runtime's "
            "business: use it with .pt2 or .py"
        )
    if suffix == ".onnx" and args.dtype == "bf16":
        raise ExportError(
            "ONNX Runtime on CPU has no bfloat16 Conv, so a bf16 .onnx cannot be "
            "verified: use fp16 for .onnx, or bf16 with .pt2 / .py"
        )
    if noise is None:
        noise = verify.rounding_noise(gm, (example,))
    rtol = verify.artifact_tolerance(args.rtol, noise)
    form = export.deploy_form(
        gm, example, dtype=args.dtype, channels_last=args.channels_last, rtol=rtol
    )
    dynamic_batch = not args.static_batch
    if suffix == ".onnx":
        emitted = export.export_onnx(
            form.graph_module,
            output,
            form.example_input,
            opset=args.opset,
            dynamic_batch=dynamic_batch,
            simplify=not getattr(args, "no_simplify", False),
            rtol=form.rtol,
        )
    elif suffix == ".py":
        from archc.emit_python import emit_python

        emitted = emit_python(
            form.graph_module,
            output,
            form.example_input,
            model_name=name,
            source=source,
            channels_last=args.channels_last,
            rtol=form.rtol,
        )
    else:
        emitted = export.export_program(
            form.graph_module,
            output,
            form.example_input,
            dynamic_batch=dynamic_batch,
            rtol=form.rtol,
        )
    emitted.notes[:0] = form.notes
    emitted.rtol = form.rtol
    return emitted


def _pipeline(args: argparse.Namespace) -> tuple[list[str], dict]:
    """The pass names of `--passes` and the checked `--pass-option`s (before any work)."""
    import archc.passes  # noqa: F401 - registers the catalogue
    from archc.pipeline import check_options, resolve_pipeline

    names = resolve_pipeline(args.passes or "default")
    return names, check_options(dict(args.pass_option), names)


def _run_passes(gm, args: argparse.Namespace, example, pipeline: tuple[list[str], dict]):
    """Run the pipeline with the CLI's options; print the per-pass report; return the graph and
    the input model's own rounding error (None if not measured)."""
    from archc.analysis import census, executed_flops
    from archc.pipeline import PassContext, run_pipeline
    from archc.shapes import propagate_shapes

    names, options = pipeline
    if not names:
        return gm, None
    propagate_shapes(gm, [example])
    before = census(gm)
    dump_after, dump_dir = None, None
    if args.dump_after:
        which, folder = args.dump_after
        dump_after = "all" if which == "all" else {which}
        dump_dir = Path(folder)
    ctx = PassContext(
        verify=args.verify,
        rtol=args.rtol,
        example_inputs=(example,),
        seed=args.seed,
        dump_after=dump_after,
        dump_dir=dump_dir,
        explain=args.explain,
        measure=executed_flops,
        options=options,
    )
    result = run_pipeline(gm, names, ctx)
    print(result.format())
    print(f"deploy form: {before.changes(census(result.graph_module))}")
    fired = ", ".join(f"{rule} {count}" for rule, count in result.fired.most_common())
    print(f"rewrites: {fired or 'none'}")
    return result.graph_module, result.noise


def _fuse(args: argparse.Namespace) -> int:
    from archc.importers import check_example, load_model
    from archc.init import random_input

    pipeline = _pipeline(args)
    model = load_model(args.checkpoint, trust_pickle=args.trust_pickle)
    shape = args.input_shape or model.input_shape or (1, 3, 224, 224)
    example = random_input(shape, args.seed)
    check_example(model.graph_module, example, str(args.checkpoint))
    print(f"{model.name}: {model.kind}, example input {'x'.join(map(str, shape))}")
    gm, noise = _run_passes(model.graph_module, args, example, pipeline)
    output = args.output or args.checkpoint.with_name(f"{model.name}.fused.pt2")
    emitted = _emit(gm, output, example, args, model.name, args.checkpoint.name, noise)
    _print_emitted(emitted)
    return 0


def _print_emitted(emitted) -> None:
    details = "; ".join([f"{emitted.bytes / 1e6:.1f} MB", *emitted.notes])
    print(f"wrote {emitted.path} ({details})")
    print(
        f"verified with {emitted.verified_with} against eager PyTorch: max abs error "
        f"{emitted.max_abs_error:.2e}, relative {emitted.relative_error:.2e} "
        f"(tolerance {emitted.rtol:g})"
    )


def _passes(args: argparse.Namespace) -> int:
    import archc.passes  # noqa: F401 - registers the catalogue
    from archc.pipeline import list_passes, pipelines

    for info in list_passes():
        kind = "exact" if info.preserves_function else "CHANGES THE FUNCTION"
        print(f"{info.name:<28} {kind:<21} {info.summary}")
        for option in info.options:
            print(f"    option {info.name}.{option.name} ({option.type.__name__}, default "
                  f"{option.default!r}): {option.help}")
    print()
    for name, names in pipelines().items():
        print(f"pipeline {name}: {', '.join(names) or '(no passes)'}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from archc.loading import load_spec

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
                groups=stage.groups,
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
        f"{'stage':<6} {'block':<17} {'depth':>5} {'width':>6} {'groups':>7} {'stride':>6} "
        f"{'flops':>15} {'params':>12} {'acts':>12}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['stage']:<6} {row.get('block', ''):<17} {row.get('depth', ''):>5} "
            f"{row.get('width', ''):>6} {_groups_text(row):>7} "
            f"{row.get('stride', ''):>6} "
            f"{row['flops']:>15,} {row['params']:>12,} {row['acts']:>12,}"
        )
    print("-" * len(header))
    print(f"{'total':<46} {total.flops:>15,} {total.params:>12,} {total.acts:>12,}")
    return 0


def _groups_text(row: dict) -> str:
    """`gw 24` (channels per group), `g 3` (number of groups) or blank (dense)."""
    if row.get("group_width"):
        return f"gw {row['group_width']}"
    return f"g {row['groups']}" if row.get("groups") else ""


def _schema(args: argparse.Namespace) -> int:
    from archc.loading import json_schema

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
