"""The building commands of the CLI: `archc build` (spec -> a verified file) and `archc fuse`
(checkpoint -> its verified deploy form), with what they share: the pass options, running the
pipeline with its per-pass report, the deploy form (dtype, layout) and emitting in the format of the
output's extension.

`add_commands` adds the parsers to `archc.cli.main`'s subcommands; `HANDLERS` maps each command to
its handler. Parsing imports nothing heavy; the handlers import what they need.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from archc.cli import arguments
from archc.cli import quant as cli_quant
from archc.cli.output import Output, count_text, counted
from archc.common.fileio import size_text

OUTPUT_FORMATS = (".onnx", ".pt", ".pt2", ".py", ".xml", ".pte")
FUSE_FORMATS = (".pt2", ".onnx", ".py", ".xml", ".pte")
# The opsets torch's ONNX exporter writes as asked (it raises lower ones to 18 without a word)
ONNX_OPSETS = (18, 24)
INPUT_SIDES = (8, 4096)  # as the spec schema's input.size


def _add_deploy_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("deploy form (.onnx, .pt2, .py, .xml)")
    group.add_argument(
        "--dtype",
        choices=("fp32", "fp16", "bf16"),
        default="fp32",
        help="cast the emitted model after folding in float32 (default fp32); for .xml, "
        "OpenVINO's inference precision (the weights stay float32); verified at 10 units of "
        "the format's rounding, or at 10x the model's own rounding in that format where it is "
        "larger",
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


def add_input_size(parser: argparse.ArgumentParser) -> None:
    """`--input-size N`: the square input side, in the spec schema's range."""
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
    dump_after = group.add_argument(
        "--dump-after",
        nargs=2,
        metavar=("PASS|all", "DIR"),
        help="write the graph's code after PASS (or every pass) into DIR",
    )
    dump_after.writes = "folder"  # its DIR: checked with the other outputs
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


def add_commands(commands) -> None:
    """Add `build` and `fuse` to the `archc` subcommands."""
    build = commands.add_parser(
        "build",
        help="lower a spec to a verified ONNX / torch.export / checkpoint / Python file",
        description="Lower SPEC to a torch.fx graph, run the passes and emit it; the format "
        "follows the extension of OUT: .onnx (single file, verified in ONNX Runtime), .pt2 "
        "(torch.export), .py (standalone module + weights), .xml (OpenVINO IR + .bin, "
        "verified in OpenVINO's CPU plugin; needs archc[openvino]), .pte (ExecuTorch program "
        "lowered to XNNPACK, verified in ExecuTorch's runtime; needs archc[executorch]), .pt "
        "(archc checkpoint: spec + state_dict, the train form).",
    )
    build.add_argument("spec", help="spec file (YAML or JSON) or a shipped spec's name "
                       "(`archc models` lists them)")
    build.add_argument(
        "-o",
        "--output",
        type=arguments.output_path(OUTPUT_FORMATS),
        required=True,
        metavar="OUT",
        help="output file: .onnx, .pt2, .py, .xml, .pte or .pt",
    )
    add_input_size(build)
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
        help="fix the batch size of .onnx / .pt2 / .xml outputs to --batch (default: any batch "
        "size, verified at two)",
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
        "<name>.fused.pt2), .onnx, .py (a standalone module + <name>.weights.pt), .xml "
        "(OpenVINO IR + .bin; needs archc[openvino]) or .pte (ExecuTorch, XNNPACK; needs "
        "archc[executorch]).",
    )
    fuse.add_argument("checkpoint", type=Path, metavar="CKPT", help=".pt or .pt2 file")
    fuse.add_argument(
        "-o",
        "--output",
        type=arguments.output_path(FUSE_FORMATS),
        metavar="OUT",
        help="output file: .pt2, .onnx, .py, .xml or .pte (default CKPT's name + .fused.pt2)",
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
        help="fix the batch size of .onnx / .pt2 / .xml outputs to the example input's "
        "(default: any batch size, verified at two)",
    )
    fuse.add_argument("--seed", type=arguments.seed, default=0,
                      help="seed of the verification inputs")
    _add_pass_options(fuse, "default: 'default'")
    _add_deploy_options(fuse)
    cli_quant.add_chain_options(fuse)


def _build(args: argparse.Namespace) -> int:
    from archc.cli.resources import preflight
    from archc.frontend.loading import load_spec

    out = Output(args)
    spec = load_spec(args.spec)  # spec errors surface before torch is imported
    preflight(spec, batch=args.batch, input_size=args.input_size, budget=args.max_memory,
              source=str(args.spec))
    pipeline = checked_pipeline(args)  # before any work
    from archc.backends import checkpoint
    from archc.frontend import lower
    from archc.ir.analysis import complexity_report
    from archc.ir.init import random_input

    out.progress(f"{spec.name}: lowering {counted(sum(s.depth for s in spec.stages()), 'block')}")
    gm = lower.build(spec, seed=args.seed, init=args.init)
    shape = lower.input_shape(spec, args.batch, args.input_size)
    report = complexity_report(gm, shape).total
    example = random_input(shape, args.seed)
    document = {"command": "build", "name": spec.name, "source": str(args.spec),
                "input_shape": list(shape),
                "spec_form": {"params": report.params, "flops": report.flops,
                              "acts": report.acts}}
    out.say(
        f"{spec.name}: {report.params:,} params, {count_text(report.flops)} flops "
        f"(multiply-adds), {count_text(report.acts)} acts per sample at "
        f"{'x'.join(map(str, shape[1:]))} (spec form)"
    )
    deploy = gm
    if args.output.suffix.lower() == ".pt":
        emitted = checkpoint.save_checkpoint(gm, spec.to_dict(), args.output, example,
                                             rtol=args.rtol)
    else:
        deploy, noise = _run_passes(gm, args, example, pipeline, out, document)
        emitted = _emit(deploy, args.output, example, args, spec.name, str(args.spec), noise,
                        source=gm, spec=spec.to_dict())
    _print_emitted(emitted, out, document, args, deploy, example)
    return 0


def _emit(gm, output: Path, example, args: argparse.Namespace, name: str, source_name: str,
          noise: float | None, source=None, spec: dict | None = None):
    """Cast to the deploy dtype/layout, then write `output` in the format of its extension,
    verified at `--rtol` or, for a model whose own float32 rounding is larger, at a multiple of
    that rounding (`noise`: measured by the pipeline, else here). `source` is the model before
    the passes: in fp16 / bf16 the deploy form is allowed its own rounding in that format. A
    `.pt2` stores `spec`, the spec of `source`, if the passes left its weights as they were
    (`same_weights`: `archc reduce` reads it back)."""
    from archc.backends import export
    from archc.ir import verify

    suffix = output.suffix.lower()
    if noise is None:
        noise = verify.rounding_noise(gm, (example,))
    rtol = verify.artifact_tolerance(args.rtol, noise)
    dynamic_batch = not args.static_batch
    if suffix == ".xml":  # the runtime casts: the IR keeps float32, --dtype is its precision
        from archc.backends.openvino_ir import export_openvino

        return export_openvino(
            gm, output, example, dtype=args.dtype, opset=args.opset,
            dynamic_batch=dynamic_batch, simplify=not getattr(args, "no_simplify", False),
            exporter=args.onnx_exporter, rtol=rtol,
        )
    if suffix == ".pte":  # fp32, NCHW (option_problem)
        from archc.backends.executorch_pte import export_executorch

        return export_executorch(gm, output, example, rtol=rtol, dynamic_batch=dynamic_batch)
    form = export.deploy_form(
        gm, example, dtype=args.dtype, channels_last=args.channels_last, rtol=rtol, source=source
    )
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
            source=source_name,
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
            spec=spec if spec is not None and source is not None
            and export.same_weights(form.graph_module, source) else None,
        )
    emitted.notes[:0] = form.notes
    emitted.rtol = form.rtol
    return emitted


def option_problem(args: argparse.Namespace) -> str | None:
    """Why the options cannot go together, checked after parsing without importing torch: a
    layout or dtype the output format cannot hold, a pass name no pass has."""
    output = getattr(args, "output", None)
    if args.command == "build" and output.suffix.lower() == ".pt" and (
            args.passes not in (None, "none") or args.dtype != "fp32" or args.channels_last):
        return ("a .pt checkpoint stores the spec's own float32 (train) form; run passes with "
                "`archc fuse model.pt`, or emit .onnx / .pt2 / .py")
    if output is not None and output.suffix.lower() == ".onnx":
        if getattr(args, "channels_last", False):
            return ("ONNX is NCHW by specification; channels_last is the runtime's business: "
                    "use it with .pt2 or .py")
        if getattr(args, "dtype", None) == "bf16":
            return ("ONNX Runtime on CPU has no bfloat16 Conv, so a bf16 .onnx cannot be "
                    "verified: use fp16 for .onnx, or bf16 with .pt2 / .py / .xml")
    if output is not None and output.suffix.lower() == ".xml":
        if getattr(args, "channels_last", False):
            return ("OpenVINO IR is NCHW and the CPU plugin picks its own layout: "
                    "use --channels-last with .pt2 or .py")
        from archc.common.extras import missing_extra

        problem = missing_extra("openvino", "openvino", f"writing {output}")
        if problem:
            return problem
    if output is not None and output.suffix.lower() == ".pte":
        if getattr(args, "dtype", "fp32") != "fp32" or getattr(args, "channels_last", False):
            return ("archc writes ExecuTorch programs in float32 NCHW (XNNPACK chooses its own "
                    "layout): drop --dtype / --channels-last for .pte")
        from archc.common.extras import missing_extra

        problem = missing_extra("executorch", "executorch", f"writing {output}")
        if problem:
            return problem
    after = getattr(args, "after", None)
    dump_after = getattr(args, "dump_after", None)
    for option, name in (("--after", after),
                         ("--dump-after", dump_after[0] if dump_after else None)):
        if name not in (None, "all" if option == "--dump-after" else None):
            problem = arguments.unknown_pass(option, name)
            if problem:
                return problem
    return None


def checked_pipeline(args: argparse.Namespace) -> tuple[list[str], dict]:
    """The pass names of `--passes` and the checked `--pass-option`s; `--after PASS` and
    `--dump-after PASS` must name a pass of that pipeline (before any work)."""
    import archc.passes  # noqa: F401 - registers the catalogue
    from archc.errors import ArchcError
    from archc.rewrite.pipeline import check_options, resolve_pipeline

    names = resolve_pipeline(args.passes or "default")
    dump_after = getattr(args, "dump_after", None)
    for option, name in (("--after", getattr(args, "after", None)),
                         ("--dump-after", dump_after[0] if dump_after else None)):
        if name not in (None, "all") and name not in names:
            raise ArchcError(f"{option} {name}: not a pass of the pipeline "
                             f"({', '.join(dict.fromkeys(names)) or 'none'})")
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
    pipeline = checked_pipeline(args)
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
    emitted = _emit(gm, output, example, args, model.name, args.checkpoint.name, noise,
                    source=model.graph_module, spec=model.spec)
    _print_emitted(emitted, out, document, args, gm, example)
    return 0


def _print_emitted(emitted, out: Output, document: dict, args=None, deploy=None,
                   example=None) -> None:
    """Say what was written; then `--int8` quantizes it (`deploy` at `example`: the graph that
    was emitted)."""
    details = "; ".join([size_text(emitted.bytes), *emitted.notes])
    out.say(f"wrote {emitted.path} ({details})")
    out.say(
        f"verified with {emitted.verified_with} against {emitted.reference}: max abs error "
        f"{emitted.max_abs_error:.2e}, relative {emitted.relative_error:.2e} "
        f"(tolerance {emitted.rtol:g})"
    )
    document["output"] = {"path": str(emitted.path), "bytes": emitted.bytes,
                          "notes": list(emitted.notes), "verified_with": emitted.verified_with,
                          "reference": emitted.reference,
                          "max_abs_error": emitted.max_abs_error,
                          "relative_error": emitted.relative_error, "tolerance": emitted.rtol}
    if emitted.precision:
        document["output"]["precision"] = emitted.precision
    if args is not None and args.int8:
        document["int8"] = cli_quant.chain(args, emitted.path, out, deploy, example)
    out.report(document)


HANDLERS = {"build": _build, "fuse": _fuse}
