"""The describing commands of the CLI: `archc info` (per-stage complexity of a spec or checkpoint),
`archc show` (the graph drawn before and after the passes), `archc passes` (the catalogue),
`archc models` (the shipped specs) and `archc schema` (the spec language's JSON Schema).

`add_commands` adds the parsers to `archc.cli.main`'s subcommands; `HANDLERS` maps each command to
its handler. Parsing imports nothing heavy; the handlers import what they need.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from archc.cli import arguments
from archc.cli.build import add_input_size, checked_pipeline
from archc.cli.output import Output, count_text, counted

CHECKPOINT_FORMATS = (".pt", ".pth", ".pt2")


def add_commands(commands) -> None:
    """Add `passes`, `info`, `models`, `show` and `schema` to the `archc` subcommands."""
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
    add_input_size(info)
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
    add_input_size(show)
    show.add_argument("--after", metavar="PASS", default=None,
                      help="the graph after this pass of the pipeline (default: after all)")
    show.add_argument("--passes", default=None, metavar="PIPELINE",
                      help="pipeline to run (default 'default')")
    show.add_argument("--depth", type=arguments.int_in(1, 6, "name components per box"),
                      default=2, help="name components that make one box (default 2: s1.b1)")
    show.add_argument("--trust-pickle", action="store_true",
                      help="allow a whole pickled nn.Module: unpickling runs its code")

    schema = commands.add_parser("schema", help="print the JSON Schema of the spec language")
    schema.add_argument("-o", "--output", type=arguments.output_path((".json",)), metavar="FILE",
                        help="write to FILE (.json)")


def _passes(args: argparse.Namespace) -> int:
    import archc.passes  # noqa: F401 - registers the catalogue
    from archc.rewrite.pipeline import list_passes, pipelines

    out = Output(args)
    for info in list_passes():
        kind = "exact" if info.preserves_function else "CHANGES THE FUNCTION"
        out.say(f"{info.name:<28} {kind:<21} {info.summary}")
        for option in info.options:
            out.say(f"    option {info.name}.{option.name} ({option.type.__name__}, default "
                    f"{option.default!r}): {option.help}")
    out.say("")
    for name, names in pipelines().items():
        out.say(f"pipeline {name}: {', '.join(names) or '(no passes)'}")
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
            f"{count_text(total.flops)} flops, {total.params / 1e6:,.2f}M params)")
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
        out.say(f"{row['name']:<28} {row['params'] / 1e6:>8.2f}M {count_text(row['flops']):>10} "
                f"{row['input_size']:>6}  {row['body']}")
    out.say(f"{counted(len(rows), 'spec')}; build one by name: "
            f"archc build {rows[0]['name']} -o model.onnx")
    return 0


def _show(args: argparse.Namespace) -> int:
    pipeline = checked_pipeline(args)
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
        preflight(spec, input_size=args.input_size, source=str(args.spec))
        gm, name = lower.build(spec, init="random"), spec.name
        shape = lower.input_shape(spec, 1, args.input_size)
    names, options = pipeline
    if args.after is not None:
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


HANDLERS = {"passes": _passes, "info": _info, "models": _models, "show": _show,
            "schema": _schema}
