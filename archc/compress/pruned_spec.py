"""A spec for a pruned graph, where the spec language can express it.

Pruning (`archc.compress.pruning`) sets a width per channel group; a spec states widths per stage,
stem and head, and derives every inner width from them (`w_b = round(width *
bottleneck_multiplier)`, `hidden = round(expansion * w_in)`, `se = round(se_ratio * base)`, a
grouped conv's groups from `group_width` or `groups`). So the pruned graph is expressible when one
stage's blocks agree, and then the fields follow from the first block of each stage:

- `width` = output channels of the block's last conv (twice a branch's for ShuffleNetV2's
  concatenated halves); `bottleneck_multiplier` = w_b / width;
  `expansion` = hidden / w_in; `se_ratio` = se / base (the block input, or SE's own input with
  `se_base: inner`); `group_width` = the grouped conv's input channels per group where the stage
  gave a group width (keep-width pruning keeps it, keep-count pruning shrinks it with the
  channels), else `groups`;
- the stem width from the stem's last conv, the head's conv width and hidden widths from its
  layers; a regnet body or a width multiplier becomes the explicit stage list it lowers to.

Every candidate is checked, not trusted: it must pass the spec's own validation, build a graph
whose every parameter and buffer has the pruned graph's name and shape (and every conv the same
stride, padding and groups), and, holding the pruned weights, compute the pruned graph's output
in float64 (relative error <= 1e-10). Anything else (blocks of one stage with different widths
after `--global` pruning, a block whose widths the table below does not read, a width the
rounding rules cannot give) is reported with the first difference found.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn
from torch.fx import GraphModule

from archc.errors import ArchcError
from archc.frontend.loading import spec_from_mapping
from archc.frontend.lower import build, input_shape
from archc.frontend.spec import AnyNetBody, Spec, StageSpec
from archc.ir.graph_edits import module_config
from archc.ir.init import random_input

RELATIVE_TOLERANCE = 1e-10


@dataclass(frozen=True)
class _BlockWidths:
    """Where the spec widths of a block type are read in its first block (module paths)."""

    width: str  # the conv writing the block's output channels
    halves: bool = False  # the output is two halves of that conv's width (shufflenet_v2)
    bottleneck: str | None = None  # the conv writing the bottleneck width w_b
    hidden: str | None = None  # the conv writing the expanded width (expansion != 1)
    grouped: str | None = None  # the conv whose groups `group_width` / `groups` state
    se: str | None = None  # the squeeze-excitation module


BLOCK_WIDTHS = {
    "res_bottleneck": _BlockWidths("f.c.conv", bottleneck="f.a.conv", grouped="f.b.conv",
                                   se="f.se"),
    "res_basic": _BlockWidths("f.b.conv", se="f.se"),
    "vanilla": _BlockWidths("b.conv"),
    "dw_separable": _BlockWidths("pw.conv", se="se"),
    "inverted_residual": _BlockWidths("f.project.conv", hidden="f.dw.conv", se="f.se"),
    "conv": _BlockWidths("conv", grouped="conv"),
    "shufflenet_v2": _BlockWidths("branch2.c.conv", halves=True),
    "repvgg": _BlockWidths("conv3x3.conv", grouped="conv3x3.conv"),
    "qarepvgg": _BlockWidths("conv3x3.conv", grouped="conv3x3.conv"),
}


@dataclass(frozen=True)
class SpecFit:
    """The spec of a pruned graph (a mapping, as a spec file holds it), or why there is none."""

    spec: dict[str, Any] | None
    reason: str = ""
    graph_module: GraphModule | None = None  # the spec's graph holding the pruned weights


class _NotExpressible(ArchcError):
    pass


def spec_for_graph(spec: Spec, gm: GraphModule) -> SpecFit:
    """The spec whose graph is `gm` (a pruned graph of `spec`), or the reason there is none."""
    try:
        data, candidate = _candidate(spec, gm)
        rebuilt = _check(candidate, gm)
    except _NotExpressible as exc:
        return SpecFit(None, str(exc))
    return SpecFit(data, graph_module=rebuilt)


def graph_with_weights(spec: dict[str, Any], gm: GraphModule) -> GraphModule:
    """The graph of `spec` holding `gm`'s weights (a `spec_for_graph` result: same names)."""
    rebuilt = build(spec_from_mapping(spec))
    rebuilt.load_state_dict(gm.state_dict())
    return rebuilt.eval()


# ---- reading the widths ----

def _module(gm: GraphModule, path: str) -> nn.Module:
    try:
        return gm.get_submodule(path)
    except AttributeError:
        raise _NotExpressible(f"the pruned graph has no {path}") from None


def _out(gm: GraphModule, path: str) -> int:
    module = _module(gm, path)
    if not isinstance(module, nn.Conv2d):
        raise _NotExpressible(f"{path} is a {type(module).__name__}, not the conv a spec builds")
    return module.out_channels


def _candidate(spec: Spec, gm: GraphModule) -> tuple[dict[str, Any], Spec]:
    """The spec mapping (fields at their defaults left out) and the spec it validates to."""
    data = spec.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
    stem, head = spec.built_stem(), spec.built_head()
    width = spec.input.channels
    if stem.type != "none":
        convs = [m for m in _module(gm, "stem").modules() if isinstance(m, nn.Conv2d)]
        width = convs[-1].out_channels
        data["stem"] = {**data.get("stem", {}), "width": width}
    stages = []
    for index, stage in enumerate(spec.stages(), start=1):
        stages.append(_stage(gm, f"s{index}.b1", stage, width))
        width = stages[-1]["width"]
    data["body"] = {"type": "anynet", "stages": stages,
                    **({"drop_path_rate": spec.body.drop_path_rate}
                       if isinstance(spec.body, AnyNetBody) and spec.body.drop_path_rate else {})}
    head_data = dict(data.get("head", {}))
    if head.width is not None:
        head_data["width"] = _out(gm, "head.pre.conv")
    if head.hidden:
        head_data["hidden"] = [_module(gm, f"head.hidden.{i}.fc").out_features
                               for i in range(1, len(head.hidden) + 1)]
    data["head"] = head_data
    data["name"] = f"{spec.name}_pruned"
    try:
        return data, spec_from_mapping(data, "the pruned spec")
    except (ArchcError, ValidationError) as exc:
        raise _NotExpressible(f"the widths read back make no valid spec: {exc}") from None


def _stage(gm: GraphModule, block: str, stage: StageSpec, w_in: int) -> dict[str, Any]:
    widths = BLOCK_WIDTHS.get(stage.block)
    if widths is None:
        raise _NotExpressible(f"{block}: the widths of a {stage.block} block are not read back "
                              f"into a spec (only {', '.join(BLOCK_WIDTHS)})")
    data = stage.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
    width = _out(gm, f"{block}.{widths.width}") * (2 if widths.halves else 1)
    data["width"] = width
    inner = width
    if widths.bottleneck is not None:
        inner = _out(gm, f"{block}.{widths.bottleneck}")
        data.pop("bottleneck_ratio", None)
        data.pop("bottleneck_multiplier", None)
        if inner != width:
            data["bottleneck_multiplier"] = inner / width
    if widths.hidden is not None and stage.expansion != 1:
        inner = _out(gm, f"{block}.{widths.hidden}")
        data["expansion"] = inner / w_in
    if widths.grouped is not None and (stage.group_width or stage.groups):
        conv = _module(gm, f"{block}.{widths.grouped}")
        if stage.groups:
            data["groups"] = conv.groups
        elif conv.groups > 1:  # else a dense first block (train-form blocks on the image)
            data["group_width"] = conv.in_channels // conv.groups
    if widths.se is not None and stage.se_ratio:
        se = _module(gm, f"{block}.{widths.se}")
        base = w_in if stage.se_base == "input" else se.expand.out_channels
        data["se_ratio"] = se.reduce.out_channels / base
    return data


# ---- checking the candidate ----

def _check(candidate: Spec, gm: GraphModule) -> GraphModule:
    """The candidate's graph holding `gm`'s weights, if it is `gm`'s graph."""
    rebuilt = build(candidate, device="meta")
    want = {k: tuple(v.shape) for k, v in gm.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    for name in sorted(want.keys() | have.keys()):
        if name not in have:
            raise _NotExpressible(f"the spec builds no {name}")
        if name not in want:
            raise _NotExpressible(f"the spec builds {name}, which the pruned graph has not")
        if want[name] != have[name]:
            raise _NotExpressible(
                f"{name}: the pruned graph has shape {list(want[name])}, the spec builds "
                f"{list(have[name])} (a spec derives this width from the stage's fields: the "
                f"blocks of a stage differ, or it was pruned apart from the widths it follows)")
    modules = dict(gm.named_modules())
    for name, module in rebuilt.named_modules():
        if isinstance(module, nn.Conv2d) and module_config(module) != module_config(
                modules[name]):
            raise _NotExpressible(f"{name}: the spec builds {module_config(module)}, the pruned "
                                  f"graph has {module_config(modules[name])}")
    rebuilt = graph_with_weights(candidate.to_dict(), gm)
    example = random_input(input_shape(candidate), 0).double()
    with torch.no_grad():
        expected = copy.deepcopy(gm).eval().double()(example)
        actual = copy.deepcopy(rebuilt).double()(example)
    error = float((actual - expected).norm() / expected.norm().clamp_min(1e-300))
    if not error <= RELATIVE_TOLERANCE:
        raise _NotExpressible(f"the spec's graph computes another function (relative output "
                              f"error {error:.2e} in float64)")
    return rebuilt
