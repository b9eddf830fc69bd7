"""A spec for a pruned graph (archc.compress.pruned_spec): found where the spec language expresses
the pruned widths, checked by building it, and refused with the first difference otherwise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import archc
from archc.backends.checkpoint import load_checkpoint
from archc.cli.main import main
from archc.compress.pruned_spec import graph_with_weights, spec_for_graph
from archc.compress.pruning import PruneConfig, prune
from archc.frontend.loading import spec_from_mapping
from archc.frontend.lower import input_shape
from archc.ir.graph_edits import set_module
from archc.ir.init import random_input


def _spec(stages, stem=16, channels=3, size=32, **head):
    return {"name": "t", "input": {"channels": channels, "size": size}, "num_classes": 10,
            "stem": {"type": "simple", "width": stem, "stride": 1},
            "body": {"type": "anynet", "stages": stages},
            "head": {"type": "classifier", **head}}


def _pruned(spec_data, config: PruneConfig):
    spec = spec_from_mapping(spec_data)
    gm = archc.build(spec, init="random")
    example = random_input(input_shape(spec, batch=2), 0)
    return spec, prune(gm, example, config).graph_module


def _same_function(spec_data, gm) -> None:
    rebuilt = graph_with_weights(spec_data, gm).double()
    pruned = gm.double()
    x = random_input(input_shape(spec_from_mapping(spec_data), batch=2), 1).double()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), pruned(x), rtol=1e-12, atol=0)


REGNETX = _spec([{"block": "res_bottleneck", "depth": d, "width": w, "stride": s,
                  "group_width": 8} for d, w, s in ((1, 32, 1), (2, 64, 2))])


@pytest.mark.parametrize("policy, group_width", [("keep-count", 4), ("keep-width", 8)])
def test_grouped_regnet_both_policies_give_a_spec(policy, group_width):
    spec, gm = _pruned(REGNETX, PruneConfig(0.5, group_policy=policy))
    fit = spec_for_graph(spec, gm)
    assert fit.spec is not None, fit.reason
    stages = fit.spec["body"]["stages"]
    assert [s["width"] for s in stages] == [16, 32] and fit.spec["stem"]["width"] == 8
    assert {s["group_width"] for s in stages} == {group_width}
    _same_function(fit.spec, gm)


@pytest.mark.parametrize("name", ["regnetx_200mf", "mobilenet_v2", "efficientnet_b0"])
def test_shipped_specs_pruned_per_layer_give_a_spec(name):
    """A regnet body, inverted residuals with a stem/head conv, SE and compound scaling:
    per-layer pruning keeps every stage's blocks alike, so each has a spec."""
    data = yaml.safe_load(Path(f"specs/{name}.yaml").read_text())
    data["input"]["size"] = 32
    spec, gm = _pruned(data, PruneConfig(0.5))
    fit = spec_for_graph(spec, gm)
    assert fit.spec is not None, fit.reason
    assert fit.spec["body"]["type"] == "anynet" and fit.spec["name"] == f"{spec.name}_pruned"
    _same_function(fit.spec, gm)


@settings(max_examples=8, deadline=None)
@given(block=st.sampled_from(["res_bottleneck", "res_basic", "inverted_residual", "repvgg"]),
       widths=st.lists(st.sampled_from([8, 16, 24]), min_size=1, max_size=2),
       depth=st.integers(1, 2), grouped=st.booleans(), ratio=st.sampled_from([0.25, 0.5, 0.7]),
       hidden=st.booleans())
def test_per_layer_pruning_is_always_expressible(block, widths, depth, grouped, ratio, hidden):
    """Per-layer pruning of residual and RepVGG blocks always has a spec (inner and output
    widths keep one ratio in every block), and a spec found computes the pruned function.
    Inverted residuals need not have one: hidden = round(t * w_in) with one t per stage cannot
    follow ceil-rounded widths of different blocks (stem 8 -> 3, hidden 32 -> 10, width 16 -> 5,
    hidden 64 -> 20 at ratio 0.7: t = 10/3 gives 17); nor grouped RepVGG blocks, whose groups
    the spec derives from each block's input width and one group width per stage (a pruned group
    width read back may not even divide the pruned width: 8 channels in groups of 3)."""
    if block == "repvgg" and grouped:  # rising widths: each stage's groups divide its width
        widths = sorted(widths)
    stages = []
    for index, width in enumerate(widths):
        stage = {"block": block, "depth": depth, "width": width, "stride": 1 + index}
        if block in ("res_bottleneck", "repvgg") and grouped:
            stage["group_width"] = 4
        if block == "inverted_residual":
            stage["expansion"] = 4 if grouped else 1
        stages.append(stage)
    data = _spec(stages, stem=8, size=16, **({"width": 32} if hidden else {}))
    spec, gm = _pruned(data, PruneConfig(ratio))
    fit = spec_for_graph(spec, gm)
    if block in ("res_bottleneck", "res_basic") or block == "repvgg" and not grouped:
        assert fit.spec is not None, fit.reason
    if fit.spec is not None:
        _same_function(fit.spec, gm)
    else:  # the spec derives another width, or the widths read back break a stage's rule
        assert ("a spec derives this width" in fit.reason
                or "the widths read back make no valid spec" in fit.reason), fit.reason


# ---- every reason there is no spec ----

def test_refuses_a_block_whose_widths_are_not_read():
    spec, gm = _pruned(_spec([{"block": "acb", "depth": 2, "width": 16}]), PruneConfig(0.5))
    assert "the widths of a acb block are not read back" in spec_for_graph(spec, gm).reason


def test_refuses_blocks_of_one_stage_that_differ():
    """A global threshold prunes the inner widths of basic blocks apart from their output,
    which res_basic ties them to."""
    spec, gm = _pruned(_spec([{"block": "res_basic", "depth": 2, "width": 32, "stride": 1}]),
                       PruneConfig(0.5, global_threshold=True))
    reason = spec_for_graph(spec, gm).reason
    assert "the pruned graph has shape" in reason and "a spec derives this width" in reason


def test_refuses_a_width_the_spec_rounding_cannot_give():
    """SE widths rounded to multiples of 8 cannot be 12 (24 halved)."""
    stage = {"block": "inverted_residual", "depth": 1, "width": 24, "stride": 1,
             "expansion": 4, "se_ratio": 0.25, "se_divisor": 8, "se_base": "inner"}
    spec, gm = _pruned(_spec([stage], stem=24), PruneConfig(0.5))
    assert spec_for_graph(spec, gm).reason.startswith("s1.b1.f.se.")


def test_refuses_a_graph_that_computes_another_function():
    """Stem 24 -> 16 and a stride-1 inverted residual 24 -> 16 rounded to 16: the spec of those
    widths has a residual add the pruned graph has not (same parameters, other function)."""
    stage = {"block": "inverted_residual", "depth": 1, "width": 16, "stride": 1}
    spec, gm = _pruned(_spec([stage], stem=24), PruneConfig(0.5, round_to=16))
    assert "computes another function" in spec_for_graph(spec, gm).reason


def test_refuses_modules_the_spec_does_not_build_or_builds_otherwise():
    data = _spec([{"block": "vanilla", "depth": 1, "width": 16, "stride": 1}])
    spec, gm = _pruned(data, PruneConfig(0.5))
    assert spec_for_graph(spec, gm).spec is not None
    gm.add_module("extra", nn.Conv2d(1, 1, 1))
    assert spec_for_graph(spec, gm).reason == "the spec builds no extra.bias"
    spec, gm = _pruned(data, PruneConfig(0.5))
    set_module(gm, "s1.b1.a.bn", nn.Identity())
    assert spec_for_graph(spec, gm).reason == (
        "the spec builds s1.b1.a.bn.bias, which the pruned graph has not")
    spec, gm = _pruned(data, PruneConfig(0.5))
    conv = gm.get_submodule("s1.b1.a.conv")
    set_module(gm, "s1.b1.a.conv", nn.Conv2d(conv.in_channels, conv.out_channels, 3, padding=2,
                                            dilation=2, bias=False))
    assert spec_for_graph(spec, gm).reason.startswith("s1.b1.a.conv: the spec builds")
    set_module(gm, "s1.b1.b.conv", nn.Identity())
    assert spec_for_graph(spec, gm).reason == (
        "s1.b1.b.conv is a Identity, not the conv a spec builds")


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_refuses_widths_that_make_no_valid_spec():
    """A stem conv of 0 output channels reads back as stem width 0, which no spec has."""
    data = _spec([{"block": "res_basic", "depth": 1, "width": 16, "stride": 1}])
    spec, gm = _pruned(data, PruneConfig(0.5))
    set_module(gm, "stem.conv", nn.Conv2d(3, 0, 3, padding=1, bias=False))
    assert spec_for_graph(spec, gm).reason.startswith("the widths read back make no valid spec")


def _checkpoint(tmp_path, data, name="m"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["build", str(path), "-o", str(tmp_path / f"{name}.pt"), "-q"]) == 0
    return tmp_path / f"{name}.pt"


def test_cli_writes_the_spec_and_info_agrees(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path, REGNETX)
    out, spec_file = tmp_path / "p.pt", tmp_path / "p.yaml"
    capsys.readouterr()
    assert main(["prune", str(ckpt), "--macs", "0.5", "-o", str(out), "--spec", str(spec_file),
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert yaml.safe_load(spec_file.read_text()) == report["spec"]
    spec, gm = load_checkpoint(out)
    assert spec_from_mapping(spec) == spec_from_mapping(report["spec"])
    assert not gm.meta.get("archc_edits")  # a plain checkpoint of the new spec
    for source in (spec_file, out):
        assert main(["info", str(source), "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert (info["flops"], info["params"]) == (report["macs"][1], report["params"][1])


def test_cli_spec_refused_when_not_expressible(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path, _spec([{"block": "res_basic", "depth": 2, "width": 32,
                                         "stride": 1}]))
    capsys.readouterr()
    out, spec_file = tmp_path / "p.pt", tmp_path / "p.yaml"
    assert main(["prune", str(ckpt), "--ratio", "0.5", "--global", "-o", str(out),
                 "--spec", str(spec_file)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"error: {spec_file}: the pruned model is not expressible as a spec")
    assert not out.exists() and not spec_file.exists()
    # without --spec the checkpoint holds the original spec plus the graph edits
    assert main(["prune", str(ckpt), "--ratio", "0.5", "--global", "-o", str(out)]) == 0
    assert "spec: none (" in capsys.readouterr().out
    spec, gm = load_checkpoint(out)
    assert spec["name"] == "t" and gm.meta.get("archc_edits")
