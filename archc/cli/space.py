"""The design-space commands of the CLI: `archc space sample|sweep|analyze|fit`, `archc train`,
`archc eval`.

`add_commands` adds the parsers to `archc.cli.main`'s subcommands; `HANDLERS` maps each command to
its handler. As in `archc.cli.main`, parsing imports nothing heavy (no torch, numpy or matplotlib);
the handlers import what they need.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from archc.cli import arguments
from archc.cli import compress as cli_compress
from archc.cli.output import SPEC_FORMATS, Output, counted, write_spec

# `space fit -o`: a fitted spec of a spec, the fits (.jsonl) of a samples or results file
FIT_FORMATS = (*SPEC_FORMATS, ".jsonl")


def _override(text: str) -> tuple[str, object]:
    """KEY=VALUE; VALUE is JSON if it parses as JSON (numbers, lists), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE (e.g. base.input.size=32)")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _add_space_source(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        type=_override,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of the space file, e.g. base.input.size=32, "
        "window.flops=[2e6,8e6] or parameters[body.depth].high=20 (repeatable; VALUE is JSON "
        "or a string)",
    )


def _fraction(text: str) -> float:
    value = arguments.nonnegative_float(text)
    if not value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not in [0, 1)")
    return value


def _add_training_options(parser: argparse.ArgumentParser, epochs_required: bool) -> None:
    """Options of the shared training loop (archc.train.loop.TrainConfig)."""
    parser.add_argument("--data", required=True, metavar="DATA",
                        help="digits (scikit-learn's bundled 8x8 digits), a .npz with x (N,C,H,W) "
                        "and y, or a directory of class folders")
    group = parser.add_argument_group("training (archc.train.loop)")
    group.add_argument("--epochs", type=arguments.positive_int, required=epochs_required,
                       default=None if epochs_required else 10,
                       help="epochs" + ("" if epochs_required else " (default 10)"))
    group.add_argument("--batch-size", type=arguments.positive_int, default=64,
                       help="default 64; under torchrun the global batch, split between the "
                       "processes")
    group.add_argument("--lr", type=arguments.nonnegative_float, default=0.1,
                       help="peak learning rate of the cosine schedule (default 0.1)")
    group.add_argument("--momentum", type=_fraction, default=0.9, help="SGD momentum (0.9)")
    group.add_argument("--weight-decay", type=arguments.nonnegative_float, default=5e-4,
                       help="default 5e-4")
    group.add_argument("--warmup-epochs", type=arguments.nonnegative_float, default=0.0,
                       help="linear warm-up epochs (default 0)")
    group.add_argument("--label-smoothing", type=_fraction, default=0.0, help="default 0")
    group.add_argument("--ema", type=_fraction, default=None, metavar="DECAY",
                       help="keep an exponential moving average of the weights with this decay "
                       "(e.g. 0.999) and report and keep it")
    group.add_argument("--threads", type=arguments.positive_int, default=1,
                       help="torch intra-op threads (default 1; results depend on it)")
    arguments.add_device_options(group)


def _add_loader_options(parser: argparse.ArgumentParser) -> None:
    """Options of the streaming image-folder loader (archc.train.data.ImageFolder)."""
    parser.add_argument("--workers", type=arguments.nonnegative_int, default=0,
                        help="image folders only: DataLoader worker processes that decode the "
                        "images (default 0: in this process)")


def _training_options(args: argparse.Namespace) -> dict:
    """The TrainConfig fields the CLI sets, other than epochs and seed."""
    return {"batch_size": args.batch_size, "lr": args.lr, "momentum": args.momentum,
            "weight_decay": args.weight_decay, "warmup_epochs": args.warmup_epochs,
            "label_smoothing": args.label_smoothing, "ema_decay": args.ema,
            "threads": args.threads, "device": args.device, "precision": args.precision}


def add_commands(commands) -> None:
    """Add `space`, `train` and `eval` to the `archc` subcommands."""
    space = commands.add_parser(
        "space",
        help="design spaces: sample models, train them, analyze and fit the results",
        description="Design-space exploration (Radosavovic et al. 2019, 2020); see "
        "docs/design-spaces.md.",
    )
    space_commands = space.add_subparsers(dest="space_command", required=True, metavar="COMMAND")

    sample = space_commands.add_parser(
        "sample",
        help="draw models from a space file (seeded rejection sampling)",
        description="Draw N models from SPACE under its constraints and complexity window; write "
        "one JSON line per model (spec, exact flops/params/acts, drawn parameters). The same seed "
        "gives the same file on any machine.",
    )
    sample.add_argument("space", type=Path,
                        help="space file (YAML or JSON), e.g. spaces/regnetx.yaml")
    sample.add_argument("-n", type=arguments.positive_int, required=True, metavar="N",
                        help="models to draw")
    sample.add_argument("--seed", type=arguments.seed, default=0, help="random seed (default 0)")
    sample.add_argument("-o", "--output", type=arguments.output_path((".jsonl",)), required=True,
                        metavar="FILE",
                        help="samples file (.jsonl), written atomically")
    _add_space_source(sample)

    sweep = space_commands.add_parser(
        "sweep",
        help="train every sample of a space; append one JSON line per model; resumable",
        description="Train the models of SOURCE (a space file, sampled here with -n and --seed, "
        "or a samples file from `archc space sample`) and append one JSON line per finished "
        "model to OUT. A rerun trains only the models OUT lacks.",
    )
    sweep.add_argument("source", type=Path, metavar="SOURCE",
                       help="a space file (.yaml/.json) or a samples file (.jsonl)")
    sweep.add_argument("-o", "--output", type=arguments.output_path((".jsonl",)), required=True,
                       metavar="OUT",
                       help="results file (.jsonl), appended to")
    sweep.add_argument("-n", type=arguments.positive_int, metavar="N",
                       help="models to sample (with a space file)")
    sweep.add_argument("--seed", type=arguments.seed, default=0,
                       help="sampling seed (with a space file) and training seed (default 0)")
    _add_space_source(sweep)
    _add_training_options(sweep, epochs_required=True)
    where = sweep.add_mutually_exclusive_group()
    where.add_argument("--workers", type=arguments.positive_int, default=1,
                       help="local worker processes (default 1: this process)")
    where.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                       help="run on Ray (pip install 'archc[ray]'): a cluster ADDRESS, or a "
                       "local Ray without one")
    sweep.add_argument("--cpus-per-model", type=arguments.positive_float, default=None,
                       metavar="C", help="with --ray: CPUs Ray reserves for each model (default "
                       "1; --threads sets torch's threads inside)")
    sweep.add_argument("--gpus-per-model", type=arguments.positive_float, default=None,
                       metavar="G", help="with --ray: GPUs Ray reserves for each model (default "
                       "0; 1 runs one model per GPU, 0.5 two); the model trains on its GPU with "
                       "--device auto")
    sweep.add_argument("--trainer", default=None, metavar="MODULE:FUNCTION",
                       help="your trainer instead of archc's: called as function(spec, data=, "
                       "epochs=, seed=, config=) and returning a mapping with best_error; config "
                       "holds the training options, --device and --precision included")

    analyze = space_commands.add_parser(
        "analyze",
        help="EDFs, normalized EDF, bootstrapped best parameters and trend plots of sweeps",
        description="Compare the spaces of one or more results files: error EDFs (legend n | "
        "min | mean), the flops-normalized EDF, the empirical bootstrap of the best value of "
        "each parameter and trend plots (PNG and SVG), and summary.json / summary.md.",
    )
    analyze.add_argument("results", type=Path, nargs="+", metavar="RESULTS",
                         help="results files (.jsonl) of `archc space sweep`, one per space")
    analyze.add_argument("-o", "--output", type=arguments.output_folder, required=True,
                         metavar="DIR", help="report directory (made if missing; a rerun "
                         "replaces its files)")
    analyze.add_argument("--resamples", type=arguments.positive_int, default=10_000,
                         help="bootstrap resamples (default 10,000, as the paper)")
    analyze.add_argument("--fraction", type=_fraction, default=0.25,
                         help="bootstrap resample size as a fraction of the models (0.25)")
    analyze.add_argument("--bins", type=arguments.positive_int, default=10,
                         help="flops bins of the normalized EDF (default 10)")
    analyze.add_argument("--permutations", type=arguments.positive_int, default=10_000,
                         help="permutations of the test of the normalized EDFs (default 10,000)")
    analyze.add_argument("--seed", type=arguments.seed, default=0,
                         help="bootstrap and permutation seed (default 0)")

    fit = space_commands.add_parser(
        "fit",
        help="fit a RegNet (w0, wa, wm) to per-block widths; report e_fit, emit the spec",
        description="The quantized linear fit of Radosavovic et al. 2020: for SOURCE (a spec, or "
        "every line of a samples or results file) find the RegNet with the same depth and "
        "number of stages whose per-block widths minimize e_fit, the mean |log ratio|.",
    )
    fit.add_argument("source", type=Path, metavar="SOURCE",
                     help="a spec (.yaml/.json) or a samples/results file (.jsonl)")
    fit.add_argument("-o", "--output", type=arguments.output_path(FIT_FORMATS), metavar="OUT",
                     help="the fitted RegNet spec (.yaml/.json) for a spec, or a .jsonl of fits "
                     "for a samples/results file; default: print")
    fit.add_argument("--json", action="store_true",
                     help="one JSON report on stdout (the fit, what it changes, and the fitted "
                     "spec or fits) instead of the text and the printed spec or fits")

    train = commands.add_parser(
        "train",
        help="train a spec or fine-tune a model (archc checkpoint, .pt2, pickled module)",
        description="Train SPEC (built with archc's initialisation) or fine-tune MODEL (an archc "
        "checkpoint, a torch.export program or, with --trust-pickle, a pickled nn.Module) with "
        "the shared loop: SGD with momentum, cosine schedule, weight decay, optional label "
        "smoothing and EMA. The result is written in the model's own format. Progress on "
        "stderr, metrics as JSON on stdout.",
    )
    train.add_argument("model", type=Path, metavar="SPEC|MODEL",
                       help=arguments.MODEL_SOURCES)
    train.add_argument("-o", "--output", type=arguments.output_path((".pt", ".pt2")),
                       required=True, metavar="OUT",
                       help="the trained model in the input's format: an archc checkpoint (.pt) "
                       "of a spec or checkpoint, a .pt2 program of a program, a pickled module "
                       "(.pt) of a pickled module")
    arguments.add_model_source_options(train)
    train.add_argument("--seed", type=arguments.seed, default=0,
                       help="weights and batch order (default 0)")
    train.add_argument("--metrics", type=arguments.output_path((".json",)), metavar="FILE",
                       help="also write the metrics here (.json)")
    _add_training_options(train, epochs_required=False)
    group = train.add_argument_group("long runs")
    group.add_argument("--metrics-jsonl", type=arguments.output_path((".jsonl",)),
                       metavar="FILE", help="one JSON line per finished epoch (epoch, losses, "
                       "errors, images/s, seconds), rewritten after every epoch")
    group.add_argument("--save-every", type=arguments.positive_int, default=None, metavar="N",
                       help="write the run state (model, optimizer, schedule step, EMA, random "
                       "states) to CKPT's stem + .state.pt every N epochs and after the last")
    group.add_argument("--resume", type=Path, default=None, metavar="STATE",
                       help="continue the run whose state --save-every wrote (same model, data "
                       "and training options; the device may differ)")
    _add_loader_options(train)
    train.add_argument("--augment", choices=("none", "basic"), default="none",
                       help="image folders only: basic = random-resized crop (scale 0.08..1, "
                       "ratio 3/4..4/3) and horizontal flip for training; none = resize and "
                       "centre crop (default; evaluation always resizes and centre-crops)")
    train.add_argument("--json", action="store_true",
                       help="the metrics as JSON on stdout even with --quiet (the default text "
                       "is the same JSON)")
    cli_compress.add_train_options(train)  # --slimming, --teacher, --kd-temperature, --kd-weight

    evaluate = commands.add_parser(
        "eval",
        help="validation error of a trained model or an ONNX model on a data set",
        description="Evaluate MODEL (an archc checkpoint, a torch.export program or, with "
        "--trust-pickle, a pickled nn.Module: eager PyTorch) or MODEL.onnx (ONNX Runtime) on "
        "the validation split of DATA; metrics as JSON on stdout.",
    )
    evaluate.add_argument("model", type=Path, metavar="MODEL|MODEL.onnx",
                          help="archc checkpoint (.pt), torch.export program (.pt2), pickled "
                          "nn.Module (.pt, with --trust-pickle) or ONNX model (.onnx)")
    arguments.add_model_source_options(evaluate)
    evaluate.add_argument("--data", required=True, metavar="DATA",
                          help="digits, a .npz with x and y, or a directory of class folders")
    evaluate.add_argument("--batch-size", type=arguments.positive_int, default=256,
                          help="default 256")
    arguments.add_device_options(evaluate, precision=False)
    _add_loader_options(evaluate)
    evaluate.add_argument("--json", action="store_true",
                          help="the metrics as JSON on stdout even with --quiet (the default "
                          "text is the same JSON)")
    evaluate.add_argument("--predictions", type=Path, metavar="FILE.json",
                          help="also write every validation example's label and top-1 class "
                          "(in the split's order) here, for paired tests of two models "
                          "(docs/design-spaces.md, eval)")
    evaluate.add_argument("--against", type=Path, metavar="OTHER.json",
                          help="a --predictions file of another model on the same data: compare "
                          "the two image by image (exact McNemar test)")


def _space(args: argparse.Namespace) -> int:
    handlers = {"sample": _sample, "sweep": _sweep, "analyze": _analyze, "fit": _fit}
    return handlers[args.space_command](args)


def _sample(args: argparse.Namespace) -> int:
    from archc.common.progress import Progress
    from archc.space.design_space import SamplingStats, load_space
    from archc.space.records import write_records

    out = Output(args)
    space = load_space(args.space, args.set)
    stats = SamplingStats()
    progress = Progress(args.n, f"sampling {space.name}", every=0.1, enabled=out.show_progress)
    start = time.time()
    records = []
    for sample in space.samples(args.n, args.seed, stats):
        records.append(sample.record(space.name, args.seed))
        progress.update(stats.accepted, f"acceptance {100 * stats.acceptance:.2f}%")
    progress.close()
    write_records(args.output, records)
    seconds = time.time() - start
    out.note(f"{space.name}: {stats.summary()}")
    out.note(f"wrote {args.output}: {counted(len(records), 'sample')} in {seconds:.1f} s "
             f"({len(records) / seconds:.1f} samples/s, {stats.tries / seconds:,.0f} tries/s)")
    return 0


def _sweep_samples(args: argparse.Namespace) -> list[dict]:
    """The samples of a sweep: read from a samples file, or drawn from a space file."""
    from archc.errors import SpaceError
    from archc.space.records import read_records

    if args.source.suffix.lower() == ".jsonl":
        if args.n is not None or args.set:
            raise SpaceError("-n and --set apply to a space file, not to a samples file", "",
                             str(args.source))
        samples, truncated = read_records(args.source, "samples")
        if truncated:
            raise SpaceError("the last line is cut short: not a complete samples file", "",
                             str(args.source))
        seen = set()
        for number, sample in enumerate(samples, start=1):
            if not isinstance(sample.get("id"), str) or not isinstance(sample.get("spec"), dict):
                raise SpaceError("a sample needs an id and a spec", f"line {number}",
                                 str(args.source))
            if sample["id"] in seen:
                raise SpaceError(f"id {sample['id']} appears twice", f"line {number}",
                                 str(args.source))
            seen.add(sample["id"])
        if not samples:
            raise SpaceError("no samples", "", str(args.source))
        return samples
    from archc.space.design_space import load_space

    if args.n is None:
        raise SpaceError("sampling a space needs -n N (or give a samples file)", "",
                         str(args.source))
    space = load_space(args.source, args.set)
    return [sample.record(space.name, args.seed) for sample in space.samples(args.n, args.seed)]


def _sweep_resources(args: argparse.Namespace) -> dict[str, float]:
    """What each Ray task asks for: `--cpus-per-model` / `--gpus-per-model` (Ray only)."""
    from archc.errors import ArchcError

    resources = {key: value for key, value in (("num_cpus", args.cpus_per_model),
                                               ("num_gpus", args.gpus_per_model))
                 if value is not None}
    if resources and args.ray is None:
        raise ArchcError("--cpus-per-model and --gpus-per-model reserve Ray resources per model: "
                         "add --ray (local --workers N runs N models on this machine's CPUs)")
    if (args.ray is not None and not resources.get("num_gpus")
            and args.device.strip().lower().startswith("cuda")):
        raise ArchcError(f"--device {args.device} with --ray needs --gpus-per-model: Ray hides "
                         f"the GPUs from a task that reserves none")
    return resources


def _sweep(args: argparse.Namespace) -> int:
    from archc.space.sweep import BUILTIN_TRAINER, resolve_trainer, run_sweep

    resources = _sweep_resources(args)
    if resources.get("num_gpus"):  # the GPUs are the Ray cluster's, maybe not this machine's
        from archc.train.device import check_precision

        check_precision(args.precision)
    else:  # checked here; each worker resolves `auto` on its own machine
        arguments.resolved_device(args)
    samples = _sweep_samples(args)
    trainer = args.trainer or BUILTIN_TRAINER
    resolve_trainer(trainer)
    out = Output(args)
    if args.trainer is None:
        _check_data(args, samples[0]["spec"], out)
    setup = {"data": args.data, "epochs": args.epochs, "seed": args.seed, "trainer": trainer,
             "options": _training_options(args)}
    summary = run_sweep(samples, args.output, setup, workers=args.workers,
                        ray_address=args.ray, resources=resources, quiet=out.quiet,
                        progress=out.show_progress)
    held = summary["already"] + summary["trained"]
    out.say(f"trained {counted(summary['trained'], 'model')} ({summary['failed']} failed) in "
          f"{summary['seconds']:.1f} s; {args.output} holds {held} of {summary['total']}")
    return 0


def _analyze(args: argparse.Namespace) -> int:
    from archc.space.report import comparison_text, load_results, write_report

    out = Output(args)
    spaces = load_results(args.results)
    for space in spaces:
        if space.truncated:
            out.note(f"note: {space.files[0]}: skipped a cut-short last line")
    summary = write_report(spaces, args.output, args.resamples, args.seed, args.fraction,
                           args.bins, args.permutations)
    for space in summary["spaces"]:
        e = space["error"]
        band = e["median_interval"]
        out.say(f"{space['label']}: {counted(space['n'], 'model')} ({space['failed']} failed), "
                f"error min {e['min']:.2f} mean {e['mean']:.2f} "
                f"median {e['median']:.2f}"
                + ("" if band is None else f" [95%: {band[0]:.2f}, {band[1]:.2f}]"))
    if len(spaces) > 1:
        dropped = [f"{space['normalized']['dropped']} of {space['label']}"
                   for space in summary["spaces"] if space["normalized"]["dropped"]]
        out.say(f"normalized EDFs: {summary['common_bins']} of "
                f"{counted(summary['bins'], 'flops bin')} common; models dropped: "
                f"{', '.join(dropped) if dropped else 'none'}")
    for comparison in summary["comparisons"]:
        out.say(comparison_text(comparison))
    out.say(f"wrote {args.output}/: {', '.join(summary['plots'])}, summary.json, summary.md")
    return 0


def _fit(args: argparse.Namespace) -> int:
    from archc.errors import SpaceError
    from archc.space.fit import fit_changes, fit_spec

    records = args.source.suffix.lower() == ".jsonl"
    if args.output is not None and (args.output.suffix.lower() == ".jsonl") != records:
        raise SpaceError(f"-o {args.output}: the fits of a samples or results file are written "
                         f"as .jsonl, the fitted spec of a spec as {', '.join(SPEC_FORMATS)}",
                         "", str(args.source))
    if records:
        return _fit_records(args)
    from archc.frontend.loading import load_spec, spec_from_mapping

    spec = load_spec(args.source)
    fit, fitted = fit_spec(spec)
    if fit is None:
        raise SpaceError(f"no RegNet of depth {sum(s.depth for s in spec.stages())} has "
                         f"{counted(len(spec.stages()), 'stage')}", "body", str(args.source))
    fitted_spec = spec_from_mapping(fitted, "fitted spec")
    changes = fit_changes(spec, fitted_spec)
    out = Output(args)
    out.note(f"{spec.name}: e_fit = {fit.e_fit:.4f} with w0 = {fit.w0}, wa = {fit.wa:g}, "
             f"wm = {fit.wm:g} (d = {len(fit.widths)})")
    for line in _change_lines(changes):
        out.note(f"  {line}")
    if changes["large"]:
        out.warning(f"the fitted RegNet is a different network: "
                    f"{'; '.join(changes['large'])}")
    fitted_dict = fitted_spec.to_dict()
    if args.output is not None or not out.json:
        write_spec(fitted_dict, args.output, out)
    out.report({"source": str(args.source), "e_fit": fit.e_fit, "w0": fit.w0, "wa": fit.wa,
                "wm": fit.wm, "depth": len(fit.widths), "changes": changes,
                "output": None if args.output is None else str(args.output),
                "spec": fitted_dict})
    return 0


def _change_lines(changes: dict) -> list[str]:
    """`archc.space.fit.fit_changes` as text: each changed stage field, then the complexity."""
    from archc.cli.output import count_text

    lines = ["what the fit changes (source -> RegNet):"]
    if not changes["stages"]:
        lines.append("  stages: unchanged")
    for name, change in changes["stages"].items():
        lines.append(f"  {name.replace('_', ' ')}: {_stage_values(change['before'])} -> "
                     f"{_stage_values(change['after'])}")
    for name, change in changes["complexity"].items():
        lines.append(f"  {name}: {count_text(change['before'])} -> {count_text(change['after'])} "
                     f"({change['relative']:+.1%})")
    return lines


def _stage_values(values: list) -> str:
    """Per-stage values: one value when every stage has it ("dense" for a group width of
    None), else the list."""
    shown = ["dense" if value is None else value for value in values]
    if all(value == shown[0] for value in shown):
        return f"{shown[0]} (every stage)"
    return "[" + ", ".join(str(value) for value in shown) + "]"


def _fit_records(args: argparse.Namespace) -> int:
    from archc.errors import SpaceError, SpecError
    from archc.frontend.spec import validate_schema
    from archc.space.fit import LARGE_CHANGE, fit_changes, fit_spec
    from archc.space.records import dumps, read_records, write_records

    out = Output(args)
    records, _ = read_records(args.source, "samples or results")
    fits = []
    for number, record in enumerate(records, start=1):
        if not isinstance(record.get("spec"), dict):
            raise SpaceError("a line needs a spec", f"line {number}", str(args.source))
        try:
            spec = validate_schema(record["spec"], f"{args.source}:line {number}")
        except SpecError as exc:
            raise SpaceError(f"the spec is not valid: {exc.message}", f"line {number}",
                             str(args.source)) from None
        fit, fitted = fit_spec(spec)
        entry = {"id": record.get("id", spec.name), "best_error": record.get("best_error"),
                 "e_fit": None if fit is None else fit.e_fit}
        if fit is not None:
            changes = fit_changes(spec, validate_schema(fitted, "fitted spec"))
            entry.update(w0=fit.w0, wa=fit.wa, wm=fit.wm, changes=changes, spec=fitted)
        fits.append(entry)
    if args.output is not None:
        write_records(args.output, fits)
        out.note(f"wrote {args.output}: {counted(len(fits), 'fit')}")
    elif not out.json:
        for entry in fits:
            print(dumps(entry))
    values = [f["e_fit"] for f in fits if f["e_fit"] is not None]
    if values:
        out.note(f"e_fit: median {float(sorted(values)[len(values) // 2]):.4f}, min "
                 f"{min(values):.4f}, max {max(values):.4f} over {counted(len(values), 'model')}")
        different = sum(bool(f["changes"]["large"]) for f in fits if f["e_fit"] is not None)
        out.note(f"{different} of {counted(len(values), 'fitted RegNet')} "
                 f"{'is a different network' if different == 1 else 'are different networks'} "
                 f"(flops or params beyond ±{LARGE_CHANGE:.0%}, or a form a RegNet cannot "
                 f"express: the lines' changes.large)")
    out.report({"source": str(args.source),
                "output": None if args.output is None else str(args.output), "fits": fits})
    return 0


def _check_data(args: argparse.Namespace, spec_dict: dict, out: Output) -> None:
    """Fail before any training if the data cannot feed the built-in trainer; warn about what
    is legal but probably a mistake (docs/design-spaces.md, "Warnings")."""
    from archc.frontend.loading import spec_from_mapping
    from archc.train.data import open_data
    from archc.train.loop import check_classes, ema_warning

    spec = spec_from_mapping(spec_dict, "sample")
    # the checks need the classes, sizes and channels, not the images at the models' size (all
    # of digits at 224x224 would take 1 GB): arrays are read at 8x8
    data = open_data(args.data, spec.input.channels, min(spec.input.size, 8))
    mismatch = check_classes(spec.num_classes, data)
    for warning in (mismatch and f"{mismatch}; for a space: --set base.num_classes={data.classes}",
                    _upscaling_warning(data, spec.input.size, "the models read",
                                       "for a small version of a space add --set "
                                       "base.input.size=32 with a flops window for 32 pixels "
                                       "(docs/design-spaces.md, 'The shipped spaces')"),
                    None if args.ema is None else ema_warning(
                        args.ema, args.epochs * -(-data.train_size // args.batch_size))):
        if warning is not None:
            out.warning(warning)


def _upscaling_warning(data, size: int, reader: str, advice: str) -> str | None:
    """A warning when `data`'s stored images are much smaller than the model's input."""
    from archc.train.data import upscaling

    factor = upscaling(data, size)
    if factor is None:
        return None
    height, width = data.stored_size
    return (f"{reader} {size}x{size} images but the images of {data.name} are "
            f"{height}x{width}: each is upscaled {factor:.0f}x, so training pays the flops of "
            f"{size}x{size} inputs for {height}x{width} content; {advice}")


def _train(args: argparse.Namespace) -> int:
    """`archc train`; under torchrun, one of the processes training the model together
    (archc.train.distributed): rank 0 alone prints and writes."""
    from archc.train.distributed import device_for, from_environment, process_group

    ranks = from_environment()
    device = arguments.resolved_device(args)
    if ranks is None:
        return _train_on(args, device, None)
    placed = device_for(ranks, args.device)
    with process_group(ranks, placed):
        return _train_on(args, str(placed), ranks)


def _train_on(args: argparse.Namespace, device: str, ranks) -> int:
    from archc.backends.trainable import load_trainable
    from archc.common.fileio import atomic_output
    from archc.train.data import open_data
    from archc.train.loop import TrainConfig, Trainer, check_classes
    from archc.train.state import load_run_state

    main = ranks is None or ranks.main
    source = load_trainable(args.model, trust_pickle=args.trust_pickle,
                            input_shape=args.input_shape)
    source.check_output(args.output)
    out = Output(args if main else argparse.Namespace(quiet=True))
    plugins, overrides, compression = cli_compress.train_plugins(args, source)
    config = TrainConfig(epochs=args.epochs, seed=args.seed,
                         **{**_training_options(args), "device": device, **overrides})
    identity = {**source.identity(), "data": args.data, "augment": args.augment,
                "config": config.describe(),
                "compression": compression}
    resume = None if args.resume is None else load_run_state(args.resume, identity)
    data = open_data(args.data, source.channels, source.size, args.augment, args.workers,
                     pin_memory=_pins_memory(device))
    source.check_classes(data.classes, data.name)
    for warning in (check_classes(source.num_outputs, data),
                    _upscaling_warning(data, source.size, "the model reads",
                                       "for digits, the specs "
                                       "bench/compression/digits_*.yaml read 8x8")):
        if warning is not None:
            out.warning(warning)
    out.note(data.describe() + ("" if ranks is None else
                                f"; {ranks.size} processes share every batch of "
                                f"{args.batch_size}"))
    model = source.model(seed=args.seed)
    state_path = args.output.with_suffix(".state.pt") if args.save_every else None
    trainer = Trainer(config, plugins, progress=out.show_progress, label=source.name,
                      save_every=args.save_every or 0, state_path=state_path, identity=identity,
                      metrics_jsonl=args.metrics_jsonl, ranks=ranks, warn=out.warning)
    result = trainer.fit(model, data, resume=resume)
    if not main:
        return 0  # rank 0 writes the checkpoint and the metrics
    for epoch in result.history:
        out.note(f"epoch {epoch['epoch']}: train loss {epoch['train_loss']:.4f}, validation "
                 f"error {epoch['val_error']:.2f}%" + (f" (EMA {epoch['ema_val_error']:.2f}%)"
                                                       if "ema_val_error" in epoch else ""))
    example = source.example(batch=2, seed=args.seed)
    compression.update(cli_compress.after_training(plugins, result.model, example, out))
    source.save(result.model, args.output, example)
    metrics = {"model": source.name, "kind": source.kind, "data": data.name,
               "train_size": data.train_size,
               "val_size": data.val_size, "config": config.describe(),
               **({"compression": compression} if compression else {}), **result.metrics(),
               "checkpoint": str(args.output),
               **({"run_state": str(state_path)} if state_path else {}),
               **({"resumed_from": str(args.resume)} if args.resume else {})}
    text = json.dumps(metrics, indent=1)
    if args.metrics is not None:
        with atomic_output(args.metrics) as temporary:
            temporary.write_text(text + "\n")
    out.say(text)  # the metrics are this command's text; with --json, its report
    out.report(metrics)
    return 0


def _pins_memory(device: str) -> bool:
    """Pin the loader's batches in page-locked memory when the model runs on a CUDA device."""
    import torch

    from archc.train.device import pins_memory

    return pins_memory(torch.device(device))


def _eval(args: argparse.Namespace) -> int:
    from archc.common.accuracy_stats import wilson_interval
    from archc.errors import DataError
    from archc.train.data import open_data
    from archc.train.loop import evaluate_batches

    against = None if args.against is None else _read_predictions(args.against)
    onnx = args.model.suffix.lower() == ".onnx"
    if onnx and args.device not in ("auto", "cpu"):
        from archc.errors import DeviceError

        raise DeviceError(f"--device {args.device}: an ONNX model is evaluated by ONNX Runtime "
                          f"on the CPU; evaluate the checkpoint (.pt) on a GPU")
    device = "cpu" if onnx else arguments.resolved_device(args)
    if onnx:
        from archc.backends.onnx_runtime import onnx_classifier

        run, (channels, size), outputs = onnx_classifier(args.model)
    else:
        from archc.backends.trainable import SPEC, load_trainable

        source = load_trainable(args.model, trust_pickle=args.trust_pickle,
                                input_shape=args.input_shape)
        if source.kind == SPEC:
            raise DataError(f"{args.model}: a spec has no trained weights; give a trained "
                            f"checkpoint (.pt), program (.pt2) or ONNX model")
        run, channels, size, outputs = (source.model().to(device), source.channels, source.size,
                                        source.num_outputs)
    data = open_data(args.data, channels, size, workers=args.workers,
                     pin_memory=_pins_memory(device))
    if data.classes > outputs:
        raise DataError(f"{args.model} has {outputs} outputs but {data.name} has {data.classes} "
                        f"classes")
    outcomes: list[tuple[int, int]] = []
    metrics = evaluate_batches(run, data.val_batches(args.batch_size), device, outcomes)
    correct = sum(label == top1 for label, top1 in outcomes)
    low, high = wilson_interval(correct, len(outcomes))
    document = {"model": str(args.model), "data": data.name, "split": "validation",
                "device": device, "samples": len(outcomes), **metrics, "correct": correct,
                "accuracy_interval_95": [100 * low, 100 * high]}
    if args.against is not None:
        from archc.common.accuracy_stats import compare_paired

        other = _same_examples(args.against, against, [label for label, _ in outcomes])
        paired = compare_paired(other, [label == top1 for label, top1 in outcomes])
        document["against"] = {"file": str(args.against), **paired.document(),
                               "verdict": paired.verdict(args.against.name, args.model.name)}
    if args.predictions is not None:
        from archc.common.fileio import atomic_output

        with atomic_output(args.predictions) as temporary:
            temporary.write_text(json.dumps({
                "model": str(args.model), "data": data.name, "split": "validation",
                "labels": [label for label, _ in outcomes],
                "predictions": [top1 for _, top1 in outcomes]}) + "\n")
    out = Output(args)
    out.say(json.dumps(document, indent=1))  # the metrics are this command's text
    out.report(document)
    return 0


def _read_predictions(path: Path) -> tuple[list, list]:
    """(labels, predictions) of a `--predictions` file, read before any work is done."""
    from archc.errors import DataError

    try:
        document = json.loads(path.read_text())
        labels, predicted = document["labels"], document["predictions"]
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc.strerror})") from None
    except (ValueError, TypeError, KeyError):
        raise DataError(f"{path}: not a predictions file of archc eval --predictions (JSON "
                        f"with 'labels' and 'predictions')") from None
    if not isinstance(labels, list) or not isinstance(predicted, list) or len(labels) != len(
            predicted):
        raise DataError(f"{path}: 'labels' and 'predictions' must be lists of one length")
    return labels, predicted


def _same_examples(path: Path, read: tuple[list, list], labels: list[int]) -> list[bool]:
    """The per-example correctness of a `--predictions` file, checked to be of the same examples
    (the same labels in the same order) as `labels`."""
    from archc.errors import DataError

    theirs, predicted = read
    if theirs != labels:
        raise DataError(f"{path}: its {len(theirs)} labels are not this data's {len(labels)} "
                        f"validation labels in order: evaluate both models on the same data")
    return [label == top1 for label, top1 in zip(theirs, predicted, strict=True)]


HANDLERS = {"space": _space, "train": _train, "eval": _eval}
