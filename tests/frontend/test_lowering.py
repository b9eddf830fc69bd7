"""Lowering: names, seeded weights, every block and stem, complexity from the graph."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import archc
from archc.ir.analysis import complexity_report

TINY = {
    "name": "tiny",
    "input": {"channels": 3, "size": 32},
    "num_classes": 10,
    "stem": {"type": "resnet", "width": 8},
    "body": {"type": "anynet", "stages": [{"block": "vanilla", "depth": 1, "width": 16}]},
}


def test_complexity_matches_hand_count():
    gm = archc.build(TINY)
    # stem 7x7 s2 3->8 at 16x16, max-pool to 8x8; 3x3 s2 8->16 at 4x4; 3x3 16->16; fc 16->10
    flops = 49 * 3 * 8 * 16 * 16 + 9 * 8 * 16 * 16 + 9 * 16 * 16 * 16 + (16 * 10 + 10)
    params = 49 * 3 * 8 + 16 + 9 * 8 * 16 + 32 + 9 * 16 * 16 + 32 + 170
    acts = 8 * 16 * 16 + 8 * 8 * 8 + 16 * 16 + 16 * 16 + 10
    assert archc.complexity(gm, 32) == (flops, params, acts)
    assert params == sum(p.numel() for p in gm.parameters())


def test_qualified_names_are_readable_and_deterministic():
    spec = archc.load_spec("specs/regnety_200mf.yaml")
    first, second = archc.build(spec), archc.build(spec)
    targets = [n.target for n in first.graph.nodes if n.op == "call_module"]
    assert targets[:3] == ["stem.conv", "stem.bn", "stem.act"]
    for name in (
        "s1.b1.proj.conv",
        "s1.b1.f.a.conv",
        "s1.b1.f.b.conv",
        "s1.b1.f.se.reduce",
        "s1.b1.f.se.expand",
        "s1.b1.f.c.bn",
        "s4.b7.act",
        "head.fc",
    ):
        assert name in targets
    assert first.code == second.code


def test_seeded_weights_do_not_depend_on_torch_rng():
    torch.manual_seed(1)
    a = archc.build(TINY, seed=5).state_dict()
    torch.manual_seed(999)
    torch.rand(1000)
    b = archc.build(TINY, seed=5).state_dict()
    c = archc.build(TINY, seed=6).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["stem.conv.weight"], c["stem.conv.weight"])


def test_pycls_initialisation():
    gm = archc.build(
        {
            "name": "wide",
            "input": {"size": 32},
            "body": {
                "type": "anynet",
                "stages": [{"block": "res_basic", "depth": 1, "width": 256}],
            },
        }
    )
    conv = gm.get_submodule("s1.b1.f.b.conv")
    assert conv.weight.std().item() == pytest.approx((2 / (9 * 256)) ** 0.5, rel=0.02)
    assert gm.get_submodule("head.fc").weight.std().item() == pytest.approx(0.01, rel=0.05)
    bn = gm.get_submodule("s1.b1.f.b.bn")
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
    assert not gm.training


@pytest.mark.parametrize(
    "block, extra",
    [
        ("res_bottleneck", {"group_width": 8, "bottleneck_ratio": 2, "se_ratio": 0.25}),
        ("res_basic", {}),
        ("vanilla", {}),
    ],
)
@pytest.mark.parametrize("stem", ["simple", "resnet"])
def test_every_block_and_stem_builds_and_runs(block, extra, stem):
    spec = {
        "name": "net",
        "input": {"size": 64},
        "num_classes": 7,
        "stem": {"type": stem},
        "body": {
            "type": "anynet",
            "stages": [
                {"block": block, "depth": 2, "width": 32, "stride": 2, **extra},
                {"block": block, "depth": 1, "width": 32, "stride": 1, **extra},
            ],
        },
    }
    gm = archc.build(spec, init="random")
    y = gm(torch.randn(2, 3, 64, 64))
    assert y.shape == (2, 7) and torch.isfinite(y).all()
    report = complexity_report(gm, (1, 3, 64, 64))
    assert list(report.stages) == ["stem", "s1", "s2", "head"]
    assert report.total.params == sum(p.numel() for p in gm.parameters())


def test_bottleneck_ratio_sets_the_bottleneck_width():
    spec = {
        "name": "b",
        "input": {"size": 32},
        "body": {
            "type": "anynet",
            "stages": [{"depth": 1, "width": 64, "bottleneck_ratio": 4, "group_width": 16}],
        },
    }
    conv = archc.build(spec).get_submodule("s1.b1.f.b.conv")
    assert (conv.in_channels, conv.out_channels, conv.groups) == (16, 16, 1)


class Foreign(nn.Module):
    """A model archc did not build: functional conv and linear with their own parameters."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 3, 3, 3))
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = torch.nn.functional.conv2d(x, self.weight, padding=1)
        x = self.pool(torch.relu(x)).mean((2, 3))
        return self.fc(x)


def test_complexity_of_a_foreign_graph():
    gm = torch.fx.symbolic_trace(Foreign())
    flops, params, acts = archc.complexity(gm, (1, 3, 8, 8))
    assert flops == 6 * 3 * 9 * 64 + (6 * 4 + 4)
    assert params == 6 * 3 * 9 + 28
    assert acts == 6 * 64 + 6 * 16 + 4


def _batch_norms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


BN_SPEC = {
    "name": "bn",
    "input": {"size": 32},
    "num_classes": 5,
    "bn": {"eps": 1.0e-3, "momentum": 0.01},
    "stem": {"type": "simple", "width": 16},
    "body": {"type": "anynet", "stages": [
        {"block": "inverted_residual", "depth": 2, "width": 16, "stride": 1, "expansion": 4,
         "se_ratio": 0.25},
        {"block": "res_basic", "depth": 1, "width": 32, "bn": {"eps": 0.25, "momentum": None}},
    ]},
    "head": {"type": "classifier", "width": 64, "batch_norm": True},
}


@pytest.mark.parametrize("traced", [False, True])
def test_batch_norm_settings_reach_every_batch_norm(traced):
    """The model's `bn` sets the stem's, the head's (BatchNorm1d too) and a stage's BNs; a
    stage's own `bn` replaces it there (a null momentum included); nothing is counted
    differently."""
    model = archc.build(BN_SPEC) if traced else archc.build_module(BN_SPEC)
    settings = {part: {(m.eps, m.momentum) for m in _batch_norms(model.get_submodule(part))}
                for part in ("stem", "s1", "s2", "head")}
    assert settings == {"stem": {(1e-3, 0.01)}, "s1": {(1e-3, 0.01)}, "s2": {(0.25, None)},
                        "head": {(1e-3, 0.01)}}
    assert any(isinstance(m, nn.BatchNorm1d) for m in _batch_norms(model.head))
    plain = {key: value for key, value in BN_SPEC.items() if key != "bn"}
    plain["body"] = {"type": "anynet", "stages": [
        {key: value for key, value in stage.items() if key != "bn"}
        for stage in BN_SPEC["body"]["stages"]]}
    default = archc.build(plain)
    assert {(m.eps, m.momentum) for m in _batch_norms(default)} == {(1e-5, 0.1)}
    assert archc.complexity(archc.build(BN_SPEC), 32) == archc.complexity(default, 32)


def test_batch_norm_settings_change_the_function_and_the_training_statistics():
    """eps enters every eval-mode BN, momentum every training step's running statistics."""
    plain = {key: value for key, value in BN_SPEC.items() if key != "bn"}
    plain["body"] = {"type": "anynet", "stages": [BN_SPEC["body"]["stages"][0]]}
    tuned = {**plain, "bn": {"eps": 0.5, "momentum": 1.0}}
    x = torch.randn(4, 3, 32, 32)
    default = archc.build_module(plain, init="random")
    other = archc.build_module(tuned, init="random")
    with torch.no_grad():
        assert not torch.allclose(default(x), other(x))
        other.train()(x)
    stem_bn = other.stem.bn
    batch_mean = other.stem.conv(x).mean(dim=(0, 2, 3))
    assert torch.allclose(stem_bn.running_mean, batch_mean, atol=1e-5)  # momentum 1: the batch's


def test_null_momentum_survives_the_dump():
    """Checkpoints store `Spec.to_dict()`, which drops None values; a null momentum (torch's
    cumulative average) is a setting and stays."""
    spec = archc.load_spec({**BN_SPEC, "bn": {"eps": 1.0e-3, "momentum": None}})
    assert spec.to_dict()["bn"] == {"eps": 1e-3, "momentum": None}
    assert spec.to_dict()["body"]["stages"][1]["bn"] == {"eps": 0.25, "momentum": None}
    assert archc.load_spec(spec.to_dict()) == spec


def test_has_batch_norm_says_what_every_shipped_part_builds():
    """`has_batch_norm` of every stem, block and head of the shipped specs (which load-time
    checks of `bn` rely on) agrees with the BatchNorms the part builds."""
    from archc.frontend.blocks.registry import BLOCKS, HEADS, STEMS
    from archc.frontend.reference import shipped_names

    seen = set()
    for name in shipped_names():
        spec = archc.load_spec(name)
        model = archc.build(spec, device="meta")
        stem = dict(model.named_children()).get("stem")
        claims = [("stem", STEMS[spec.stem.type].has_batch_norm, stem),
                  ("head", HEADS[spec.head.type].has_batch_norm(spec.head), model.head)]
        claims += [(stage.block, BLOCKS[stage.block].has_batch_norm,
                    model.get_submodule(f"s{index}"))
                   for index, stage in enumerate(spec.stages(), start=1)]
        for part, claim, module in claims:
            built = module is not None and bool(_batch_norms(module))
            assert claim == built, f"{name}: {part}"
            seen.add((part, claim))
    assert ("conv", False) in seen and ("fire", False) in seen and ("head", False) in seen
