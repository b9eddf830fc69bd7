"""The compression commands of the CLI: `archc prune`, `archc lowrank`.

`add_commands` adds the parsers to `archc.cli.main`'s subcommands; `HANDLERS` maps each command to
its handler. Parsing imports nothing heavy; the handlers import what they need.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from archc.cli import arguments
from archc.cli.output import SPEC_FORMATS, Output, write_spec


def _add_model_and_output(parser: argparse.ArgumentParser, made: str) -> None:
    """MODEL and -o OUT of a command that rewrites any model: an archc checkpoint stays one, any
    other model is written as a torch.export program."""
    parser.add_argument("checkpoint", type=Path, metavar="MODEL",
                        help="archc checkpoint (.pt), torch.export program (.pt2) or, with "
                        "--trust-pickle, a whole pickled nn.Module (.pt)")
    parser.add_argument("-o", "--output", type=arguments.output_path((".pt", ".pt2")),
                        required=True, metavar="OUT",
                        help=f"{made} archc checkpoint (.pt) of an archc checkpoint; a "
                        "torch.export program (.pt2) of any other model")


def _energy(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{value:g} is not in (0, 1]")
    return value


_checkpoint_output = arguments.output_path((".pt",))
_reduced_output = arguments.output_path((".pt", ".pt2"))


def add_commands(commands) -> None:
    """Add `prune` and `lowrank` to the `archc` subcommands."""
    prune = commands.add_parser(
        "prune",
        help="structured channel pruning of a checkpoint over its channel groups",
        description="Remove whole channels of MODEL's free channel groups (archc.ir.channels: "
        "residual adds, concatenations, depthwise convs, grouped convs and SE gates stay "
        "consistent), scored by filter norm, BN scale or at random; write the pruned "
        "checkpoint. See docs/compression.md.",
    )
    _add_model_and_output(prune, "pruned")
    prune.add_argument("--trust-pickle", action="store_true",
                       help="allow a whole pickled nn.Module: unpickling runs its code")
    prune.add_argument("--input-shape", type=arguments.input_option, action="append",
                       metavar="SIZES[:DTYPE[:BOUND]]",
                       help="example input of a model without a spec, once per input in "
                       "order: 1,3,224,224 (float32), 1:int64:10 (class labels in [0, 10); "
                       "without :10, the rows of the nn.Embedding it feeds); default: the "
                       "program's inputs, or a pickled module's first layer channels at "
                       "224x224")
    amount = prune.add_mutually_exclusive_group(required=True)
    amount.add_argument("--ratio", type=arguments.open_unit_interval, metavar="R",
                        help="fraction of each group's channels (or, with --global, of all "
                        "prunable channels) to remove, in (0, 1)")
    amount.add_argument("--macs", type=arguments.open_unit_interval, metavar="F",
                        help="search the ratio so that the pruned model keeps at most this "
                        "fraction of the MACs, e.g. 0.5")
    prune.add_argument("--criterion", choices=("l1", "l2", "bn-scale", "random"), default="l1",
                       help="channel score: filter L1 / L2 norm, |BN gamma| (after --slimming "
                       "training), random (a control); default l1")
    prune.add_argument("--global", dest="global_threshold", action="store_true",
                       help="one threshold over all groups instead of the same ratio per group")
    prune.add_argument("--round-to", type=arguments.positive_int, default=1, metavar="N",
                       help="keep channel counts that are multiples of N (e.g. 8)")
    prune.add_argument("--group-policy", choices=("keep-count", "keep-width"),
                       default="keep-count",
                       help="grouped convs: keep the group count with per-group top-k "
                       "channels (default), or keep the group width and remove whole groups")
    prune.add_argument("--heads", choices=("dims", "heads"), default="dims",
                       help="attention: prune the head dims and only dead heads (default), or "
                       "whole heads (Michel et al. 2019) keeping the head dims")
    prune.add_argument("--seed", type=arguments.seed, default=0,
                       help="seed of the random criterion (default 0)")
    prune.add_argument("--spec", dest="spec_output",
                       type=arguments.output_path(SPEC_FORMATS), default=None,
                       metavar="FILE",
                       help="also write the pruned model's spec (YAML, or JSON for .json); an "
                       "error if the pruned widths are not expressible as a spec")
    prune.add_argument("--no-verify", dest="verify", action="store_false",
                       help="a model archc did not build: do not check the passes that bring "
                       "its graph to canonical form in float64 (the written program is still "
                       "compared with the pruned model)")
    prune.add_argument("--json", action="store_true",
                       help="print one machine-readable JSON report on stdout instead of text")

    lowrank = commands.add_parser(
        "lowrank",
        help="low-rank decomposition: SVD of 1x1 convs and Linears, Tucker-2 of KxK convs",
        description="Replace each 1x1 conv and Linear by two thin layers (truncated SVD) and "
        "each KxK conv by 1x1 -> KxK core -> 1x1 (Tucker-2), where that lowers its MACs; the "
        "rank keeps --energy of the squared singular values, or is searched to meet --macs. "
        "Reports the relative error of every layer. See docs/compression.md.",
    )
    _add_model_and_output(lowrank, "decomposed")
    arguments.add_model_source_options(lowrank)
    target = lowrank.add_mutually_exclusive_group()
    target.add_argument("--energy", type=_energy, default=None, metavar="E",
                        help="keep this fraction of each layer's squared singular values, in "
                        "(0, 1] (default 0.9)")
    target.add_argument("--macs", type=arguments.open_unit_interval, metavar="F",
                        help="one energy for all layers, searched so that the model keeps at "
                        "most this fraction of the MACs")
    lowrank.add_argument("--data", default=None, metavar="DATA",
                         help="measure the output error on (up to 256) validation images of DATA "
                         "(digits, a .npz or a folder) instead of a random input")
    lowrank.add_argument("--kxk", choices=("tucker2", "spatial", "cheaper"), default="tucker2",
                         help="KxK convs: 1x1 -> KxK core -> 1x1 (tucker2, default), Kx1 -> 1xK "
                         "(spatial), or whichever has fewer MACs at the energy (cheaper)")
    lowrank.add_argument("--json", action="store_true",
                         help="print one machine-readable JSON report on stdout instead of text")

    reduce = commands.add_parser(
        "reduce",
        help="ReduceNet: the reduced phase (branch1 dropped) of a train-phase checkpoint or "
        "program",
        description="Write the reduced phase of a train-phase ReduceNet checkpoint or .pt2 "
        "program: every reducenet stage becomes phase: reduced (scaler 0, branch1 not built) and "
        "every other weight is carried over by name. A .pt2 must store the spec archc wrote in "
        "it (a program of a spec model whose weights no pass changed: `archc build --passes "
        "none`, `archc train X.pt2`, `archc reduce`); the reduced model is written in the "
        "input's format. Fine-tune it with `archc train REDUCED.pt --teacher TRAIN.pt --freeze "
        "'head.*'`; see docs/compression.md.",
    )
    reduce.add_argument("checkpoint", type=Path, metavar="MODEL",
                        help="train-phase archc checkpoint (.pt) or .pt2 program that stores "
                        "its spec")
    reduce.add_argument("-o", "--output", type=_reduced_output, required=True, metavar="OUT",
                        help="reduced model: a checkpoint (.pt) of a checkpoint, a program "
                        "(.pt2) of a program")


def _prune(args: argparse.Namespace) -> int:
    from archc.backends.importers import (
        canonical_graph,
        check_example,
        example_inputs,
        load_model,
    )
    from archc.compress.pruning import PruneConfig, PruneError, prune, prune_to_macs
    from archc.frontend.loading import spec_from_mapping
    from archc.frontend.lower import input_shape
    from archc.ir.init import random_input

    model = load_model(args.checkpoint, trust_pickle=args.trust_pickle)
    check_rewritten_output(model, args.checkpoint, args.output, "pruned", PruneError)
    if model.spec is None and args.spec_output is not None:
        raise PruneError(f"{args.spec_output}: {args.checkpoint} is a {model.kind}: it has no "
                         f"spec to prune into one")
    if model.spec is not None:
        spec = spec_from_mapping(model.spec, str(args.checkpoint))
        example = random_input(input_shape(spec, batch=2), 0)
    else:
        example = example_inputs(model, _input_shapes(args.input_shape), str(args.checkpoint))
        check_example(model.graph_module, example, str(args.checkpoint))
        model.graph_module = canonical_graph(model.graph_module, example, args.verify)

    def config(ratio: float) -> PruneConfig:
        return PruneConfig(ratio, args.criterion, args.global_threshold, args.round_to,
                           args.group_policy, args.seed, heads=args.heads)

    if args.ratio is not None:
        result = prune(model.graph_module, example, config(args.ratio))
    else:
        result = prune_to_macs(model.graph_module, example, args.macs, config)
    document = {"command": "prune", "source": str(args.checkpoint), "kind": model.kind,
                "output": str(args.output), "params": list(result.params),
                "macs": list(result.macs), "groups": [vars(g) for g in result.groups],
                "notes": result.notes}
    if model.spec is None:
        from archc.backends.export import export_program

        export_program(result.graph_module, args.output, example, dynamic_batch=True)
        spec_line = f"spec: none ({args.checkpoint} is a {model.kind})"
    else:
        spec_line = _save_pruned(args, spec, model.spec, result.graph_module, example, document)
    if args.json:
        print(json.dumps(document, indent=1))
    elif not getattr(args, "quiet", False):
        print(result.format())
        print(spec_line)
        print(f"wrote {args.output}")
    return 0


def _input_shapes(options: list[arguments.InputOption] | None):
    """`--input-shape` values as `archc.backends.importers.InputShape`s (None if not given)."""
    if not options:
        return None
    import torch

    from archc.backends.importers import InputShape

    return [InputShape(o.sizes, getattr(torch, o.dtype), o.bound) for o in options]


def check_rewritten_output(model, source: Path, output: Path, what: str, error) -> None:
    """`error` unless `output` has the format a rewritten `model` (an ImportedModel or a
    Trainable) is written in: an archc checkpoint stays one (.pt), any other model becomes a
    torch.export program (.pt2)."""
    suffix = output.suffix.lower()
    if model.spec is None and suffix != ".pt2":
        raise error(f"{output}: {source} is a {model.kind}, not an archc checkpoint: its "
                    f"{what} form is written as a torch.export program (-o NAME.pt2)")
    if model.spec is not None and suffix != ".pt":
        raise error(f"{output}: a {what} archc checkpoint is written as .pt (then `archc fuse` "
                    f"it to .pt2, .onnx or .py)")


def _save_pruned(args: argparse.Namespace, spec, spec_dict: dict, gm, example,
                 document: dict) -> str:
    """Save a pruned archc checkpoint, as a new spec where one expresses it (and write that
    spec with --spec); the report's line about the spec."""
    from archc.backends.checkpoint import save_checkpoint
    from archc.compress.pruned_spec import spec_for_graph
    from archc.compress.pruning import PruneError

    fit = spec_for_graph(spec, gm)
    document.update(spec=fit.spec, spec_reason=fit.reason)
    if args.spec_output is not None and fit.spec is None:
        raise PruneError(f"{args.spec_output}: the pruned model is not expressible as a spec: "
                         f"{fit.reason}")
    if fit.spec is None:  # the original spec plus graph edits
        save_checkpoint(gm, spec_dict, args.output, example)
        return f"spec: none ({fit.reason}); {args.output} holds the graph edits"
    save_checkpoint(fit.graph_module, fit.spec, args.output, example)
    if args.spec_output is not None:
        write_spec(fit.spec, args.spec_output, Output(args))
    return f"spec: {fit.spec['name']}, stored in {args.output}"


def _lowrank(args: argparse.Namespace) -> int:
    from archc.backends.trainable import SPEC, load_trainable
    from archc.compress.lowrank import decompose, decompose_to_macs
    from archc.errors import CheckpointError

    source = load_trainable(args.checkpoint, trust_pickle=args.trust_pickle,
                            input_shape=args.input_shape)
    if source.kind == SPEC:
        raise CheckpointError(f"{args.checkpoint}: a spec has no trained weights; decompose a "
                              f"trained model (.pt, .pt2)")
    check_rewritten_output(source, args.checkpoint, args.output, "decomposed", CheckpointError)
    gm, example = source.graph_module(), source.example()
    measured_on = "a random input"
    if args.data is not None:
        import torch

        from archc.train.data import load_data

        data = load_data(args.data, source.channels, source.size)
        example = torch.from_numpy(data.val_x[:256])
        measured_on = f"{len(example)} validation images of {data.name}"
    if args.macs is not None:
        result = decompose_to_macs(gm, example, args.macs, kxk=args.kxk)
    else:
        result = decompose(gm, example, 0.9 if args.energy is None else args.energy,
                           kxk=args.kxk)
    if source.spec is not None:
        from archc.backends.checkpoint import save_checkpoint

        save_checkpoint(result.graph_module, source.spec, args.output, example[:2])
    else:
        from archc.backends.export import export_program

        export_program(result.graph_module, args.output, example[:2], dynamic_batch=True)
    document = {"command": "lowrank", "source": str(args.checkpoint), "kind": source.kind,
                "output": str(args.output), "energy": result.energy,
                "params": list(result.params), "macs": list(result.macs),
                "output_error": result.output_error, "error_measured_on": measured_on,
                "layers": [vars(layer) for layer in result.layers]}
    if args.json:
        print(json.dumps(document, indent=1))
    elif not getattr(args, "quiet", False):
        print(result.format().replace("on the example input", f"on {measured_on}"))
        print(f"wrote {args.output}")
    return 0


def _reduce(args: argparse.Namespace) -> int:
    from archc.backends.checkpoint import load_checkpoint, save_checkpoint
    from archc.compress.reducenet import ReduceError, reduce

    program = None
    if args.checkpoint.suffix.lower() == ".pt2":
        from archc.backends.trainable import load_trainable

        program = load_trainable(args.checkpoint)
        if program.program_spec is None:
            raise ReduceError(f"{args.checkpoint}: the torch.export program stores no archc spec "
                              f"(archc_spec.json; archc writes it in a .pt2 of a spec model "
                              f"whose weights no pass changed), and the reduced phase is a spec "
                              f"change: reduce the archc checkpoint it came from")
        program.check_output(args.output)
        spec_dict, gm = program.program_spec, program.graph_module()
    else:
        if args.output.suffix.lower() != ".pt":
            raise ReduceError(f"-o {args.output}: {args.checkpoint} is an archc checkpoint: the "
                              f"reduced model is written in its format (-o NAME.pt)")
        spec_dict, gm = load_checkpoint(args.checkpoint)
    reduced_dict, reduced = reduce(spec_dict, gm)
    from archc.frontend.loading import spec_from_mapping
    from archc.frontend.lower import input_shape
    from archc.ir.analysis import complexity_report
    from archc.ir.init import random_input

    example = random_input(input_shape(spec_from_mapping(reduced_dict), batch=2), 0)
    before = complexity_report(gm, tuple(example.shape)).total
    after = complexity_report(reduced, tuple(example.shape)).total
    if program is not None:
        from archc.backends.export import export_program

        export_program(reduced, args.output, example, dynamic_batch=True, spec=reduced_dict)
    else:
        save_checkpoint(reduced, reduced_dict, args.output, example)
    if not getattr(args, "quiet", False):
        print(f"{spec_dict['name']} -> {reduced_dict['name']}: params {before.params:,} -> "
              f"{after.params:,}, MACs {before.flops:,} -> {after.flops:,} per sample")
        print(f"wrote {args.output}")
    return 0


def after_training(plugins: list, model, example, out: Output) -> dict:
    """Merge the LoRA-style branches of a trained model in place; what was merged."""
    from archc.compress.reducenet import LowRankBranch, merge_branches

    if not any(isinstance(p, LowRankBranch) for p in plugins):
        return {}
    count, error = merge_branches(model, example)
    out.note(f"merged {count} low-rank branches into their convs: relative output error "
             f"{error:.2e}")
    return {"merged_branches": count, "merge_relative_error": error}


HANDLERS = {"prune": _prune, "lowrank": _lowrank, "reduce": _reduce}


def add_train_options(train: argparse.ArgumentParser) -> None:
    """`archc train` options of the compression plugins (archc.compress.train_plugins)."""
    group = train.add_argument_group("compression (archc.compress.train_plugins)")
    group.add_argument("--slimming", type=arguments.nonnegative_float, default=None,
                       metavar="LAMBDA",
                       help="network slimming: add LAMBDA * sum |BN gamma| to the loss (e.g. "
                       "1e-4); then `archc prune --criterion bn-scale --global`")
    group.add_argument("--teacher", type=Path, default=None, metavar="MODEL",
                       help="distil from this trained model: an archc checkpoint, a .pt2 "
                       "program or (--trust-pickle) a pickled module, with the student's "
                       "classes and input")
    group.add_argument("--kd-temperature", type=arguments.positive_float, default=4.0, metavar="T",
                       help="softmax temperature of the distillation loss (default 4)")
    group.add_argument("--kd-weight", type=arguments.closed_unit_interval, default=0.5, metavar="W",
                       help="loss = (1 - W) cross-entropy + W T^2 KL(teacher || student) "
                       "(default 0.5)")
    group.add_argument("--freeze", action="append", default=[], metavar="PATTERN",
                       help="keep the parameters matching this fnmatch pattern fixed, e.g. "
                       "'head.*' (repeatable)")
    group.add_argument("--lora", type=arguments.positive_int, default=None, metavar="R",
                       help="freeze every dense conv and train a rank-R linear branch beside it "
                       "instead; the branches are merged into the convs before saving")


def train_plugins(args: argparse.Namespace, student) -> tuple[list, dict, dict]:
    """(plugins, TrainConfig overrides, description) of `archc train`'s compression options for
    `student` (an `archc.backends.trainable.Trainable`); a teacher whose classes or input differ
    from the student's is a DataError."""
    plugins, overrides, described = [], {}, {}
    if args.freeze:
        overrides["freeze"] = tuple(args.freeze)
    if args.lora:
        from archc.compress.reducenet import LowRankBranch

        plugins.append(LowRankBranch(args.lora))
        described["lora_rank"] = args.lora
    if args.slimming:
        from archc.compress.train_plugins import Slimming

        plugins.append(Slimming(args.slimming))
        described["slimming"] = args.slimming
    if args.teacher is not None:
        from archc.compress.train_plugins import Distillation

        teacher = load_teacher(args.teacher, student, args.trust_pickle)
        plugins.append(Distillation(teacher, args.kd_temperature, args.kd_weight))
        overrides["task_weight"] = 1.0 - args.kd_weight
        described.update(teacher=str(args.teacher), kd_temperature=args.kd_temperature,
                         kd_weight=args.kd_weight)
    return plugins, overrides, described


def load_teacher(path: Path, student, trust_pickle: bool):
    """The trained module of `--teacher` in any format `load_trainable` reads, with the same
    classes and input as `student`; a DataError otherwise."""
    from archc.backends.trainable import PICKLED, SPEC, load_trainable
    from archc.errors import DataError

    teacher = load_trainable(path, trust_pickle=trust_pickle)
    if teacher.kind == SPEC:
        raise DataError(f"--teacher {path}: a spec has no trained weights; give a trained model "
                        f"(an archc checkpoint, a .pt2 program or a pickled module)")
    if teacher.kind == PICKLED and teacher.input_shape != student.input_shape:
        # a pickled module records no input size: read it at the student's
        teacher = load_trainable(path, trust_pickle=True, input_shape=student.input_shape)
    if teacher.num_outputs != student.num_outputs:
        raise DataError(f"--teacher {path} has {teacher.num_outputs} classes but the student "
                        f"has {student.num_outputs}")
    if teacher.input_shape != student.input_shape:
        shown = ["x".join(map(str, m.input_shape[1:])) for m in (teacher, student)]
        raise DataError(f"--teacher {path} takes {shown[0]} input but the student {shown[1]}")
    return teacher.model()
