"""QARepVGG-style blocks (`qarepvgg`, `qamobileone`): no BN on the 1x1 and identity branches, one
BN after the sum; the default pipeline still fuses each to the deploy form of `repvgg` /
`mobileone` exactly (float64), idempotently, with honest `modified` flags."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from archc.frontend.blocks.reparam import QARepVGG
from archc.frontend.loading import spec_from_mapping
from archc.frontend.lower import build
from archc.frontend.spec import StageSpec
from archc.ir.analysis import census
from archc.ir.init import random_input
from archc.rewrite.pipeline import PassContext, resolve_pipeline, run_pipeline
from tests.helpers import assert_default_pipeline_exact_idempotent_honest

SHAPE = (2, 3, 8, 8)


def spec(block: str, depth: int = 2, **stage):
    return spec_from_mapping({
        "name": block, "input": {"channels": 3, "size": 8}, "num_classes": 10,
        "stem": {"type": "none"},
        "body": {"type": "anynet", "stages": [
            {"block": block, "depth": depth, "width": 8, "stride": 2, **stage},
            {"block": block, "depth": depth, "width": 16, "stride": 2, **stage}]}})


CASES = {"qarepvgg": ({}, 1, 2), "qarepvgg_grouped": ({"group_width": 8}, 1, 2),
         "qamobileone": ({"branches": 2}, 2, 1)}  # stage fields, convs per block, depth


@pytest.mark.parametrize("case", [pytest.param(case, marks=pytest.mark.slow)
                                  if case == "qamobileone" else case for case in sorted(CASES)])
def test_fuses_to_the_plain_deploy_form(case):
    stage, convs_per_block, depth = CASES[case]
    block, blocks = case.split("_")[0], 2 * depth
    model = build(spec(block, depth, **stage), init="random")
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    # one BN per k x k branch and one after the sum: none on the 1x1 or identity branches
    per_block = 2 if block == "qarepvgg" else 2 * (stage["branches"] + 1)  # two units
    assert len(norms) == blocks * per_block
    x = random_input(SHAPE, 1)
    result = run_pipeline(model, resolve_pipeline("default"), PassContext(example_inputs=(x,)))
    after = census(result.graph_module)
    assert (after.convs, after.norms) == (blocks * convs_per_block, 0)
    assert result.max_error < 1e-12  # float64 check of the pipeline
    fresh = random_input(SHAPE, 2)
    with torch.no_grad():
        assert torch.allclose(result.graph_module(fresh), model(fresh), rtol=1e-5, atol=1e-5)
    plain = build(spec(block.removeprefix("qa"), depth, **stage), init="random")
    plain_after = run_pipeline(plain, resolve_pipeline("default"),
                               PassContext(example_inputs=(x,))).graph_module
    assert census(plain_after).params == after.params  # the same deploy form


@pytest.mark.slow
def test_default_pipeline_exact_idempotent_honest():
    model = build(spec("qarepvgg"), init="random")
    assert_default_pipeline_exact_idempotent_honest(model, SHAPE, seed=3)


def test_identity_branch_only_where_shapes_allow():
    stage = StageSpec(block="qarepvgg", depth=1, width=8)
    x = random_input((1, 8, 5, 5), 0)
    same, wider = QARepVGG(8, 8, 1, stage).eval(), QARepVGG(4, 8, 1, stage).eval()
    assert same.identity and not wider.identity and not QARepVGG(8, 8, 2, stage).identity
    with torch.no_grad():  # the identity enters the sum unscaled, before the one BN
        expected = same.act(same.bn(same.conv3x3(x) + same.conv1x1(x) + x))
        assert torch.equal(same(x), expected)
