"""`archc prune` on models archc did not build (tests/wild/prunable.py: torchvision- and
timm-style code), reached as a pickled module or a torch.export program: the pruned model is
written as a torch.export program whose complexity `archc info` agrees with."""

from __future__ import annotations

import json

import pytest
import torch

from archc.backends.importers import canonical_graph
from archc.cli.main import main
from archc.compress.pruning import PruneConfig, prune
from archc.ir.init import random_input, randomize
from tests.helpers import kill_half
from tests.wild.prunable import NETWORKS

SHAPE = (2, 3, 32, 32)


def _model(name: str):
    return randomize(NETWORKS[name](), 0, calibration_input=random_input((4, *SHAPE[1:]), 1)).eval()


@pytest.mark.parametrize("name", ["resnet_basic", "resnext_bottleneck", "mobilenet_v2"])
def test_pickled_library_model_prunes_to_a_program_info_agrees(tmp_path, capsys, name):
    source, out = tmp_path / "model.pt", tmp_path / "pruned.pt2"
    torch.save(_model(name), source)
    assert main(["prune", str(source), "--trust-pickle", "--input-shape", "2,3,32,32",
                 "--macs", "0.5", "-o", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "pickled nn.Module"
    assert 0.4 * report["macs"][0] <= report["macs"][1] <= 0.5 * report["macs"][0]
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["flops"], info["params"]) == (report["macs"][1], report["params"][1])
    program = torch.export.load(str(out)).module()
    assert program(random_input(SHAPE, 3)).shape == (2, 10)


def test_refuses_outputs_that_do_not_fit_the_source(tmp_path, capsys):
    source = tmp_path / "model.pt"
    torch.save(_model("resnet_basic"), source)
    common = ["prune", str(source), "--trust-pickle", "--input-shape", "2,3,32,32", "--ratio",
              "0.5"]
    cases = [
        (["-o", str(tmp_path / "p.pt")], "its pruned form is written as a torch.export program"),
        (["-o", str(tmp_path / "p.pt2"), "--spec", str(tmp_path / "p.yaml")], "it has no spec"),
    ]
    for extra, message in cases:
        assert main(common + extra) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err
    assert main(["prune", str(source), "--ratio", "0.5", "-o", str(tmp_path / "p.pt2")]) == 2
    assert "--trust-pickle" in capsys.readouterr().err
    assert main(["build", "bench/compression/digits_resnet.yaml", "-o", str(tmp_path / "a.pt"),
                 "-q"]) == 0
    assert main(["prune", str(tmp_path / "a.pt"), "--ratio", "0.5", "-o",
                 str(tmp_path / "a.pt2")]) == 2
    assert "a pruned archc checkpoint is written as .pt" in capsys.readouterr().err
    assert not list(tmp_path.glob("p.*")) and not (tmp_path / "a.pt2").exists()


@pytest.mark.parametrize("name", list(NETWORKS))
@pytest.mark.parametrize("route", ["trace", "export"])
def test_dead_channels_of_library_models_pruned_exactly(name, route):
    """Half of every free group made dead (the timm-style stage: functional BN behind a shape
    assert, SE, a layer scale, drop path) -> pruned away exactly, through symbolic tracing or a
    torch.export program, after the canonical pipeline."""
    example = random_input(SHAPE, 0)
    model = _model(name)
    if route == "trace":
        gm = torch.fx.symbolic_trace(model)
    else:
        from archc.backends.importers import lift_aten_graph

        gm = lift_aten_graph(torch.export.export(model, (example,)).module())
    gm = canonical_graph(gm, example).double()
    kill_half(gm, example.double())
    result = prune(gm, example.double(), PruneConfig(0.5))
    assert result.macs[1] < 0.6 * result.macs[0]
    x = random_input(SHAPE, 5).double()
    torch.testing.assert_close(result.graph_module(x), gm(x), rtol=1e-12, atol=1e-12)
    if name == "timm_style":  # the layer scales were pruned with their channels
        before = {n: p.shape[0] for n, p in gm.named_parameters() if n.endswith("gamma")}
        after = {n: p.shape[0] for n, p in result.graph_module.named_parameters()
                 if n.endswith("gamma")}
        assert before and before.keys() == after.keys()
        assert all(after[n] == before[n] // 2 for n in before)


def test_pruned_program_prunes_again(tmp_path, capsys):
    source, once, twice = tmp_path / "m.pt2", tmp_path / "p.pt2", tmp_path / "pp.pt2"
    torch.export.save(torch.export.export(_model("timm_style"), (random_input(SHAPE, 0),)),
                      str(source))
    assert main(["prune", str(source), "--ratio", "0.3", "-o", str(once), "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(["prune", str(once), "--ratio", "0.3", "-o", str(twice), "--json"]) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["macs"][0] == first["macs"][1] and second["macs"][1] < first["macs"][1]


def test_canonical_checks_run_at_a_small_input_and_shapes_at_the_example(monkeypatch):
    """A large example: the float64 checks of the canonical pipeline run at one 64x64 sample,
    the shapes are recorded at the example, and the graph computes what the model does there;
    a graph whose sizes are fixed, or whose maps the small input shrinks to 1x1, is checked at
    the example itself."""
    from archc.backends import importers
    from archc.ir.shapes import node_shape
    from archc.rewrite import pipeline as pruning_pipeline

    example = random_input((1, 3, 96, 96), 0)
    gm = torch.fx.symbolic_trace(_model("resnet_basic"))
    assert importers._verification_input(gm, example).shape == (1, 3, 64, 64)
    canonical = canonical_graph(gm, example)
    placeholder = next(n for n in canonical.graph.nodes if n.op == "placeholder")
    assert node_shape(placeholder) == (1, 3, 96, 96)
    torch.testing.assert_close(canonical(example), gm(example))
    fixed = torch.fx.symbolic_trace(torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, 2, 1), torch.nn.Flatten(),
        torch.nn.Linear(4 * 48 * 48, 10)).eval())
    assert importers._verification_input(fixed, example) is None
    assert canonical_graph(fixed, example)(example).shape == (1, 10)
    assert importers._verification_input(gm, random_input(SHAPE, 0)) is None  # small already
    deep = torch.fx.symbolic_trace(torch.nn.Sequential(  # 96 -> 2x2 maps, 64 -> 1x1: too small
        torch.nn.Conv2d(3, 4, 3, 64, 1), torch.nn.Conv2d(4, 4, 3, 1, 1)).eval())
    checked_at = []
    run = pruning_pipeline.run_pipeline

    def spy(model, names, context):
        checked_at.append(tuple(context.example_inputs[0].shape))
        return run(model, names, context)

    monkeypatch.setattr(pruning_pipeline, "run_pipeline", spy)
    canonical_graph(gm, example)
    canonical_graph(deep, example)
    assert checked_at == [(1, 3, 64, 64), (1, 3, 64, 64), (1, 3, 96, 96)]
    small = importers._verification_input(gm, example)
    monkeypatch.setattr(importers, "_verification_input", lambda *args: small)
    monkeypatch.setattr(importers, "propagate_shapes", lambda *args: False)
    with pytest.raises(importers.CheckpointError,
                       match="does not run at the example input 1x3x96x96"):
        canonical_graph(gm, example)


def test_no_verify_skips_the_canonical_checks(monkeypatch):
    """`archc prune --no-verify` (`canonical_graph(verify=False)`): no float64 reference run."""
    from archc.ir import verify

    def refuse(*args):
        raise RuntimeError("float64 reference run")

    monkeypatch.setattr(verify, "float64_reference", refuse)
    gm = torch.fx.symbolic_trace(_model("resnet_basic"))
    example = random_input(SHAPE, 0)
    assert canonical_graph(gm, example, verify=False)(example).shape == (2, 10)
    with pytest.raises(RuntimeError, match="float64 reference run"):
        canonical_graph(gm, example)
