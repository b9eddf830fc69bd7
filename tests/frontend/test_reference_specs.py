"""Reference specs: exact parameter counts (MODELS.md), FLOPs against the papers' tables, and the
train -> deploy -> ONNX path of every spec (slow).

FLOPs are multiply-adds at 224x224 (32x32 for the CIFAR ReduceNet) counted by
`archc.complexity`; docs/models.md states each comparison."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import archc
from archc.backends.export import export_onnx
from archc.ir.init import random_input
from archc.ir.ops import op_kind
from archc.ir.verify import relative_error
from archc.rewrite.pipeline import PassContext, resolve_pipeline, run_pipeline

SPECS = Path(__file__).resolve().parents[2] / "specs"
FLOPS_TOLERANCE = 0.02  # |archc / paper - 1|: the papers round to 2-3 significant digits

# spec -> (params: MODELS.md or, without a reference, archc's own figure; paper FLOPs or None)
REFERENCE = {
    "resnet18": (11_689_512, 1.8e9),
    "resnet50": (25_557_032, 4.1e9),  # v1.5 (stride on the 3x3); the v1 paper's 3.8G is v1
    "resnext50_32x4d": (25_028_904, 4.2e9),
    "mobilenet_v1": (4_231_976, 569e6),
    "mobilenet_v2": (3_504_872, 300e6),
    "shufflenet_v2_x0_5": (1_366_792, 41e6),
    "shufflenet_v2_x1_0": (2_278_604, 146e6),
    "shufflenet_v1_g3": (1_865_728, 140e6),  # no count in MODELS.md (megvii: 1.9M)
    "reducenet20_train": (828_794, None),  # no published figures
    "reducenet20_reduced": (272_474, None),
    "efficientnet_b0": (5_288_548, 0.39e9),
    "mobilenet_v3_large": (5_483_032, 219e6),
    "mobilenet_v3_small": (2_542_856, 56e6),
    # no FLOPs in the SqueezeNet and AlexNet papers: torchvision's 0.82, 0.35 and 0.71 GFLOPS
    "squeezenet1_0": (1_248_424, 0.82e9),
    "squeezenet1_1": (1_235_496, 0.35e9),
    "alexnet": (61_100_840, 0.71e9),
    "alexnet_two_tower": (60_965_224, None),  # archc's count of the paper's net (no reference)
    "seresnet50": (28_088_024, 4.1e9),  # v1.5, as resnet50; the paper's 3.87G is v1
    # DepthShrinker: MobileNetV2's parameters; its moved padding costs FLOPs before `fuse`
    "mobilenet_v2_depthshrinker": (3_504_872, None),
    # train forms of re-parameterized networks: the papers give deploy FLOPs (test_models.py)
    "mobileone_s0": (5_293_272, None),
    "mobileone_s1": (4_825_192, None),
    "fastvit_t8": (4_026_232, None),
    "repvit_m0_9": (5_489_328, None),
    "vanillanet_5": (22_328_800, None),  # no published train-form count
}
# Specs whose train -> deploy path tests/frontend/test_models.py checks (the slow ONNX path below
# would repeat it: VanillaNet-5's default pipeline alone takes ~100 s, see tests/test_golden.py)
DEPLOYED_ELSEWHERE = {"mobileone_s0", "mobileone_s1", "fastvit_t8", "repvit_m0_9", "vanillanet_5"}


def load(name: str) -> archc.Spec:
    return archc.load_spec(SPECS / f"{name}.yaml")


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_params_and_flops(name):
    spec = load(name)
    params, paper_flops = REFERENCE[name]
    gm = archc.build(spec, device="meta")
    assert sum(p.numel() for p in gm.parameters()) == params
    flops, graph_params, _ = archc.complexity(gm, spec.input.size)
    assert graph_params == params
    if paper_flops is not None:
        assert abs(flops / paper_flops - 1) <= FLOPS_TOLERANCE, flops


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_spec_round_trips_through_its_dump(name):
    """Checkpoints store `spec.to_dict()` (every default written out) and load it back."""
    spec = load(name)
    assert archc.load_spec(spec.to_dict()) == spec


def test_reducenet_phases_share_all_but_branch1():
    train, reduced = (archc.build(load(f"reducenet20_{p}"), device="meta") for p in
                      ("train", "reduced"))
    train_keys, reduced_keys = set(train.state_dict()), set(reduced.state_dict())
    assert reduced_keys < train_keys
    assert all(".branch1." in key for key in train_keys - reduced_keys)


def small(name: str) -> tuple[dict, int]:
    """The spec at a small input side (64, or its own if smaller)."""
    spec = load(name).to_dict()
    side = min(64, spec["input"]["size"])
    spec["input"]["size"] = side
    return spec, side


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(REFERENCE) - DEPLOYED_ELSEWHERE))
def test_reference_spec_deploys_exactly_and_matches_onnx(name, tmp_path):
    """In float64 the pipeline is exact to ~1e-14: the check isolates the algebra from float32
    rounding, which alone moves ResNet-50's output by ~1e-5 relative. The deploy graph, back in
    float32, must match its eager output in ONNX Runtime within the fp32 tier of the golden tests
    (1e-4): ResNet-50 and ResNeXt-50 differ by 1.0e-5 and 2.3e-5 there, the others by less than
    1e-5."""
    spec, side = small(name)
    train = archc.build(spec, init="random")
    x = random_input((2, 3, side, side), 1)
    train64, x64 = copy.deepcopy(train).double(), x.double()
    result = run_pipeline(train64, resolve_pipeline("default"), PassContext(example_inputs=(x64,)))
    deploy = result.graph_module
    with torch.no_grad():
        assert relative_error([train64(x64)], [deploy(x64)]) <= 1e-5
    kinds = [op_kind(deploy, n) for n in deploy.graph.nodes]
    assert "BatchNorm2d" not in kinds and "Dropout" not in kinds
    report = export_onnx(deploy.float(), tmp_path / "model.onnx", x[:1], rtol=1e-4)
    assert report.relative_error <= 1e-4
