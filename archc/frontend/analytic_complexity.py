"""Analytic complexity: flops, params and acts of a spec from its explicit stage list, no graph.

The twin of `archc.ir.analysis` (which counts the traced graph) in pycls' style: every registered
block, stem and head type counts the layers it builds with its own `complexity`
(`archc.frontend.blocks`, in the train form the spec builds; the counting rules are in
`archc.frontend.blocks.counting`), and this module walks a spec as `archc.frontend.lower.Network`
builds it. The design space sampler needs this: counting a graph takes a traced model and shape
propagation (~0.1-0.5 s), this takes microseconds. Tests keep the two equal on every shipped
spec, on random specs over every block and on samples of every space.
"""

from __future__ import annotations

from archc.frontend.blocks.counting import Cx, add_cx
from archc.frontend.blocks.layers import pool_cx
from archc.frontend.blocks.registry import BLOCKS, HEADS, STEMS, Block, check_stage
from archc.frontend.spec import Spec, StageSpec


def _stage_cx(cx: Cx, stage: StageSpec, block: type[Block], w_in: int) -> Cx:
    """Count a stage's blocks and pool. Blocks after the first have the same fields (but where
    `block.stage_at` varies them), widths and stride 1: a block that keeps the spatial size is
    counted once and multiplied; one that shrinks it (a `conv` with less than (k - 1) / 2
    padding) is counted block by block."""
    block.complexity(cx, w_in, stage.width, stage.stride, block.stage_at(stage, 0))
    repeated: dict[str, tuple[StageSpec, int]] = {}  # distinct fields -> (fields, block count)
    for index in range(1, stage.depth):
        fields = block.stage_at(stage, index)
        key = "" if fields is stage else fields.model_dump_json()
        count = repeated[key][1] if key in repeated else 0
        repeated[key] = (fields, count + 1)
    for fields, count in repeated.values():
        one = block.complexity(Cx(cx.h, cx.w), stage.width, stage.width, 1, fields)
        if (one.h, one.w) == (cx.h, cx.w):
            add_cx(cx, one, count)
            continue
        for _ in range(count):
            block.complexity(cx, stage.width, stage.width, 1, fields)
    return cx if stage.pool is None else pool_cx(cx, stage.pool, stage.width)


def spec_complexity(
    spec: Spec, stages: list[StageSpec] | None = None, input_size: int | None = None
) -> tuple[int, int, int]:
    """(flops, params, acts) of `spec` for one square input (default: the spec's input size);
    `stages` is `spec.stages()` when the caller already has it. The spec need not have passed the
    blocks' checks (the sampler counts before it checks), but its blocks must be registered."""
    side = input_size or spec.input.size
    cx = Cx(side, side)
    stem = spec.built_stem()
    STEMS[stem.type].complexity(cx, stem, spec.input.channels)
    width = spec.input.channels if stem.type == "none" else stem.channels
    for index, stage in enumerate(spec.stages() if stages is None else stages):
        check_stage(stage.block, None, f"body.stages[{index}].block")
        _stage_cx(cx, stage, BLOCKS[stage.block], width)
        width = stage.width
    head = spec.built_head()
    return HEADS[head.type].complexity(cx, head, width, spec.num_classes).as_tuple()
