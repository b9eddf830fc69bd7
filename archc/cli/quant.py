"""The quantization commands of the CLI: `archc quantize`, `archc qat`, and `--int8 --calib DATA`
of `build` and `fuse` (quantize the .onnx they wrote into `<OUT stem>.int8.onnx`).

As in `archc.cli.main`, parsing imports nothing heavy; the handlers import what they need.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from archc.cli import arguments
from archc.cli.output import Output, counted
from archc.common.fileio import size_text

# as archc.compress.quantize.METHODS, written out so the CLI stays torch-free
METHODS = ("minmax", "entropy", "percentile")


def _keep_float(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r} names no node (give NAME,... or first/last)")
    return names


def _add_quantization_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("int8 quantization (ONNX Runtime, QDQ)")
    group.add_argument("--method", choices=METHODS, default="minmax",
                       help="activation calibration: minmax (default), entropy or percentile")
    group.add_argument("--samples", type=arguments.positive_int, default=256, metavar="N",
                       help="calibration images, from the training split of DATA (default 256)")
    group.add_argument("--keep-float", type=_keep_float, action="append", default=[],
                       metavar="NAME,...|first|last",
                       help="nodes to leave in float: ONNX node names, or first / last (the "
                       "first / last Conv or Gemm); repeatable")
    group.add_argument("--per-tensor", action="store_true",
                       help="one weight scale per tensor instead of per output channel")
    group.add_argument("--latency-rounds", type=arguments.int_in(0, 1000, "rounds"), default=15,
                       metavar="N", help="interleaved timing rounds of fp32 and int8 (default "
                       "15; 0: no timing)")
    group.add_argument("--threads", type=arguments.positive_int, default=1,
                       help="ONNX Runtime intra-op threads for the timing (default 1)")


def add_commands(commands) -> None:
    """Add `quantize` to the `archc` subcommands."""
    quantize = commands.add_parser(
        "quantize",
        help="post-training static int8 quantization of an ONNX classifier (QDQ)",
        description="Calibrate MODEL.onnx on images of DATA and write an int8 QDQ model with "
        "ONNX Runtime's quantization tools (pre-processing, per-channel int8 weights, uint8 "
        "activations); report SQNR and top-1 agreement against fp32 on the held-out split, "
        "accuracy of both, the layers that lose most and the int8/fp32 latency ratio. See "
        "docs/quantization.md.",
    )
    quantize.add_argument("model", type=Path, metavar="MODEL.onnx", help="float32 ONNX model")
    quantize.add_argument("--calib", required=True, metavar="DATA",
                          help="digits, a .npz with x (N,C,H,W) and y, or a directory of class "
                          "folders; resized to the model's input")
    quantize.add_argument("-o", "--output", type=arguments.output_path((".onnx",)),
                          required=True, metavar="OUT", help="the int8 model (.onnx)")
    _add_quantization_options(quantize)
    quantize.add_argument("--json", action="store_true",
                          help="print one machine-readable JSON report on stdout instead of text")

    qat = commands.add_parser(
        "qat",
        help="quantization-aware fine-tuning of a model's deploy form; int8 QDQ ONNX out",
        description="Fuse MODEL to its deploy form (default passes), fine-tune it with fake "
        "quantization (ORT's per-channel int8 weights and uint8 activations, straight-through) "
        "in the shared training loop, and write the int8 QDQ model through ONNX Runtime's "
        "quantizer, reported as `archc quantize` reports. See docs/quantization.md.",
    )
    qat.add_argument("checkpoint", type=Path, metavar="MODEL",
                     help="archc checkpoint (.pt), torch.export program (.pt2) or, with "
                     "--trust-pickle, a whole pickled nn.Module (.pt)")
    arguments.add_model_source_options(qat)
    qat.add_argument("--data", required=True, metavar="DATA",
                     help="training and calibration data: digits, a .npz or class folders")
    qat.add_argument("-o", "--output", type=arguments.output_path((".onnx",)), required=True,
                     metavar="OUT", help="the int8 model (.onnx)")
    group = qat.add_argument_group("fine-tuning (archc.train.loop)")
    group.add_argument("--epochs", type=arguments.positive_int, default=3, help="default 3")
    group.add_argument("--lr", type=float, default=0.01,
                       help="peak learning rate of the cosine schedule (default 0.01)")
    group.add_argument("--batch-size", type=arguments.positive_int, default=64,
                       help="default 64")
    group.add_argument("--weight-decay", type=float, default=0.0, help="default 0")
    group.add_argument("--seed", type=arguments.seed, default=0, help="batch order (default 0)")
    group.add_argument("--train-threads", type=arguments.positive_int, default=1,
                       help="torch intra-op threads while fine-tuning (default 1)")
    arguments.add_device_options(group)
    group = qat.add_argument_group("export")
    group.add_argument("--samples", type=arguments.positive_int, default=256, metavar="N",
                       help="calibration images of the activation ranges (default 256)")
    group.add_argument("--latency-rounds", type=arguments.int_in(0, 1000, "rounds"), default=15,
                       metavar="N", help="interleaved timing rounds (default 15; 0: none)")
    group.add_argument("--threads", type=arguments.positive_int, default=1,
                       help="ONNX Runtime intra-op threads for the timing (default 1)")
    qat.add_argument("--json", action="store_true",
                     help="print one machine-readable JSON report on stdout instead of text")


def add_chain_options(parser: argparse.ArgumentParser) -> None:
    """`--int8 --calib DATA` (and the quantization options) for `build` and `fuse`."""
    parser.add_argument("--int8", action="store_true",
                        help="also write an int8 model: <OUT stem>.int8.onnx (QDQ, ONNX "
                        "Runtime's quantizer) for an .onnx OUT, <OUT stem>.int8.pte (XNNPACK's "
                        "quantizer) for a .pte OUT; needs --calib")
    parser.add_argument("--calib", metavar="DATA", default=None,
                        help="calibration data of --int8: digits, a .npz or class folders")
    _add_quantization_options(parser)


def int8_path(output: Path) -> Path:
    """Where `--int8` writes: `<OUT stem>.int8.onnx`, or `.int8.pte` for an ExecuTorch program."""
    suffix = ".pte" if output.suffix.lower() == ".pte" else ".onnx"
    return output.with_name(f"{output.stem}.int8{suffix}")


def chain_problem(args: argparse.Namespace, output: Path) -> str | None:
    """Why `--int8` / `--calib` cannot be honoured, checked before any work."""
    if not args.int8:
        return "--calib is the calibration data of --int8: add --int8" if args.calib else None
    if args.calib is None:
        return "--int8 needs calibration data: add --calib DATA (digits, a .npz or folders)"
    if output.suffix.lower() == ".pte":
        if args.method != "minmax" or args.keep_float:
            return ("--int8 for .pte goes through XNNPACK's quantizer, which calibrates min/max "
                    "and quantizes every layer it supports: drop --method / --keep-float")
    elif output.suffix.lower() != ".onnx":
        return (f"--int8 quantizes an ONNX model or an ExecuTorch program: give an .onnx or "
                f".pte output, not {output.suffix}")
    return arguments.check_output_location(int8_path(output))


def chain(args: argparse.Namespace, path: Path, out, deploy=None, example=None) -> dict | None:
    """Quantize the model `build`/`fuse` wrote, if `--int8`: the .onnx file as `archc quantize`
    does, or, for a .pte, the deploy graph `deploy` (traced at `example`) through XNNPACK's
    quantizer (`archc.compress.quantize_pte`)."""
    if not args.int8:
        return None
    if path.suffix.lower() == ".pte":
        from archc.compress.quantize_pte import quantize_program

        program = quantize_program(deploy, example, args.calib, int8_path(path),
                                   samples=args.samples, per_channel=not args.per_tensor,
                                   progress=out.progress)
        _say_program(program, args.calib, out)
        return program.document()
    report = _run(args, path, args.calib, int8_path(path), out.progress)
    _say(report, path, args.calib, out)
    return report.document()


def _say_program(report, data: str, out) -> None:
    weights = "per-channel" if report.per_channel else "per-tensor"
    out.say(f"wrote {report.output} ({size_text(report.bytes)}): int8 ExecuTorch program, "
            f"XNNPACK quantizer, min/max calibration on "
            f"{counted(report.calibration_samples, 'image')} of {data}, {weights} weights; "
            f"XNNPACK delegate calls: {report.delegated}, portable ops left: {report.portable}")
    out.say(f"verified in ExecuTorch's runtime against the fp32 model in float64: relative "
            f"error {report.relative_error:.2e} (int8 tolerance {report.tolerance:g})")
    out.say(f"held-out ({report.held_out_samples} validation images): SQNR "
            f"{_db(report.sqnr_db)} dB, top-1 agreement {report.top1_agreement:.2f}%; "
            f"accuracy: fp32 {report.fp32_accuracy:.2f}%, int8 {report.int8_accuracy:.2f}% "
            f"({report.int8_accuracy - report.fp32_accuracy:+.2f} points)")


def _run(args: argparse.Namespace, model: Path, data: str, output: Path, progress):
    from archc.compress.quantize import quantize

    return quantize(model, data, output, method=args.method, samples=args.samples,
                    keep_float=[name for group in args.keep_float for name in group],
                    per_channel=not args.per_tensor, latency_rounds=args.latency_rounds,
                    threads=args.threads, progress=progress)


def _quantize(args: argparse.Namespace) -> int:
    from archc.compress.quantize import QuantizationError

    if args.model.resolve() == args.output.resolve():
        raise QuantizationError(f"{args.output}: the int8 model would replace its input; give "
                                f"another -o")
    out = Output(args)
    report = _run(args, args.model, args.calib, args.output, out.progress)
    _say(report, args.model, args.calib, out)
    out.report({"command": "quantize", "source": str(args.model), "data": args.calib,
                **report.document()})
    return 0


def _db(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.1f}"


def _say(report, source: Path, data: str, out) -> None:
    weights = "per-tensor" if not report.per_channel else "per-channel"
    out.say(f"{source} -> {report.output}: int8 QDQ, {report.method} calibration on "
            f"{counted(report.calibration_samples, 'image')} of {data}, {weights} weights"
            + (f", kept in float: {', '.join(report.kept_float)}" if report.kept_float else ""))
    ops = ", ".join(f"{op} {count}" for op, count in sorted(report.quantized_ops.items()))
    out.say(f"ONNX Runtime runs: {ops or 'no integer ops'}; convs still in float: "
            f"{report.float_convs}")
    out.say(f"held-out ({report.held_out_samples} validation images): SQNR "
            f"{_db(report.sqnr_db)} dB, top-1 agreement {report.top1_agreement:.2f}%")
    if report.fp32_accuracy is not None:
        out.say(f"accuracy: fp32 {report.fp32_accuracy:.2f}%, int8 {report.int8_accuracy:.2f}% "
                f"({report.int8_accuracy - report.fp32_accuracy:+.2f} points)")
    if report.paired is not None:
        paired = report.paired
        out.say(f"int8 vs fp32, image by image: {paired.only_b} right by int8 only, "
                f"{paired.only_a} by fp32 only; exact McNemar: "
                f"{paired.verdict('fp32', 'int8')}")
    if report.layers:
        out.say("layers that lose most (per-tensor SQNR, and its drop from the layer's inputs):")
        for layer in report.layers:
            drop = ("reads exact inputs" if math.isinf(layer.drop_db)
                    else f"drop {_db(layer.drop_db)} dB")
            out.say(f"  {layer.node} ({layer.op}) -> {layer.tensor}: {_db(layer.sqnr_db)} dB, "
                    f"{drop}")
    if report.latency_ratio is not None:
        out.say(f"latency (ONNX Runtime CPU, batch 1, median of interleaved rounds): fp32 "
                f"{report.fp32_ms:.3f} ms, int8 {report.int8_ms:.3f} ms, int8/fp32 "
                f"{report.latency_ratio:.2f}")
    out.say(f"wrote {report.output} ({size_text(report.bytes)}; loads and runs in ONNX "
            f"Runtime)")


def _qat(args: argparse.Namespace) -> int:
    import tempfile

    import archc.passes  # noqa: F401 - registers the catalogue
    from archc.backends.export import export_onnx
    from archc.backends.trainable import SPEC, load_trainable
    from archc.common.accuracy_stats import compare_paired
    from archc.compress.qat import FakeQuant, unwrap
    from archc.compress.quantize import QuantizationError, quantize
    from archc.rewrite.pipeline import PassContext, resolve_pipeline, run_pipeline
    from archc.train.data import load_data
    from archc.train.loop import TrainConfig, Trainer, check_classes, evaluate

    out = Output(args)
    device = arguments.resolved_device(args)
    source = load_trainable(args.checkpoint, trust_pickle=args.trust_pickle,
                            input_shape=args.input_shape)
    if source.kind == SPEC:
        raise QuantizationError(f"{args.checkpoint}: a spec has no trained weights; give a "
                                f"trained model (.pt, .pt2)")
    data = load_data(args.data, source.channels, source.size)
    source.check_classes(data.classes, data.name)
    mismatch = check_classes(source.num_outputs, data)
    if mismatch is not None:
        out.warning(mismatch)
    example = source.example()
    name = source.name
    out.progress(f"{name}: fusing to the deploy form")
    deploy = run_pipeline(source.graph_module(), resolve_pipeline("default"),
                          PassContext(example_inputs=(example,))).graph_module
    outcomes: list[tuple[int, int]] = []
    before = evaluate(deploy, data.val_x, data.val_y, predictions=outcomes)["accuracy"]
    config = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                         weight_decay=args.weight_decay, seed=args.seed,
                         threads=args.train_threads, device=device, precision=args.precision)
    plugin = FakeQuant()
    result = Trainer(config, [plugin], progress=out.show_progress, label=f"{name} qat",
                     warn=out.warning).fit(deploy, data)
    fake = [100.0 - error for error in result.errors]
    out.say(f"{name}: deploy form fp32 {before:.2f}%; fake-quantized fine-tuning of "
            f"{counted(plugin.wrapped, 'layer')}, validation top-1 per epoch: "
            + ", ".join(f"{value:.2f}%" for value in fake))
    tuned = unwrap(result.model)
    with tempfile.TemporaryDirectory(prefix="archc-qat-") as folder:
        fp32 = Path(folder) / f"{name}.qat.fp32.onnx"
        export_onnx(tuned, fp32, example[:1], dynamic_batch=True)
        report = quantize(fp32, args.data, args.output, samples=args.samples,
                          latency_rounds=args.latency_rounds, threads=args.threads,
                          progress=out.progress)
    against = compare_paired([label == top1 for label, top1 in outcomes], report.int8_right)
    out.say(f"int8 after QAT: {report.int8_accuracy:.2f}% against the deploy form's fp32 "
            f"{before:.2f}% ({report.int8_accuracy - before:+.2f} points; image by image "
            f"{against.only_b}:{against.only_a}, exact McNemar: "
            f"{against.verdict('the deploy form', 'QAT int8')}); below, fp32 is the "
            f"fine-tuned float model")
    _say(report, args.checkpoint, args.data, out)
    out.report({"command": "qat", "source": str(args.checkpoint), "data": args.data,
                "deploy_fp32_accuracy": before, "qat_int8_vs_deploy_fp32": against.document(),
                "fake_quant_accuracy": fake,
                "quantized_layers": plugin.wrapped, **report.document()})
    return 0


HANDLERS = {"quantize": _quantize, "qat": _qat}
