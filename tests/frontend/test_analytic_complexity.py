"""The analytic complexity twin (archc.frontend.analytic_complexity, walking the `complexity` of
every registered block, stem and head) equals the graph's complexity (archc.ir.analysis) exactly:
on every reference spec, on random specs over every registered block, and on at least 200 samples
of every shipped space (slow).

Counting a graph needs its shapes. `archc.ir.analysis.complexity` propagates them with fake tensors;
for many models the tests propagate them once through the meta graph's modules materialized on
the CPU with uninitialized weights (the shapes are the same, the counting is the same
`complexity_report`), which is about three times faster; a test checks the two agree."""

from __future__ import annotations

import math
from pathlib import Path
from typing import get_args

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from archc.errors import SpecError
from archc.frontend import lower
from archc.frontend.analytic_complexity import spec_complexity
from archc.frontend.blocks.counting import Cx, pool2d_cx
from archc.frontend.blocks.hybrid import RepViT
from archc.frontend.blocks.registry import (
    BLOCKS,
    HEADS,
    STEMS,
    Block,
    Head,
    Stem,
    register_block,
)
from archc.frontend.loading import load_spec, spec_from_mapping
from archc.frontend.spec import HeadSpec, StageSpec, StemSpec
from archc.ir import analysis
from archc.space.design_space import load_space

ROOT = Path(__file__).resolve().parents[2]
SPACES = sorted(p.stem for p in (ROOT / "spaces").glob("*.yaml"))
GRAPH_SAMPLES = 200  # per space (the acceptance); ~0.15 s each: build, trace, one shape pass


def graph_complexity(spec) -> tuple[int, int, int]:
    """`archc.ir.analysis.complexity_report` of the built graph, shapes from one CPU pass."""
    gm = lower.build(spec, device="meta").to_empty(device="cpu")
    with torch.no_grad():
        ShapeProp(gm).propagate(torch.zeros(lower.input_shape(spec)))
    return analysis.complexity_report(gm).total.as_tuple()


def _defines_complexity(cls: type, base: type) -> bool:
    return next(klass for klass in cls.__mro__ if "complexity" in vars(klass)) is not base


def test_every_registered_block_stem_and_head_has_a_twin():
    """Every type a spec can name is registered, and each registered class counts itself."""
    for registry, base, spec_type in ((STEMS, Stem, StemSpec), (HEADS, Head, HeadSpec)):
        assert set(registry) == set(get_args(spec_type.model_fields["type"].annotation))
        assert all(_defines_complexity(cls, base) for cls in registry.values())
    assert all(_defines_complexity(cls, Block) for cls in BLOCKS.values())


def test_a_block_without_a_twin_does_not_register():
    class Untwinned(Block):
        name = "untwinned"

    with pytest.raises(TypeError, match="no analytic complexity twin"):
        register_block(Untwinned)
    assert "untwinned" not in BLOCKS


@pytest.mark.parametrize("stride", [1, 2])
def test_repvit_keeps_se_in_alternate_blocks(stride):
    """The one block whose fields vary along a stage; the twin reads the same `stage_at`."""
    stage = StageSpec(block="repvit", depth=5, width=16, stride=stride, se_ratio=0.25)
    assert [RepViT.stage_at(stage, i).se_ratio for i in range(5)] == (
        [0.25, 0.0, 0.25, 0.0, 0.25] if stride == 1 else [0.0, 0.25, 0.0, 0.25, 0.0])


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "specs").glob("*.yaml")))
def test_reference_specs(name):
    spec = load_spec(ROOT / "specs" / f"{name}.yaml")
    assert spec_complexity(spec) == graph_complexity(spec)


@pytest.mark.parametrize("name", SPACES)
def test_samples_against_archc_analysis_complexity(name):
    """A few samples per space through the public `archc.ir.analysis.complexity` itself."""
    for sample in load_space(ROOT / "spaces" / f"{name}.yaml").samples(2, 1):
        spec = spec_from_mapping(sample.spec)
        graph = analysis.complexity(lower.build(spec, device="meta"), spec.input.size)
        assert tuple(sample.complexity.values()) == spec_complexity(spec) == graph


STAGE_OPTIONS = {  # block -> strategies of the stage fields it reads
    "res_bottleneck": {"bottleneck_ratio": st.sampled_from([1.0, 2.0]),
                       "group_width": st.sampled_from([None, 4, 8]),
                       "se_ratio": st.sampled_from([0.0, 0.25])},
    "res_basic": {"se_ratio": st.sampled_from([0.0, 0.25]),
                  "se_base": st.sampled_from(["input", "inner"])},
    "vanilla": {"activation": st.sampled_from(["relu", "hardswish"])},
    "dw_separable": {"se_ratio": st.sampled_from([0.0, 0.25])},
    "inverted_residual": {"expansion": st.sampled_from([1.0, 3.0, 6.0]),
                          "se_ratio": st.sampled_from([0.0, 0.25]),
                          "se_divisor": st.sampled_from([1, 8])},
    "shufflenet_v2": {},
    "reducenet": {"expansion": st.sampled_from([0.5, 2.0]),
                  "phase": st.sampled_from(["train", "reduced"])},
    "repvgg": {"group_width": st.sampled_from([None, 8])},
    "acb": {"group_width": st.sampled_from([None, 8])},
    "dbb": {"group_width": st.sampled_from([None, 8])},
    "mobileone": {"branches": st.sampled_from([1, 3])},
}


@st.composite
def random_specs(draw):
    block = draw(st.sampled_from(sorted(STAGE_OPTIONS) + ["shufflenet_v1"]))
    stages = []
    width = draw(st.sampled_from([8, 16]))
    for _ in range(draw(st.integers(1, 3))):
        stage = {"block": block, "depth": draw(st.integers(1, 3)),
                 "stride": draw(st.sampled_from([1, 2]))}
        if block == "shufflenet_v1":  # stride 2 concatenates (wider), stride 1 keeps the width
            stage["groups"] = 2
            width = width + 8 * draw(st.integers(1, 3)) if stage["stride"] > 1 else width
        elif block == "shufflenet_v2":
            stage["stride"] = 2
            width = width * 2
        else:  # train-form blocks: widths whose groups divide every width (the blocks check less)
            train_form = block in ("repvgg", "acb", "dbb")
            width = draw(st.sampled_from([16, 32] if train_form else [16, 24, 32]))
            stage.update({key: draw(strategy) for key, strategy in STAGE_OPTIONS[block].items()})
            stage = {key: value for key, value in stage.items() if value is not None}
            if stage.get("se_ratio", 0) == 0:
                stage.pop("se_base", None)
                stage.pop("se_divisor", None)
        stage["width"] = width
        stages.append(stage)
    stem = draw(st.sampled_from([{"type": "simple", "width": 16}, {"type": "simple_pool"},
                                 {"type": "resnet", "width": 8}, {"type": "none"},
                                 {"type": "simple", "width": 8, "stride": 1}]))
    if block in ("shufflenet_v1", "shufflenet_v2") and stem["type"] == "none":
        stem = {"type": "simple", "width": 16}
    if block in ("shufflenet_v1", "shufflenet_v2"):
        stem["width"] = 16
        stages[0]["stride"] = 2
        if block == "shufflenet_v1":
            stages[0]["width"] = max(stages[0]["width"], 24)
            stages[0]["dense_first"] = True
            for before, after in zip(stages, stages[1:]):
                if after["stride"] == 1:
                    after["width"] = before["width"]
    head = draw(st.sampled_from([{}, {"width": 32, "activation": "hardswish"},
                                 {"dropout": 0.2}]))
    return {"name": "random", "input": {"channels": draw(st.sampled_from([1, 3])),
                                        "size": draw(st.sampled_from([16, 23, 32]))},
            "num_classes": 10, "stem": stem, "head": head,
            "body": {"type": "anynet", "stages": stages}}


@settings(max_examples=25, deadline=None)
@given(random_specs())
def test_random_specs_over_every_block(mapping):
    try:
        spec = spec_from_mapping(mapping)
    except SpecError:
        return  # a combination the blocks refuse (e.g. a width the group width does not divide)
    assert spec_complexity(spec) == graph_complexity(spec)


LATER_STAGE_OPTIONS = {  # the blocks, stage fields, stems and heads added with AlexNet..VanillaNet
    "res_bottleneck": {"bottleneck_ratio": st.sampled_from([1.0, 4.0]),
                       "se_ratio": st.sampled_from([0.25]),
                       "se_base": st.sampled_from(["input", "inner"]),
                       "se_divisor": st.sampled_from([1, 8]),
                       "se_position": st.sampled_from(["inner", "output"])},
    "inverted_residual": {"expansion": st.sampled_from([1.0, 6.0]),
                          "kernel": st.sampled_from([3, 5]),
                          "remove_activations": st.booleans()},
    "qarepvgg": {"group_width": st.sampled_from([None, 8])},
    "qamobileone": {"branches": st.sampled_from([1, 3])},
    "mobileone_unit": {"kernel": st.sampled_from([1, 3]), "branches": st.sampled_from([1, 2]),
                       "group_width": st.sampled_from([None, 1]),
                       "se_ratio": st.sampled_from([0.0, 0.25])},
    "repmixer": {"kernel": st.sampled_from([3, 5]), "expansion": st.sampled_from([1.5, 3.0]),
                 "layer_scale": st.sampled_from([None, 1e-5])},
    "repvit": {"kernel": st.sampled_from([3, 5]), "expansion": st.sampled_from([1.5, 2.0]),
               "se_ratio": st.sampled_from([0.0, 0.25]), "se_divisor": st.sampled_from([1, 8])},
    "vanillanet": {},
}
# Window pools that keep a side of 1 at least 1 (padding 1), one of them in ceil mode
SAME_POOLS = [None, {"kernel": 3, "stride": 2, "padding": 1},
              {"type": "avg", "kernel": 3, "stride": 2, "padding": 1, "ceil_mode": True}]
CLASSIFIER_HEADS = [{}, {"width": 32, "activation": "hardswish", "dropout": 0.2},
                    {"hidden": [24], "hidden_dropout": 0.5}, {"pool_size": 2, "hidden": [16, 12]},
                    {"batch_norm": True, "distillation": True}, {"distillation": True},
                    {"type": "conv_classifier", "dropout": 0.5}]


def _without_unread_se_fields(stage: dict) -> dict:
    if not stage.get("se_ratio"):
        for key in ("se_ratio", "se_base", "se_divisor", "se_position"):
            stage.pop(key, None)
    if stage.get("remove_activations"):
        stage.pop("se_ratio", None)
    return {key: value for key, value in stage.items() if value is not None}


@st.composite
def no_bn_specs(draw):
    """AlexNet / SqueezeNet style: no stem, a `conv` stage (padding 0 shrinks), a window pool
    (ceil mode too), `conv` or `fire` stages, a classifier with hidden layers or a conv head."""
    first = {"block": "conv", "kernel": draw(st.sampled_from([3, 5, 7])),
             "padding": draw(st.sampled_from([None, 0])), "stride": draw(st.sampled_from([1, 2])),
             "width": draw(st.sampled_from([16, 32])), "depth": draw(st.integers(1, 2)),
             "pool": draw(st.sampled_from([None, {"kernel": 3, "stride": 2, "ceil_mode": True},
                                           {"type": "avg", "kernel": 2, "stride": 2}]))}
    if draw(st.booleans()):
        second = {"block": "fire", "bottleneck_ratio": draw(st.sampled_from([4.0, 8.0]))}
    else:
        second = {"block": "conv", "groups": draw(st.sampled_from([None, 2]))}
    second.update(width=draw(st.sampled_from([16, 32])), depth=draw(st.integers(1, 2)), stride=1)
    head = draw(st.sampled_from([{"pool_size": 2, "hidden": [16], "hidden_dropout": 0.5},
                                 {"type": "conv_classifier", "dropout": 0.5}, {}]))
    return {"name": "random", "input": {"size": 32}, "num_classes": 10, "stem": {"type": "none"},
            "head": head, "body": {"type": "anynet", "stages": [
                _without_unread_se_fields(first), _without_unread_se_fields(second)]}}


@st.composite
def later_block_specs(draw):
    block = draw(st.sampled_from(sorted(LATER_STAGE_OPTIONS)))
    stem = draw(st.sampled_from([{"type": "simple"}, {"type": "fastvit"}, {"type": "repvit"},
                                 {"type": "vanillanet", "stride": 2}, {"type": "resnet"}]))
    stem["width"] = 16
    stages, width = [], 16
    for _ in range(draw(st.integers(1, 2))):
        stride = draw(st.sampled_from([1, 2]))
        if not (block == "repvit" and stride == 1):  # a stride-1 repvit block keeps its width
            width = draw(st.sampled_from([width, 2 * width]))  # repmixer: a multiple of w_in
        stage = {"block": block, "depth": draw(st.integers(1, 3)), "stride": stride,
                 "width": width, "pool": draw(st.sampled_from(SAME_POOLS))}
        stage.update({key: draw(option) for key, option in LATER_STAGE_OPTIONS[block].items()})
        stages.append(_without_unread_se_fields(stage))
    head = draw(st.sampled_from(CLASSIFIER_HEADS + [{"type": "vanillanet", "dropout": 0.1}]))
    body = {"type": "anynet", "stages": stages}
    if block in ("res_bottleneck", "inverted_residual") and draw(st.booleans()):
        body["compound_scaling"] = {"width": 1.25, "depth": 1.5}
    mapping = {"name": "random", "input": {"size": 32}, "num_classes": 10, "stem": stem,
               "head": head, "body": body}
    if "vanillanet" in (block, stem["type"], head.get("type")):
        mapping["activation_lambda"] = draw(st.sampled_from([0.0, 0.5, 1.0]))
    return mapping


@settings(max_examples=25, deadline=None)
@given(st.one_of(no_bn_specs(), later_block_specs()))
def test_random_specs_over_the_later_blocks_stems_and_heads(mapping):
    spec = spec_from_mapping(mapping)
    assert spec_complexity(spec) == graph_complexity(spec)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12), st.integers(1, 4), st.integers(1, 3), st.integers(0, 2), st.booleans(),
       st.sampled_from([nn.MaxPool2d, nn.AvgPool2d]))
def test_window_pool_sizes_are_torch_s(size, kernel, stride, padding, ceil_mode, kind):
    """pool2d_cx's output side (ceil mode included) is torch's, on every valid window."""
    assume(padding <= kernel // 2 and kernel <= size + 2 * padding)
    pool = kind(kernel, stride, padding, ceil_mode=ceil_mode)
    out = pool(torch.zeros(1, 2, size, size)).shape
    cx = pool2d_cx(Cx(size, size), 2, kernel, stride, padding, ceil_mode)
    assert (cx.h, cx.w, cx.acts) == (out[2], out[3], math.prod(out[1:]))


@pytest.mark.slow
@pytest.mark.parametrize("name", SPACES)
def test_200_samples_of_every_space(name):
    samples = list(load_space(ROOT / "spaces" / f"{name}.yaml").samples(GRAPH_SAMPLES, 2024))
    for sample in samples:
        spec = spec_from_mapping(sample.spec)
        assert tuple(sample.complexity.values()) == graph_complexity(spec), sample.id
