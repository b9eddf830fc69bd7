"""The source notes' architectures (EfficientNet, MobileNetV3, SqueezeNet, AlexNet, SE-ResNet,
MobileOne, FastViT, RepViT, VanillaNet, DepthShrinker): what their specs build, and the train ->
deploy forms of the re-parameterized ones through the default pipeline (rel err = max|Δ| /
max|ref| <= 1e-5, no BatchNorm left), with the deploy forms' parameters against the published
deploy counts and their multiply-adds against the papers. Parameter counts of the train forms
are in tests/frontend/test_reference_specs.py."""

from __future__ import annotations

import copy
import functools
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn

import archc
from archc.cli.main import main
from archc.frontend.blocks.layers import StochasticDepth
from archc.frontend.blocks.vanillanet import (
    DeepTrainingActivation,
    deep_training_lambda,
    set_activation_lambda,
)
from archc.ir.init import pycls_init, random_input, randomize
from archc.ir.ops import op_kind
from archc.ir.verify import relative_error
from archc.rewrite.pipeline import PassContext, resolve_pipeline, run_pipeline

SPECS = Path(__file__).resolve().parents[2] / "specs"
SIDE = 64  # at 32 pixels the last stages are 1x1: BN statistics of 2 values, ill-conditioned
X = random_input((2, 3, SIDE, SIDE), 1)
FLOPS_TOLERANCE = 0.02

# Train-form spec -> (archc's deploy params, the paper's deploy multiply-adds, the unit of the
# paper's last digit). A paper figure given to one significant digit (0.7G, 0.8G) is compared
# within its own rounding, half that unit, when that exceeds 2%.
DEPLOY = {
    # MobileOne (Vasu et al. 2023, Table 7): 2.1M / 0.275G and 4.8M / 0.825G
    "mobileone_s0": (2_078_504, 275e6, 1e6),
    "mobileone_s1": (4_764_840, 825e6, 1e6),
    # FastViT (Vasu et al. 2023, Table 1: 0.7G at 256x256). timm's deploy form has 3,996,040:
    # it leaves each ConvFFN's BN (2C) and the ConvFFN's layer scale (C) behind; archc folds the
    # BN into the depthwise 7x7 (C biases) and the scale into fc2, -2 x 1,824 over the blocks'
    # sum of widths C = 1,824
    "fastvit_t8": (3_996_040 - 2 * 1_824, 0.7e9, 0.1e9),
    # RepViT (Wang et al. 2024, Table 4: 5.1M, 0.8G): the classifier and the distillation head,
    # averaged in eval mode, merge into one Linear
    "repvit_m0_9": (5_067_056, 0.8e9, 0.1e9),
}
DEPTHSHRINKER = "mobilenet_v2_depthshrinker"


def load(name: str) -> archc.Spec:
    return archc.load_spec(SPECS / f"{name}.yaml")


def params(gm: nn.Module) -> int:
    return sum(p.numel() for p in gm.parameters())


def kinds(gm) -> Counter:
    return Counter(op_kind(gm, n) for n in gm.graph.nodes if n.op not in ("placeholder", "output"))


def within_paper(flops: int, paper: float, unit: float) -> bool:
    return abs(flops / paper - 1) <= max(FLOPS_TOLERANCE, 0.5 * unit / paper)


def small(spec: archc.Spec | dict) -> dict:
    data = spec.to_dict() if isinstance(spec, archc.Spec) else dict(spec)
    return {**data, "input": {**data.get("input", {}), "size": SIDE}}


@functools.cache
def deployed(name: str):
    """(train graph, deploy graph) of a spec at 64x64, random weights, default pipeline."""
    train = archc.build(small(load(name)), init="random")
    result = run_pipeline(train, resolve_pipeline("default"), PassContext(example_inputs=(X,)))
    return train, result.graph_module


def assert_exact_without_bn(train, deploy) -> None:
    """Both forms evaluated in float64 (the deploy form with its float32 weights): the rewrite's
    error apart from float32 evaluation, which alone moves these networks by up to ~1e-5."""
    with torch.no_grad():
        reference = copy.deepcopy(train).double()(X.double())
        assert relative_error([reference], [copy.deepcopy(deploy).double()(X.double())]) <= 1e-5
    remaining = kinds(deploy)
    assert remaining["BatchNorm2d"] == remaining["BatchNorm1d"] == 0, remaining


# ---- re-parameterized train forms -> deploy forms ----

@pytest.mark.parametrize("name", sorted(DEPLOY))
def test_train_form_fuses_to_the_deploy_form(name):
    train, deploy = deployed(name)
    assert_exact_without_bn(train, deploy)
    deploy_params, paper, unit = DEPLOY[name]
    assert params(deploy) == deploy_params
    flops = archc.complexity(deploy, load(name).input.size)[0]
    assert within_paper(flops, paper, unit), flops


def test_mobileone_units_become_one_conv_each():
    """S0: 1 stem unit + 21 blocks x (depthwise + pointwise) = 43 convs, one ReLU each."""
    for name in ("mobileone_s0", "mobileone_s1"):
        ops = kinds(deployed(name)[1])
        assert ops["Conv2d"] == ops["ReLU"] == 43 and ops["add"] == 0, ops


def test_fastvit_token_mixers_and_stem_collapse():
    """Stem 3 convs; per RepMixer block the mixer, the ConvFFN's 7x7, fc1, fc2; per patch
    embedding the 7x7 (the 3x3 merged in) and the 1x1; the final conv: 3 + 4 x 10 + 2 x 3 + 1 +
    2 SE convs = 52. What stays besides: the residual adds of the ConvFFNs and their scales."""
    ops = kinds(deployed("fastvit_t8")[1])
    assert ops["Conv2d"] == 52 and ops["add"] == 10, ops


def test_fastvit_layer_scales_fold_into_the_convs():
    """Each ConvFFN's layer scale (x * gamma, gamma of shape (C, 1, 1)) folds into its fc2."""
    assert kinds(deployed("fastvit_t8")[1])["mul"] == 1  # SE's gate only


def test_repvit_distillation_heads_merge():
    """(fc(x) + dist_fc(x)) / 2 over two Linear layers becomes one Linear."""
    assert kinds(deployed("repvit_m0_9")[1])["Linear"] == 1


def test_repvit_token_mixers_fold_and_se_alternates():
    model = archc.build_module(load("repvit_m0_9"), device="meta")
    # stage 1 (no downsampling): SE in b1, not b2; stage 3: b1 downsamples, SE in b2, b4, ...
    assert model.s1.b1.se is not None and model.s1.b2.se is None
    assert model.s3.b1.downsample and model.s3.b1.pre.se is None
    assert [model.s3[i].se is not None for i in range(1, 6)] == [True, False, True, False, True]
    assert model.s1.b1.se.reduce.out_channels == 16  # make_divisible(48 / 4, 8)
    ops = kinds(deployed("repvit_m0_9")[1])
    # stem 2; stride-1 blocks mixer + 2 FFN (+ 2 SE); downsampling blocks 3 + 2 + 2
    assert ops["Conv2d"] == 2 + 20 * 3 + 10 * 2 + 3 * 7, ops


# ---- VanillaNet: deep training ----

def vanillanet(lam: float, widths=(64, 128, 256, 512)) -> dict:
    """VanillaNet-5 at 1/8 of its widths (the full one is tested slow)."""
    data = small(load("vanillanet_5"))
    data["stem"] = {**data["stem"], "width": widths[0]}
    data["body"] = {**data["body"], "stages": [
        {**stage, "width": width} for stage, width in zip(data["body"]["stages"], widths[1:])]}
    return {**data, "activation_lambda": lam}


def vanillanet_deploy_params(widths=(64, 128, 256, 512), classes=1000) -> int:
    """The paper's deploy form: 4x4/4 conv, then per stage one 1x1 conv, each followed by a
    depthwise 7x7 with bias (the series), and one 1x1 conv to the classes; all with bias."""
    total = 3 * 16 * widths[0] + widths[0]
    for w_in, w_out in zip(widths, widths[1:]):
        total += w_in * w_out + w_out
    total += sum(50 * width for width in widths)
    return total + widths[-1] * classes + classes


@functools.cache
def vanillanet_deployed(lam: float):
    train = archc.build(vanillanet(lam), init="random")
    result = run_pipeline(train, resolve_pipeline("default"), PassContext(example_inputs=(X,)))
    return train, result.graph_module


def test_vanillanet_at_lambda_1_fuses_to_its_deploy_form():
    train, deploy = vanillanet_deployed(1.0)
    assert_exact_without_bn(train, deploy)
    assert params(deploy) == vanillanet_deploy_params()
    ops = kinds(deploy)
    # stem conv + 3 block convs + 1 head conv, a 7x7 series conv after each but the head's
    assert ops["Conv2d"] == 9 and ops["ReLU"] == 4 and ops["MaxPool2d"] == 3, ops


def test_vanillanet_below_lambda_1_keeps_its_non_linearity():
    """0 < λ < 1: leaky_relu(x, λ) between the convs, which stay apart (five pairs)."""
    train, deploy = vanillanet_deployed(0.5)
    assert_exact_without_bn(train, deploy)
    assert kinds(deploy)["Conv2d"] == 9 + 5
    assert sum(n.target is nn.functional.leaky_relu for n in deploy.graph.nodes) == 5


def test_deep_training_schedule_on_the_eager_model():
    """λ = epoch / decay_epochs up to 1; set on the eager model, the activation moves from ReLU
    to the identity, and the traced graph at λ = 1 has no op in its place."""
    assert [deep_training_lambda(e, 4) for e in (0, 1, 4, 9)] == [0.0, 0.25, 1.0, 1.0]
    model = archc.build_module(vanillanet(0.0))
    acts = [m for m in model.modules() if isinstance(m, DeepTrainingActivation)]
    assert len(acts) == 5 and {a.lam for a in acts} == {0.0}
    x = torch.linspace(-2, 2, 5)
    assert torch.equal(acts[0](x), torch.relu(x))
    set_activation_lambda(model, 1.0)
    assert torch.equal(acts[0](x), x)
    assert not any(n.target is nn.functional.leaky_relu
                   for n in torch.fx.symbolic_trace(model).graph.nodes)


@pytest.mark.slow
def test_vanillanet_5_fuses_to_its_deploy_form():
    """VanillaNet-5 (15.5M deploy parameters, 5.2 GFLOPs in the paper's Table 1)."""
    spec = load("vanillanet_5")
    train = archc.build(small(spec), init="random")
    deploy = run_pipeline(train, resolve_pipeline("default"),
                          PassContext(example_inputs=(X,))).graph_module
    assert_exact_without_bn(train, deploy)
    assert params(deploy) == vanillanet_deploy_params((512, 1024, 2048, 4096)) == 15_523_304
    assert within_paper(archc.complexity(deploy, spec.input.size)[0], 5.2e9, 0.1e9)


# ---- DepthShrinker ----

def test_depthshrinker_merges_the_linear_blocks_into_dense_convs():
    """The ten residual blocks without activations become one dense 3x3 conv each (shortcut
    included): 52 - 2 x 10 = 32 convs, the function of the unfused linearized network."""
    train, deploy = deployed(DEPTHSHRINKER)
    assert_exact_without_bn(train, deploy)
    baseline = kinds(deployed("mobilenet_v2")[1])
    ops = kinds(deploy)
    assert ops["Conv2d"] == baseline["Conv2d"] - 20 == 32 and ops["add"] == 0
    assert ops["ReLU6"] == baseline["ReLU6"] - 20
    merged = deploy.get_submodule("s3.b1.f.merged")
    assert merged.kernel_size == (3, 3) and merged.groups == 1 and merged.in_channels == 24
    # the shrunk network is cheaper than MobileNetV2's deploy form
    flops = archc.complexity(deploy, 224)[0]
    assert flops < archc.complexity(deployed("mobilenet_v2")[1], 224)[0]


def test_depthshrinker_blocks_are_exact_at_the_border():
    """The expand conv pads, the depthwise conv does not: the linear block is a dense 3x3 conv
    on the zero-padded input, which is what the merge computes (no border trap)."""
    block = archc.build_module(load(DEPTHSHRINKER)).s3.b1
    assert block.f.expand.conv.padding == (1, 1) and block.f.dw.conv.padding == (0, 0)
    assert not any(isinstance(m, nn.ReLU6) for m in block.modules())
    unchanged = archc.build_module(load(DEPTHSHRINKER)).s2.b1
    assert unchanged.f.expand.conv.padding == (0, 0) and unchanged.f.dw.conv.padding == (1, 1)


# ---- EfficientNet, MobileNetV3, SqueezeNet, AlexNet, SE-ResNet ----

# torchvision's published counts of EfficientNet-B1..B7 and its (width, depth) multipliers
EFFICIENTNETS = {
    "b1": (1.0, 1.1, 7_794_184), "b2": (1.1, 1.2, 9_109_994), "b3": (1.2, 1.4, 12_233_232),
    "b4": (1.4, 1.8, 19_341_616), "b5": (1.6, 2.2, 30_389_784), "b6": (1.8, 2.6, 43_040_704),
    "b7": (2.0, 3.1, 66_347_960),
}


@pytest.mark.parametrize("variant", sorted(EFFICIENTNETS))
def test_efficientnet_b1_to_b7_are_one_field_away(variant):
    width, depth, count = EFFICIENTNETS[variant]
    data = load("efficientnet_b0").to_dict()
    data["body"]["compound_scaling"] = {"width": width, "depth": depth}
    assert params(archc.build(data, device="meta")) == count


def test_efficientnet_compound_scaling_rounds_as_torchvision():
    data = load("efficientnet_b0").to_dict()
    data["body"]["compound_scaling"] = {"width": 1.1, "depth": 1.2}
    spec = archc.load_spec(data)
    # widths: make_divisible(c * 1.1, 8); depths: ceil(n * 1.2)
    assert [s.width for s in spec.stages()] == [16, 24, 48, 88, 120, 208, 352]
    assert [s.depth for s in spec.stages()] == [2, 3, 3, 4, 4, 5, 2]
    assert spec.built_stem().width == 32 and spec.built_head().width == 1408


def test_efficientnet_stochastic_depth():
    """Block n of N drops its residual branch with probability 0.2 n / N in training; eval mode
    (and so every traced graph) is the identity."""
    model = archc.build_module(load("efficientnet_b0"), device="meta")
    rates = [m.p for m in model.modules() if isinstance(m, StochasticDepth)]
    assert rates == pytest.approx([0.2 * n / 16 for n in range(16)])
    # in a residual block in training mode: per sample x (dropped) or x + f(x) / (1 - p)
    block = archc.build_module(small(load("efficientnet_b0")), init="random").s2.b2
    block.drop_path = StochasticDepth(0.5).train()
    x = random_input((64, 24, 8, 8), 2)
    torch.manual_seed(0)
    with torch.no_grad():
        branch, out = block.f(x), block(x)
    dropped = [torch.equal(o, xi) for o, xi in zip(out, x)]
    kept = [torch.allclose(o, xi + 2 * b) for o, xi, b in zip(out, x, branch)]
    assert all(d != k for d, k in zip(dropped, kept)) and 10 < sum(dropped) < 54
    assert block.drop_path.eval()(x) is x
    assert not any("drop_path" in str(n.target) for n in archc.build(load("efficientnet_b0"),
                                                                       device="meta").graph.nodes)


# MobileNetV3's per-block tables (Howard et al. 2019, Tables 1 and 2): (kernel, exp size, SE)
MOBILENET_V3 = {
    "mobilenet_v3_large": [(3, 16, 0), (3, 64, 0), (3, 72, 0), (5, 72, 1), (5, 120, 1),
                           (5, 120, 1), (3, 240, 0), (3, 200, 0), (3, 184, 0), (3, 184, 0),
                           (3, 480, 1), (3, 672, 1), (5, 672, 1), (5, 960, 1), (5, 960, 1)],
    "mobilenet_v3_small": [(3, 16, 1), (3, 72, 0), (3, 88, 0), (5, 96, 1), (5, 240, 1),
                           (5, 240, 1), (5, 120, 1), (5, 144, 1), (5, 288, 1), (5, 576, 1),
                           (5, 576, 1)],
}


@pytest.mark.parametrize("name", sorted(MOBILENET_V3))
def test_mobilenet_v3_builds_the_papers_table(name):
    model = archc.build_module(load(name), device="meta")
    rows = []
    for stage in range(1, len(load(name).stages()) + 1):
        for block in getattr(model, f"s{stage}").children():
            dw = block.f.dw.conv
            rows.append((dw.kernel_size[0], dw.out_channels, int(hasattr(block.f, "se"))))
            if hasattr(block.f, "se"):
                assert isinstance(block.f.se.gate, nn.Hardsigmoid)
    assert rows == MOBILENET_V3[name]
    assert isinstance(model.head.hidden[0].act, nn.Hardswish)


def test_squeezenet_fires_concatenate_their_expand_convs():
    gm = archc.build(load("squeezenet1_1"), device="meta")
    assert sum(n.target is torch.cat for n in gm.graph.nodes) == 8
    fire = gm.get_submodule("s2.b1")
    assert (fire.squeeze.conv.out_channels, fire.expand1x1.conv.out_channels,
            fire.expand3x3.conv.out_channels) == (16, 64, 64)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gm.modules())
    pool = gm.get_submodule("s1.pool")
    assert isinstance(pool, nn.MaxPool2d) and pool.ceil_mode


def test_alexnet_two_towers_are_groups_of_2():
    model = archc.build_module(load("alexnet_two_tower"), device="meta")
    assert [getattr(model, f"s{i}").b1.conv.groups for i in range(1, 6)] == [1, 2, 1, 2, 2]
    single = archc.build_module(load("alexnet"), device="meta")
    assert single.head.hidden[0].fc.in_features == 256 * 6 * 6


def test_seresnet_squeeze_excites_the_block_output():
    block = archc.build_module(load("seresnet50"), device="meta").s4.b1
    assert list(block.f)[-1].expand.out_channels == 2048
    assert list(dict(block.f.named_children()))[-2:] == ["c", "se"]
    assert block.f.se.reduce.out_channels == 128  # 2048 / 16


# ---- every new block: deterministic initialization of every parameter, archc info ----

INIT_SPECS = ["fastvit_t8", "repvit_m0_9", "mobileone_s1", "squeezenet1_1", "mobilenet_v3_small"]


@pytest.mark.parametrize("name", INIT_SPECS)
def test_both_initializations_write_every_parameter(name):
    """Every parameter (layer scales included) is set by pycls_init and by randomize, and the
    same seed gives the same values."""
    spec = small(load(name))
    for initialize in (pycls_init, randomize):
        model = archc.build_module(spec, device="meta").to_empty(device="cpu")
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.data.fill_(float("nan"))
        initialize(model, 3)
        stale = [n for n, t in [*model.named_parameters(), *model.named_buffers()]
                 if t.is_floating_point() and t.isnan().any()]
        assert stale == [], f"{initialize.__name__} leaves {stale[:3]}"
    first, second = (archc.build_module(spec, init="random", seed=3) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(),
                                                  second.state_dict().values()))


def test_pycls_init_sets_layer_scales_to_their_initial_value():
    model = archc.build_module(small(load("fastvit_t8")))
    assert torch.all(model.s2.b1.ffn_scale.gamma == 1e-5)


def test_archc_info_reports_a_new_spec(capsys):
    assert main(["info", str(SPECS / "fastvit_t8.yaml"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["params"] == 4_026_232 and report["input_shape"] == [1, 3, 256, 256]
    assert [row.get("block") for row in report["stages"]][1:6] == ["repmixer"] * 4 + [
        "mobileone_unit"]
