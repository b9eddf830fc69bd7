"""Lightweight blocks (dw_separable, inverted_residual, shufflenet_v1/v2, reducenet) and the
ResNet/ResNeXt/SE/activation options: structure, train -> deploy through the default pipeline
(rel err = max|Δ| / max|ref| <= 1e-5, no BatchNorm left), ONNX parity, spec errors."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import archc
from archc.backends.export import export_onnx
from archc.errors import SpecError
from archc.frontend.blocks.layers import channel_shuffle
from archc.frontend.spec import make_divisible
from archc.ir.init import random_input
from archc.ir.ops import op_kind
from archc.ir.verify import relative_error
from archc.rewrite.pipeline import PassContext, resolve_pipeline, run_pipeline


def tiny(stages: list[dict], stem: dict | None = None, head: dict | None = None) -> dict:
    return {
        "name": "tiny",
        "input": {"size": 32},
        "num_classes": 10,
        "stem": stem or {"type": "simple", "width": 16},
        "body": {"type": "anynet", "stages": stages},
        "head": head or {"type": "classifier"},
    }


SHUFFLE_STEM = {"type": "simple_pool", "width": 12}
V1 = {"block": "shufflenet_v1", "groups": 3, "bottleneck_ratio": 4}
SE = {"se_ratio": 0.25, "se_base": "inner", "se_divisor": 8, "se_gate": "hardsigmoid"}
REDUCENET = [
    {"block": "reducenet", "depth": 2, "width": 16, "stride": 1, "expansion": 4},
    {"block": "reducenet", "depth": 1, "width": 32, "expansion": 4},
]
# one small network per family; the deploy tests run each once through the default pipeline
SPECS = {
    "mobilenet": tiny(
        [
            {"block": "dw_separable", "depth": 1, "width": 16, "stride": 1, "se_ratio": 0.25},
            {"block": "inverted_residual", "depth": 1, "width": 16, "stride": 1,
             "activation": "relu6"},
            {"block": "inverted_residual", "depth": 2, "width": 24, "expansion": 6,
             "activation": "hardswish", **SE},
            {"block": "dw_separable", "depth": 1, "width": 32, "activation": "relu6"},
        ],
        stem={"type": "simple", "width": 16, "activation": "hardswish"},
        head={"type": "classifier", "width": 64, "activation": "relu6", "dropout": 0.2},
    ),
    "shufflenet": tiny(
        [
            {**V1, "depth": 2, "width": 48, "dense_first": True},
            {"block": "shufflenet_v2", "depth": 2, "width": 96},
        ],
        stem=SHUFFLE_STEM,
        head={"type": "classifier", "width": 64},
    ),
    "resnet": tiny(
        [
            {"block": "res_basic", "depth": 2, "width": 16, "stride": 1, "se_ratio": 0.25},
            {"block": "res_bottleneck", "depth": 2, "width": 64, "bottleneck_ratio": 2,
             "groups": 4},
        ],
        stem={"type": "resnet", "width": 16, "stride": 1},
    ),
    "reducenet_train": tiny(REDUCENET, stem={"type": "simple", "width": 16, "stride": 1}),
    "reducenet_reduced": tiny(
        [{**stage, "phase": "reduced"} for stage in REDUCENET],
        stem={"type": "simple", "width": 16, "stride": 1},
    ),
}
X = random_input((2, 3, 32, 32), 1)


def ops(gm) -> list[str]:
    return [op_kind(gm, n) for n in gm.graph.nodes if n.op not in ("placeholder", "output")]


def block_convs(gm) -> list[str]:
    """Qualified names of the convs inside stages (`s1.b1...`)."""
    return [
        name
        for name, m in gm.named_modules()
        if isinstance(m, nn.Conv2d) and name[0] == "s" and name[1].isdigit()
    ]


@functools.cache
def deployed(name: str):
    """(train graph, deploy graph) of a spec, random weights, through the default pipeline."""
    gm = archc.build(SPECS[name], init="random")
    result = run_pipeline(gm, resolve_pipeline("default"), PassContext(example_inputs=(X,)))
    return gm, result.graph_module


@pytest.mark.parametrize("name", sorted(SPECS))
def test_train_to_deploy_is_exact_and_folds_every_bn(name):
    train, deploy = deployed(name)
    with torch.no_grad():
        assert relative_error([train(X)], [deploy(X)]) <= 1e-5
    remaining = ops(deploy)
    assert "BatchNorm2d" not in remaining and "Dropout" not in remaining, remaining


@pytest.mark.parametrize("name", ["mobilenet", "shufflenet"])
def test_deploy_graph_matches_in_onnx_runtime(name, tmp_path):
    """hardswish, hardsigmoid, ReLU6, SE, shuffle, chunk, cat and avg-pool in ONNX Runtime."""
    report = export_onnx(deployed(name)[1], tmp_path / "model.onnx", X[:1])
    assert report.relative_error <= 1e-5


def test_channel_shuffle_is_the_papers_permutation():
    x = torch.arange(12.0).reshape(1, 12, 1, 1)
    # g = 3, C/g = 4: channel i * 4 + j moves to j * 3 + i
    expected = [i * 4 + j for j in range(4) for i in range(3)]
    assert channel_shuffle(x, 3).flatten().tolist() == expected


def test_shuffle_is_traced_as_view_transpose_reshape_for_any_input_size():
    gm = archc.build(SPECS["shufflenet"], init="random")
    kinds = ops(gm)
    # v1: the dense_first unit is not shuffled, its second unit is; v2: every unit
    for kind in ("Tensor.size", "Tensor.view", "Tensor.transpose", "Tensor.reshape"):
        assert kinds.count(kind) == 1 + 2
    assert kinds.count("Tensor.chunk") == 1  # the stride-1 v2 unit splits its input
    eager = archc.build_module(SPECS["shufflenet"], init="random")
    x = random_input((3, 3, 48, 40), 2)  # traced at none of these sizes
    with torch.no_grad():
        assert torch.equal(gm(x), eager(x))


def test_shufflenet_v2_units():
    model = archc.build_module(SPECS["shufflenet"])
    strided, plain = model.s2.b1, model.s2.b2
    assert strided.branch1 is not None and plain.branch1 is None
    # stride 2: both branches read all 48 input channels and give 96 / 2 each
    assert strided.branch1.dw.conv.groups == 48 and strided.branch1.pw.conv.out_channels == 48
    assert strided.branch2.a.conv.in_channels == 48 and strided.branch2.c.conv.out_channels == 48
    assert strided.branch2.b.conv.stride == strided.branch1.dw.conv.stride == (2, 2)
    assert plain.branch2.a.conv.in_channels == 48  # stride 1: the second half of 96 channels
    assert model.head.pre.conv.out_channels == 64


def test_shufflenet_v1_units():
    model = archc.build_module(SPECS["shufflenet"])
    first, second = model.s1.b1, model.s1.b2
    # dense_first: the first unit's first 1x1 conv is dense and not shuffled
    assert first.a.conv.groups == 1 and first.shuffle_groups == 1
    assert second.a.conv.groups == 3 and second.shuffle_groups == 3
    assert first.c.conv.groups == 3 and first.b.conv.groups == 12  # m = 48 / 4, depthwise
    # strided: the main branch gives width - input width, concatenated with the pooled input
    assert first.c.conv.out_channels == 48 - 12 and isinstance(first.pool, nn.AvgPool2d)
    assert second.pool is None and second.c.conv.out_channels == 48


def test_inverted_residual_and_dw_separable_structure():
    model = archc.build_module(SPECS["mobilenet"])
    dw_sep, t1, strided, residual = model.s1.b1, model.s2.b1, model.s3.b1, model.s3.b2
    assert dw_sep.dw.conv.groups == 16 and dw_sep.se.reduce.out_channels == 4
    assert not hasattr(t1.f, "expand")  # t = 1: no expand conv
    assert t1.residual  # stride 1, 16 -> 16
    assert strided.f.expand.conv.out_channels == 16 * 6  # hidden = round(t * w_in)
    assert not strided.residual and residual.residual  # 16 -> 24 stride 2; 24 -> 24 stride 1
    assert residual.f.dw.conv.groups == 144 and not hasattr(residual.f.project, "act")
    # SE on the inner width, made divisible by 8, hardsigmoid gate
    assert residual.f.se.reduce.out_channels == make_divisible(0.25 * 144, 8) == 40
    assert isinstance(residual.f.se.gate, nn.Hardsigmoid)
    assert isinstance(residual.f.dw.act, nn.Hardswish) and isinstance(t1.f.dw.act, nn.ReLU6)
    assert isinstance(model.stem.act, nn.Hardswish) and isinstance(model.head.dropout, nn.Dropout)
    assert ops(archc.build(SPECS["mobilenet"])).count("add") == 2


def test_width_multiplier_rounds_as_torchvision():
    # nearest multiple of 8, at least 8, one more multiple if rounding lost over 10%
    assert [make_divisible(v, 8) for v in (3.2, 11.2, 12.0, 19.2, 44.8, 1280.0)] == [
        8, 16, 16, 24, 48, 1280
    ]
    body = {**SPECS["mobilenet"]["body"], "width_multiplier": 0.5}
    spec = archc.load_spec({**SPECS["mobilenet"], "body": body})
    assert [s.width for s in spec.stages()] == [8, 8, 16, 16]
    model = archc.build_module(spec)
    assert model.stem.conv.out_channels == 16  # stem and head are not scaled
    assert model.head.pre.conv.out_channels == 64


def test_resnext_groups_and_resnet_v1_5():
    model = archc.build_module(SPECS["resnet"])
    block = model.s2.b1
    assert block.f.b.conv.groups == 4 and block.f.b.conv.in_channels == 32  # w_b = 64 / 2
    assert block.f.b.conv.stride == (2, 2) and block.f.a.conv.stride == (1, 1)  # v1.5
    stage = {**SPECS["resnet"]["body"]["stages"][1], "groups": None, "group_width": 8}
    by_width = archc.build_module(tiny([stage]))
    assert by_width.s1.b1.f.b.conv.groups == 4
    assert model.s1.b1.f.se.reduce.out_channels == 4  # res_basic SE: round(0.25 * w_in)


def test_reducenet_phases():
    train, reduced = archc.build_module(SPECS["reducenet_train"]), deployed("reducenet_reduced")[0]
    assert all(block.branch1 is not None for block in (train.s1.b1, train.s2.b1))
    assert train.s1.b1.branch1.a.conv.out_channels == 4 * 16  # expansion * width
    assert not any("branch1" in name for name, _ in reduced.named_modules())
    assert len(block_convs(reduced)) < len(block_convs(train))
    # every reduced-phase weight has the same name in the train phase: a train checkpoint loads
    missing, unexpected = reduced.load_state_dict(train.state_dict(), strict=False)
    assert missing == [] and unexpected and all(".branch1." in k for k in unexpected)
    # the deployed reduced graph computes the reduced-phase eager model
    eager = archc.build_module(SPECS["reducenet_reduced"], init="random")
    with torch.no_grad():
        assert relative_error([eager(X)], [deployed("reducenet_reduced")[1](X)]) <= 1e-5
    # the minimal deploy graph: per block 3x3 conv, ReLU, 3x3 conv, [1x1 projection], add
    deploy = deployed("reducenet_reduced")[1]
    assert len(block_convs(deploy)) == 3 * 2 + 1
    assert ops(deploy).count("ReLU") == 1 + 3 and ops(deploy).count("add") == 3


@pytest.mark.parametrize(
    ("stages", "path", "phrase"),
    [
        ([{"block": "shufflenet_v2", "depth": 1, "width": 25}], "width", "width 25 is odd"),
        ([{"block": "shufflenet_v2", "depth": 1, "width": 24, "stride": 1}], "width",
         "must equal the input width 16"),
        ([{**V1, "depth": 1, "width": 16}], "width", "must exceed the input width 16"),
        ([{**V1, "depth": 1, "width": 48, "stride": 1, "dense_first": True}], "width",
         "must equal the input width 16"),
        ([{**V1, "depth": 1, "width": 16, "stride": 1, "dense_first": True}], "dense_first",
         "applies to a strided stage's first unit"),
        ([{**V1, "depth": 1, "width": 48, "groups": 5}], "groups",
         "bottleneck width 12 is not a positive multiple of groups 5"),
        ([{**V1, "depth": 1, "width": 40, "bottleneck_ratio": None, "bottleneck_multiplier": 0.3}],
         "groups", "width 40 is not a positive multiple of groups 3"),
        ([{**V1, "depth": 1, "width": 48, "dense_first": True}], "groups",
         "width - input width = 48 - 16 = 32 is not a positive multiple of groups 3"),
        ([{"depth": 1, "width": 32, "bottleneck_ratio": 2, "groups": 5}], "groups",
         "bottleneck width 16 (width 32 x bottleneck 0.5) is not divisible by groups 5"),
        ([{"depth": 1, "width": 32, "group_width": 4, "groups": 8}], "groups", "not both"),
        ([{"block": "inverted_residual", "depth": 1, "width": 16, "expansion": 0.01}],
         "expansion", "hidden width round(0.01 * 16) is 0"),
        ([{"block": "reducenet", "depth": 1, "width": 16, "expansion": 0.01}], "expansion",
         "branch1 width round(0.01 * 16) is 0"),
        ([{"block": "dw_separable", "depth": 1, "width": 16, "se_divisor": 8}], "se_divisor",
         "needs squeeze-excitation"),
        ([{"block": "dw_separable", "depth": 1, "width": 16, "phase": "reduced"}], "phase",
         "does not use"),
        ([{"block": "shufflenet_v2", "depth": 1, "width": 16, "groups": 2}], "groups",
         "does not use"),
        ([{"block": "repvgg", "depth": 1, "width": 16, "activation": "relu6"}], "activation",
         "does not use"),
    ],
)
def test_block_constraints_are_spec_errors(stages, path, phrase):
    with pytest.raises(SpecError) as error:
        archc.load_spec(tiny(stages))
    assert error.value.path == f"body.stages[0].{path}"
    assert phrase in error.value.message


@pytest.mark.parametrize(
    ("change", "path", "phrase"),
    [
        ({"stem": {"type": "none", "stride": 1}}, "stem", "a stem of type none has no stride"),
        ({"head": {"activation": "hardswish"}}, "head.activation", "give width"),
        ({"body": {"type": "anynet", "width_divisor": 4,
                   "stages": [{"block": "dw_separable", "depth": 1, "width": 16}]}},
         "body.width_divisor", "give width_multiplier"),
    ],
)
def test_stem_head_body_constraints_are_spec_errors(change, path, phrase):
    with pytest.raises(SpecError) as error:
        archc.load_spec({**tiny([{"block": "vanilla", "depth": 1, "width": 16}]), **change})
    assert error.value.path == path and phrase in error.value.message
