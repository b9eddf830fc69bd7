"""The `archc` command line.

Argument parsing imports nothing heavy: `archc --help` and argument errors never import torch, and
every option is checked as it is parsed (`archc.cli.arguments`). One guard (`main`) turns every
failure into one line on stderr: a user's mistake (`ArchcError`, running out of memory, sizes torch
cannot index) is `error: ...` and exit 2; anything else is an archc bug: `internal error: ...` and
exit 1, with the traceback only under `--debug`. Output locations are checked before any work
starts. Progress goes to stderr (one line per pass) when stderr is a terminal or `--progress` asks
for it, so logs and pipes get only results and errors; `--quiet` keeps only errors, `--json` prints
one machine-readable report on stdout instead of the text.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from archc.cli import arguments
from archc.cli import compress as cli_compress
from archc.cli import quant as cli_quant
from archc.cli import space as cli_space
from archc.cli.output import Output
from archc.errors import first_line

OUTPUT_FORMATS = (".onnx", ".pt", ".pt2", ".py")
FUSE_FORMATS = (".pt2", ".onnx", ".py")
CHECKPOINT_FORMATS = (".pt", ".pth", ".pt2")
# The opsets torch's ONNX exporter writes as asked (it raises lower ones to 18 without a word)
ONNX_OPSETS = (18, 24)
INPUT_SIDES = (8, 4096)  # as the spec schema's input.size
# Failures of the machine rather than of archc: one line and exit 2, like a user error
RESOURCE_MESSAGES = ("can't allocate memory", "DefaultCPUAllocator", "out of memory",
                     "overflowed", "integer multiplication overflow", "numel: integer")


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors: `error: archc build: argument --opset: ...`."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see `{self.prog} --help`)\n")


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


def _add_memory_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-memory",
        type=arguments.memory_size,
        metavar="SIZE",
        help="refuse a spec whose estimated peak memory exceeds SIZE (e.g. 8G; default half of "
        "this machine's memory), before allocating anything",
    )


def _add_input_size(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input-size",
        type=arguments.int_in(*INPUT_SIDES, "input side in pixels"),
        metavar="N",
        help=f"square input side, {INPUT_SIDES[0]}..{INPUT_SIDES[1]} (default: the spec's "
        "input.size)",
    )


def _add_opset(parser: argparse.ArgumentParser, help_text: str) -> None:
    low, high = ONNX_OPSETS
    parser.add_argument(
        "--opset", type=arguments.int_in(low, high, "ONNX opsets the exporter writes"),
        default=low, metavar="N", help=f"{help_text} ({low}..{high}; default {low})")
    parser.add_argument(
        "--onnx-exporter", choices=("auto", "archc", "torch"), default="auto",
        help="archc: archc's node-by-node translation; torch: torch.onnx.export (dynamo); auto "
        "(default): archc's, or torch's for a graph with an op archc does not translate")


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
        type=arguments.open_unit_interval,
        default=1e-5,
        help="relative tolerance of the emitted model against the float64 reference, between 0 "
        "and 1 (default 1e-5)",
    )
    parser.add_argument("--json", action="store_true",
                        help="print one machine-readable JSON report on stdout instead of text")


def make_parser() -> argparse.ArgumentParser:
    from archc import __version__

    parser = Parser(
        prog="archc",
        description="archc: a graph-rewriting architecture compiler for convolutional networks.",
    )
    parser.add_argument("--version", action="version", version=f"archc {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    build = commands.add_parser(
        "build",
        help="lower a spec to a verified ONNX / torch.export / checkpoint / Python file",
        description="Lower SPEC to a torch.fx graph, run the passes and emit it; the format "
        "follows the extension of OUT: .onnx (single file, verified in ONNX Runtime), .pt2 "
        "(torch.export), .py (standalone module + weights), .pt (archc checkpoint: spec + "
        "state_dict, the train form).",
    )
    build.add_argument("spec", help="spec file (YAML or JSON) or a shipped spec's name "
                       "(`archc models` lists them)")
    build.add_argument(
        "-o",
        "--output",
        type=arguments.output_path(OUTPUT_FORMATS),
        required=True,
        metavar="OUT",
        help="output file: .onnx, .pt2, .py or .pt",
    )
    _add_input_size(build)
    build.add_argument(
        "--batch",
        type=arguments.positive_int,
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
    _add_opset(build, "ONNX opset")
    build.add_argument("--seed", type=arguments.seed, default=0,
                       help="weight/input seed (default 0)")
    build.add_argument(
        "--init",
        choices=("pycls", "random"),
        default="pycls",
        help="pycls initialisation (default) or random weights with randomized BN "
        "statistics (what verification tests use)",
    )
    build.add_argument("--no-simplify", action="store_true",
                       help="skip onnx-simplifier (it runs on torch.onnx's output only: archc's "
                       "translation has nothing to fold)")
    _add_memory_option(build)
    _add_pass_options(build, "default: 'default'; a .pt checkpoint keeps the spec form")
    _add_deploy_options(build)
    cli_quant.add_chain_options(build)

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
        type=arguments.output_path(FUSE_FORMATS),
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
        type=arguments.shape,
        metavar="N,C,H,W",
        help="example input shape (default: from the spec or the program; for a pickled "
        "module its first layer's channels at 224x224)",
    )
    _add_opset(fuse, "ONNX opset of .onnx output")
    fuse.add_argument(
        "--static-batch",
        action="store_true",
        help="fix the batch size of .onnx / .pt2 outputs to the example input's (default: any "
        "batch size, verified at two)",
    )
    fuse.add_argument("--seed", type=arguments.seed, default=0,
                      help="seed of the verification inputs")
    _add_pass_options(fuse, "default: 'default'")
    _add_deploy_options(fuse)
    cli_quant.add_chain_options(fuse)

    commands.add_parser("passes", help="list the registered passes, their options and the "
                        "named pipelines")

    info = commands.add_parser(
        "info",
        help="per-stage complexity table of a spec or a checkpoint",
        description="Stages and complexity (flops = multiply-adds, params, acts; pycls rules, "
        "computed from the graph) of a spec (file or shipped name), an archc checkpoint (.pt) "
        "or a torch.export program (.pt2).",
    )
    info.add_argument("spec", metavar="SPEC|CKPT",
                      help="spec file, shipped spec name, .pt checkpoint or .pt2 program")
    _add_input_size(info)
    info.add_argument("--trust-pickle", action="store_true",
                      help="allow a whole pickled nn.Module: unpickling runs its code")
    info.add_argument("--json", action="store_true", help="machine-readable output")

    models = commands.add_parser(
        "models", help="list the shipped reference specs with their params and flops",
        description="The specs that ship with archc; each builds by name "
        "(`archc build regnetx_600mf -o m.onnx`). Complexity at each spec's own input size.")
    models.add_argument("--filter", metavar="TEXT", default="",
                        help="only names containing TEXT (or matching it as a glob: 'regnety_*')")
    models.add_argument("--json", action="store_true", help="machine-readable output")

    show = commands.add_parser(
        "show", help="draw the graph, blocks collapsed, before and after the passes",
        description="Draw SPEC|CKPT's graph as boxes, one per block (qualified-name prefix), "
        "before and after the passes side by side, the blocks the passes changed highlighted.")
    show.add_argument("spec", metavar="SPEC|CKPT",
                      help="spec file, shipped spec name, .pt checkpoint or .pt2 program")
    show.add_argument("-o", "--output", required=True, metavar="OUT",
                      type=arguments.output_path((".svg", ".png")), help="image: .svg or .png")
    show.add_argument("--after", metavar="PASS", default=None,
                      help="the graph after this pass of the pipeline (default: after all)")
    show.add_argument("--passes", default=None, metavar="PIPELINE",
                      help="pipeline to run (default 'default')")
    show.add_argument("--depth", type=arguments.int_in(1, 6, "name components per box"),
                      default=2, help="name components that make one box (default 2: s1.b1)")
    show.add_argument("--trust-pickle", action="store_true",
                      help="allow a whole pickled nn.Module: unpickling runs its code")

    schema = commands.add_parser("schema", help="print the JSON Schema of the spec language")
    schema.add_argument("-o", "--output", type=Path, metavar="FILE", help="write to FILE")
    cli_space.add_commands(commands)  # space sample|sweep|analyze|fit, train, eval
    cli_compress.add_commands(commands)  # prune, lowrank, reduce
    cli_quant.add_commands(commands)  # quantize, qat
    for command in _all_parsers(parser):
        command.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS,
                             help="print errors only")
        command.add_argument("--progress", action="store_true", default=argparse.SUPPRESS,
                             help="a progress line per step on stderr even when it is not a "
                             "terminal (the default on one)")
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show the traceback of an internal error")
    return parser


def _all_parsers(parser: argparse.ArgumentParser):
    """`parser` and every (nested) subcommand parser."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                yield from _all_parsers(child)


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    from archc.errors import ArchcError

    debug = getattr(args, "debug", False)
    try:
        problem = _output_problem(args)
        if problem:
            raise ArchcError(problem)
        commands = {
            "build": _build,
            "fuse": _fuse,
            "info": _info,
            "models": _models,
            "show": _show,
            "schema": _schema,
            "passes": _passes,
            **cli_space.HANDLERS,
            **cli_compress.HANDLERS,
            **cli_quant.HANDLERS,
        }
        return commands[args.command](args)
    except ArchcError as exc:
        for line in exc.lines() if hasattr(exc, "lines") else [str(exc)]:
            print(f"error: {line}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except (MemoryError, OverflowError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and not _is_resource_failure(exc):
            return _internal_error(exc, debug)
        if debug:
            import traceback

            traceback.print_exc()
        print(f"error: this machine cannot hold the model ({first_line(exc)}); make it smaller "
              "or use --max-memory to refuse such specs up front", file=sys.stderr)
        return 2
    except Exception as exc:  # an archc bug: one line, the traceback with --debug
        return _internal_error(exc, debug)


def _is_resource_failure(exc: BaseException) -> bool:
    return any(message in str(exc) for message in RESOURCE_MESSAGES)


def _internal_error(exc: BaseException, debug: bool) -> int:
    if debug:
        import traceback

        traceback.print_exc()
    print(f"internal error: {first_line(exc)} (an archc bug; "
          f"{'please report it' if debug else 'rerun with --debug for the traceback'})",
          file=sys.stderr)
    return 1


def _output_problem(args: argparse.Namespace) -> str | None:
    """Why the command's output file cannot be written, checked before any work."""
    output = getattr(args, "output", None)
    if getattr(args, "int8", None) is not None:  # build / fuse --int8 --calib DATA
        problem = cli_quant.chain_problem(args, Path(output or ".pt2"))
        if problem:
            return problem
    return arguments.check_output_location(Path(output)) if output is not None else None


def _build(args: argparse.Namespace) -> int:
    from archc.cli.resources import preflight
    from archc.frontend.loading import load_spec

    out = Output(args)
    spec = load_spec(args.spec)  # spec errors surface before torch is imported
    preflight(spec, batch=args.batch, input_size=args.input_size, budget=args.max_memory,
              source=str(args.spec))
    pipeline = _pipeline(args)
    from archc.backends import checkpoint
    from archc.errors import ArchcError
    from archc.frontend import lower
    from archc.ir.analysis import complexity_report
    from archc.ir.init import random_input

    if args.output.suffix.lower() == ".pt" and (
            args.passes not in (None, "none") or args.dtype != "fp32" or args.channels_last):
        raise ArchcError(
            "a .pt checkpoint stores the spec's own float32 (train) form; run passes with "
            "`archc fuse model.pt`, or emit .onnx / .pt2 / .py"
        )
    out.progress(f"{spec.name}: lowering {sum(s.depth for s in spec.stages())} blocks")
    gm = lower.build(spec, seed=args.seed, init=args.init)
    shape = lower.input_shape(spec, args.batch, args.input_size)
    report = complexity_report(gm, shape).total
    example = random_input(shape, args.seed)
    document = {"command": "build", "name": spec.name, "source": str(args.spec),
                "input_shape": list(shape),
                "spec_form": {"params": report.params, "flops": report.flops,
                              "acts": report.acts}}
    out.say(
        f"{spec.name}: {report.params:,} params, {_count(report.flops)} flops "
        f"(multiply-adds), {_count(report.acts)} acts per sample at "
        f"{'x'.join(map(str, shape[1:]))} (spec form)"
    )
    if args.output.suffix.lower() == ".pt":
        emitted = checkpoint.save_checkpoint(gm, spec.to_dict(), args.output, example,
                                             rtol=args.rtol)
    else:
        gm, noise = _run_passes(gm, args, example, pipeline, out, document)
        emitted = _emit(gm, args.output, example, args, spec.name, str(args.spec), noise)
    _print_emitted(emitted, out, document, args)
    return 0


def _count(value: int) -> str:
    """A count in M (below 10 G) or G, the one unit per size used throughout the CLI."""
    return f"{value / 1e9:,.2f}G" if value >= 10e9 else f"{value / 1e6:,.1f}M"


def _emit(gm, output: Path, example, args: argparse.Namespace, name: str, source: str,
          noise: float | None):
    """Cast to the deploy dtype/layout, then write `output` in the format of its extension,
    verified at `--rtol` or, for a model whose own float32 rounding is larger, at a multiple of
    that rounding (`noise`: measured by the pipeline, else here)."""
    from archc.backends import export
    from archc.errors import ExportError
    from archc.ir import verify

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
            exporter=args.onnx_exporter,
        )
    elif suffix == ".py":
        from archc.backends.emit_python import emit_python

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
    from archc.rewrite.pipeline import check_options, resolve_pipeline

    names = resolve_pipeline(args.passes or "default")
    return names, check_options(dict(getattr(args, "pass_option", [])), names)


def _run_passes(gm, args: argparse.Namespace, example, pipeline: tuple[list[str], dict],
                out: Output, document: dict):
    """Run the pipeline with the CLI's options; print the per-pass report; return the graph and
    the input model's own rounding error (None if not measured)."""
    from archc.ir.analysis import census, executed_flops
    from archc.ir.shapes import has_shapes, propagate_shapes
    from archc.rewrite.pipeline import PassContext, run_pipeline

    names, options = pipeline
    if not names:
        return gm, None
    if not has_shapes(gm):  # `build` has them from the spec form's complexity
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
        progress=out.progress,
    )
    result = run_pipeline(gm, names, ctx)
    after = census(result.graph_module)
    out.say(result.format())
    out.say(f"deploy form: {before.changes(after)}")
    fired = ", ".join(f"{rule} {count}" for rule, count in result.fired.most_common())
    out.say(f"rewrites: {fired or 'none'}")
    document["passes"] = [_pass_document(report) for report in result.reports]
    document["rewrites"] = dict(result.fired)
    document["deploy_form"] = {"convs": after.convs, "linear_layers": after.linears,
                               "normalization_layers": after.norms, "params": after.params,
                               "executed_flops": after.macs}
    document["verification"] = {"max_error_float64": result.max_error,
                                 "artifact_error": result.artifact_error,
                                 "model_noise": result.noise, "tolerance": result.tolerance}
    return result.graph_module, result.noise


def _pass_document(report) -> dict:
    sizes = {}
    for when, stats in (("before", report.before), ("after", report.after)):
        if stats is not None:
            sizes[when] = {"nodes": stats.nodes, "params": stats.params,
                           "executed_flops": stats.flops}
    return {"name": report.name, "preserves_function": report.preserves_function,
            "modified": report.modified, "rewrites": len(report.rewrites),
            "refusals": [str(refusal) for refusal in report.refusals],
            "seconds": report.seconds, "verify_seconds": report.verify_seconds,
            "relative_error": report.error, "check": report.check, **sizes}


def _fuse(args: argparse.Namespace) -> int:
    pipeline = _pipeline(args)
    from archc.backends.importers import check_example, load_model
    from archc.ir.init import random_input

    out = Output(args)
    model = load_model(args.checkpoint, trust_pickle=args.trust_pickle)
    shape = args.input_shape or model.input_shape or (1, 3, 224, 224)
    example = random_input(shape, args.seed)
    check_example(model.graph_module, example, str(args.checkpoint))
    out.say(f"{model.name}: {model.kind}, example input {'x'.join(map(str, shape))}")
    document = {"command": "fuse", "name": model.name, "source": str(args.checkpoint),
                "kind": model.kind, "input_shape": list(shape)}
    gm, noise = _run_passes(model.graph_module, args, example, pipeline, out, document)
    output = args.output or args.checkpoint.with_name(f"{model.name}.fused.pt2")
    emitted = _emit(gm, output, example, args, model.name, args.checkpoint.name, noise)
    _print_emitted(emitted, out, document, args)
    return 0


def _print_emitted(emitted, out: Output, document: dict, args=None) -> None:
    details = "; ".join([f"{emitted.bytes / 1e6:.1f} MB", *emitted.notes])
    out.say(f"wrote {emitted.path} ({details})")
    out.say(
        f"verified with {emitted.verified_with} against eager PyTorch: max abs error "
        f"{emitted.max_abs_error:.2e}, relative {emitted.relative_error:.2e} "
        f"(tolerance {emitted.rtol:g})"
    )
    document["output"] = {"path": str(emitted.path), "bytes": emitted.bytes,
                          "notes": list(emitted.notes), "verified_with": emitted.verified_with,
                          "max_abs_error": emitted.max_abs_error,
                          "relative_error": emitted.relative_error, "tolerance": emitted.rtol}
    if args is not None and args.int8:
        document["int8"] = cli_quant.chain(args, emitted.path, out)
    out.report(document)


def _passes(args: argparse.Namespace) -> int:
    import archc.passes  # noqa: F401 - registers the catalogue
    from archc.rewrite.pipeline import list_passes, pipelines

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
    source = Path(args.spec)
    if source.suffix.lower() in CHECKPOINT_FORMATS:
        gm, name, stages, shape = _checkpoint_graph(source, args)
    else:
        from archc.cli.resources import preflight
        from archc.frontend.loading import load_spec

        spec = load_spec(args.spec)
        preflight(spec, input_size=args.input_size, source=str(args.spec), allocates=False)
        from archc.frontend import lower

        gm = lower.build(spec, device="meta")
        name, stages, shape = spec.name, spec.stages(), lower.input_shape(spec, 1,
                                                                          args.input_size)
    from archc.ir.analysis import complexity_report

    report = complexity_report(gm, shape)
    groups = _stage_groups(gm)
    rows = []
    for stage_name, cx in report.stages.items():
        row = {"stage": stage_name, "flops": cx.flops, "params": cx.params, "acts": cx.acts}
        if stages and stage_name.startswith("s") and stage_name[1:].isdigit():
            stage = stages[int(stage_name[1:]) - 1]
            row.update(
                block=stage.block,
                depth=stage.depth,
                width=stage.width,
                group_width=stage.group_width,
                groups=groups.get(stage_name, 1),
                stride=stage.stride,
                bottleneck=stage.bottleneck,
                se_ratio=stage.se_ratio,
            )
        rows.append(row)
    total = report.total
    if args.json:
        print(json.dumps({"name": name, "source": str(args.spec), "input_shape": list(shape),
                          "flops": total.flops, "params": total.params, "acts": total.acts,
                          "stages": rows}, indent=1))
        return 0
    out = Output(args)
    out.say(f"{name}  input {'x'.join(map(str, shape))}  (flops = multiply-adds; "
            f"{_count(total.flops)} flops, {total.params / 1e6:,.2f}M params)")
    label = (f"{'stage':<6} {'block':<17} {'depth':>5} {'width':>6} {'groups':>7} "
             f"{'stride':>6}")
    header = f"{label} {'flops':>15} {'params':>12} {'acts':>12}"
    out.say(header)
    out.say("-" * len(header))
    for row in rows:
        out.say(
            f"{row['stage']:<6} {row.get('block', ''):<17} {row.get('depth', ''):>5} "
            f"{row.get('width', ''):>6} {_groups_text(row):>7} "
            f"{row.get('stride', ''):>6} "
            f"{row['flops']:>15,} {row['params']:>12,} {row['acts']:>12,}"
        )
    out.say("-" * len(header))
    out.say(f"{'total':<{len(label)}} {total.flops:>15,} {total.params:>12,} {total.acts:>12,}")
    return 0


def _checkpoint_graph(path: Path, args: argparse.Namespace):
    """(graph, name, stages or None, input shape) of a checkpoint or program, for `info`."""
    from archc.backends.importers import load_model
    from archc.frontend.loading import spec_from_mapping

    model = load_model(path, trust_pickle=args.trust_pickle)
    shape = model.input_shape or (1, 3, 224, 224)
    if args.input_size:
        shape = (*shape[:2], *(args.input_size,) * (len(shape) - 2))
    stages = spec_from_mapping(model.spec).stages() if model.spec else None
    return model.graph_module, model.name, stages, tuple(shape)


def _stage_groups(gm) -> dict[str, int]:
    """Per stage, the group count of its grouped convs (the most common one), from the graph."""
    from collections import Counter

    from torch import nn

    found: dict[str, Counter] = {}
    for name, module in gm.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1:
            found.setdefault(name.split(".")[0], Counter())[module.groups] += 1
    return {stage: counts.most_common(1)[0][0] for stage, counts in found.items()}


def _groups_text(row: dict) -> str:
    """`gw 24` (channels per group), `g 3` (number of groups) or blank (dense)."""
    if row.get("group_width"):
        return f"gw {row['group_width']}"
    return f"g {row['groups']}" if row.get("groups", 1) > 1 else ""


def _models(args: argparse.Namespace) -> int:
    import fnmatch

    from archc.errors import SpecError
    from archc.frontend.analytic_complexity import spec_complexity
    from archc.frontend.loading import load_spec
    from archc.frontend.reference import shipped_folder, shipped_names

    pattern = args.filter
    names = [name for name in shipped_names("specs") if not pattern or pattern in name
             or fnmatch.fnmatchcase(name, pattern)]
    rows = []
    for name in names:
        spec = load_spec(shipped_folder("specs") / f"{name}.yaml")
        try:
            flops, params, _ = spec_complexity(spec)
        except SpecError:  # no analytic twin: count the graph (meta tensors, no allocation)
            from archc.frontend import lower
            from archc.ir.analysis import complexity

            flops, params, _ = complexity(lower.build(spec, device="meta"),
                                          lower.input_shape(spec))
        rows.append({"name": name, "params": params, "flops": flops,
                     "input_size": spec.input.size, "body": spec.body.type})
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    out = Output(args)
    if not rows:
        out.say(f"no shipped spec matches {pattern!r}")
        return 0
    out.say(f"{'name':<28} {'params':>9} {'flops':>10} {'input':>6}  body")
    for row in rows:
        out.say(f"{row['name']:<28} {row['params'] / 1e6:>8.2f}M {_count(row['flops']):>10} "
                f"{row['input_size']:>6}  {row['body']}")
    out.say(f"{len(rows)} specs; build one by name: archc build {rows[0]['name']} -o model.onnx")
    return 0


def _show(args: argparse.Namespace) -> int:
    pipeline = _pipeline(args)
    from archc.backends.graph_picture import draw

    out = Output(args)
    source = Path(args.spec)
    if source.suffix.lower() in CHECKPOINT_FORMATS:
        gm, name, _, shape = _checkpoint_graph(source, args)
    else:
        from archc.cli.resources import preflight
        from archc.frontend import lower
        from archc.frontend.loading import load_spec

        spec = load_spec(args.spec)
        preflight(spec, source=str(args.spec))
        gm, name, shape = lower.build(spec, init="random"), spec.name, lower.input_shape(spec)
    names, options = pipeline
    if args.after is not None:
        if args.after not in names:
            from archc.errors import ArchcError

            raise ArchcError(f"--after {args.after}: not a pass of the pipeline "
                             f"({', '.join(names) or 'none'})")
        names = names[: names.index(args.after) + 1]
    from archc.ir.init import random_input
    from archc.rewrite.pipeline import PassContext, run_pipeline

    ctx = PassContext(example_inputs=(random_input(shape, 0),), options=options,
                      progress=out.progress)
    after = run_pipeline(gm, names, ctx).graph_module if names else gm
    summary = draw(gm, after, args.output, title=name, depth=args.depth,
                   after_label=f"after {args.after or 'the pipeline'}")
    out.say(f"wrote {args.output}: {summary}")
    return 0


def _schema(args: argparse.Namespace) -> int:
    from archc.frontend.loading import json_schema

    text = json.dumps(json_schema(), indent=2) + "\n"
    if args.output is None:
        sys.stdout.write(text)
        return 0
    from archc.common.fileio import atomic_output

    with atomic_output(args.output) as temporary:
        temporary.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
