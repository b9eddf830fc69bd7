"""The rewrite engine's pieces: the driver's sweep cap and outcomes, the graph helpers (in-place
detection, erasing, copies), shapes on meta tensors kept current, declared pass options, and
float64 verification judged against the model's own rounding."""

from __future__ import annotations

import operator

import pytest
import torch
from torch import nn
from torch.fx import Graph, GraphModule
from torch.fx.passes.shape_prop import ShapeProp

import archc
from archc.errors import ArchcError, PassError
from archc.ir.graph import copy_module, erase_unused, unique_name, writes_in_place
from archc.ir.init import random_input, randomize
from archc.ir.shapes import node_shape, propagate_shapes, refresh_shapes
from archc.passes.pipelines import PIPELINES
from archc.rewrite import weight_algebra
from archc.rewrite.pipeline import PassContext, check_options, run_pipeline
from archc.rewrite.rules import (
    MAX_SWEEPS,
    Done,
    FixpointError,
    Op,
    Plan,
    Refuse,
    Refused,
    Rule,
    RuleError,
    Skip,
    always,
    apply_rules,
    whole_graph,
    without_plan,
)

# ---- the driver ----

def _flip(match, plan) -> str:
    """Swap relu for sigmoid or back: a rule pair that never settles."""
    node = match.anchor
    node.target = torch.sigmoid if node.target is torch.relu else torch.relu
    return f"flipped {node.name}"


def test_the_sweep_cap_fires_with_a_clear_internal_error():
    gm = torch.fx.symbolic_trace(lambda x: torch.relu(x))
    rules = [Rule("flip", (Op(functions=(torch.relu, torch.sigmoid)),), always, _flip,
                  "none: a broken rule")]
    with pytest.raises(FixpointError, match=rf"internal error: rules flip did not reach a "
                                            rf"fixpoint in {MAX_SWEEPS} sweeps \(the last sweep "
                                            rf"still rewrote: flipped relu\)"):
        apply_rules(gm, rules)
    assert not issubclass(FixpointError, ArchcError)  # an archc bug: exit 1, not a user error


def _negations(gm, node, memo):
    return (node,) if node.op == "call_function" and node.target is torch.neg else None


def _to_abs(match, node) -> Done:
    """Rewrite the planned node to abs: it no longer matches, so the next sweep settles."""
    node.target = torch.abs
    return Done(f"rewrote {node.name}", rounded=torch.float32)


def _three_negations() -> GraphModule:
    return torch.fx.symbolic_trace(lambda x: torch.neg(torch.neg(x)) + torch.neg(x))


def _run(check, rewrite=_to_abs, gm=None):
    gm = _three_negations() if gm is None else gm
    return apply_rules(gm, [Rule("neg", _negations, check, rewrite, "none")]).report


def test_a_plan_applies_its_value_and_done_marks_rounding():
    seen = []

    def check(match):
        seen.append(match.anchor.name)
        return Plan(match.anchor)

    report = _run(check)
    assert report.rewrites == ["rewrote neg", "rewrote neg_1", "rewrote neg_2"]
    assert report.rounded_in == torch.float32 and report.fired == {"neg": 3}
    assert report.refusals == []  # the final sweep matched nothing
    assert seen == ["neg", "neg_1", "neg_2"]


def test_skip_applies_nothing_and_says_nothing():
    report = _run(lambda match: Skip(), rewrite=None)
    assert report.rewrites == [] and report.refusals == [] and not report.fired
    report = _run(lambda match: without_plan([]), rewrite=None)  # no refusal: a skip
    assert report.rewrites == [] and report.refusals == []


def test_refuse_reports_its_reason_at_the_match_or_its_own_nodes():
    report = _run(lambda match: Refuse("never"), rewrite=None)
    assert report.rewrites == []
    assert [str(r) for r in report.refusals] == ["neg at neg: never", "neg at neg_1: never",
                                                 "neg at neg_2: never"]
    refused = Refused((Refuse("one", ("here",)), Refuse("two", ("there",), rule="side")))
    report = _run(lambda match: refused if match.anchor.name == "neg" else Skip(), rewrite=None)
    assert [str(r) for r in report.refusals] == ["neg at here: one", "side at there: two"]
    assert without_plan(refused.refusals) == refused


def test_a_plan_with_refusals_applies_and_reports_them():
    left_out = (Refuse("left out", ("somewhere",), rule="part"),)

    def rewrite(match, node) -> list[str]:
        node.target = torch.abs
        return []  # no line: this sweep is the last, so its refusals are the report's

    gm = _three_negations()
    report = _run(lambda match: Plan(match.anchor, left_out), rewrite, gm)
    assert report.fired == {"neg": 3} and report.rewrites == []
    assert [str(r) for r in report.refusals] == ["part at somewhere: left out"] * 3
    assert not any(n.target is torch.neg for n in gm.graph.nodes)


@pytest.mark.parametrize("outcome", [None, [], (), [Refuse("old style")], "a plan",
                                     Refused(()), Plan(1, ("not a Refuse",)), Skip])
def test_a_check_that_returns_no_outcome_is_an_internal_error(outcome):
    with pytest.raises(RuleError, match=r"internal error: the check of rule neg at neg "):
        _run(lambda match: outcome, rewrite=None)
    assert not issubclass(RuleError, ArchcError)  # an archc bug: exit 1, not a user error


def test_a_whole_graph_rule_runs_once_per_sweep_at_the_output():
    gm = _three_negations()
    anchors = []

    def check(match):
        anchors.append(match.anchor.op)
        negations = [n for n in match.gm.graph.nodes if n.target is torch.neg]
        return Plan(negations) if negations else Skip()

    def rewrite(match, negations):
        for node in negations:
            node.target = torch.abs
        return f"rewrote {len(negations)}"

    report = apply_rules(gm, [Rule("all", whole_graph, check, rewrite, "none")]).report
    assert report.rewrites == ["rewrote 3"] and anchors == ["output", "output"]
    assert all(whole_graph(gm, n, None) is None for n in gm.graph.nodes if n.op != "output")


# ---- graph helpers ----

def _one_call(target, *args, **kwargs) -> GraphModule:
    graph = Graph()
    x, y = graph.placeholder("x"), graph.placeholder("y")
    args = [x if a == "x" else y if a == "y" else a for a in args]
    graph.output(graph.call_function(target, tuple(args), kwargs))
    return GraphModule(nn.Module(), graph)


def test_in_place_detection_covers_every_spelling():
    def node_of(gm):
        return next(n for n in gm.graph.nodes if n.op in ("call_function", "call_method"))

    def in_place(target, *args, **kwargs) -> bool:
        gm = _one_call(target, *args, **kwargs)
        return writes_in_place(gm, node_of(gm))

    # x += y as Python calls it on tensors (torch.fx traces `+=` on a proxy as a plain add)
    assert in_place(operator.iadd, "x", "y")
    assert in_place(torch.add, "x", "y", out="x")
    assert in_place(torch.nn.functional.relu, "x", True)
    assert in_place(torch.nn.functional.relu, "x", inplace=True)
    assert not in_place(torch.add, "x", "y") and not in_place(operator.add, "x", "y")

    class Methods(nn.Module):
        def __init__(self):
            super().__init__()
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x):
            y = x.clone()
            y.add_(1)
            return self.relu(y).mul(2)

    gm = torch.fx.symbolic_trace(Methods())
    flags = {n.name: writes_in_place(gm, n) for n in gm.graph.nodes}
    assert flags["add_"] and flags["relu"] and not flags["clone"] and not flags["mul"]
    # torch.export keeps `x += y` as the mutating aten overload
    program = torch.export.export(_AugmentedAdd(), (torch.randn(3),))
    exported = program.module()
    mutating = [n.target for n in exported.graph.nodes
                if n.op == "call_function" and writes_in_place(exported, n)]
    assert torch.ops.aten.add_.Tensor in mutating


class _AugmentedAdd(nn.Module):
    def forward(self, x):
        y = x * 2
        y += x
        return y


def test_unique_name_and_erase_unused():
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU()))
    assert unique_name(gm, "0") == "0_1" and unique_name(gm, "merged") == "merged"
    conv = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "0")
    relu = next(iter(conv.users))
    relu.replace_all_uses_with(conv.args[0])
    erased = erase_unused(gm, [relu])  # relu, then the conv only it read, then its module
    assert [n.name for n in erased] == ["_1", "_0"] and not hasattr(gm, "0")


class Aliased(nn.Module):
    """One conv registered under two names and called through both."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.again = self.conv
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.again(x)


def test_a_module_called_under_two_names_is_shared():
    from archc.ir.graph import called_once, module_uses

    gm = torch.fx.symbolic_trace(Aliased())  # both calls target "conv", the first name
    gm.again = gm.conv  # registered under a second name too
    assert module_uses(gm, "conv") == module_uses(gm, "again") == 2
    conv = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "conv")
    assert not called_once(gm, conv)
    result = run_pipeline(randomize(Aliased()).eval(), ["fold_bn"], PassContext(
        input_shape=(1, 3, 4, 4)))
    assert result.reports[0].refusals[0].reason.startswith("shared module")


def test_copies_share_or_convert_tensors():
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    shared, wide, meta = (copy_module(model), copy_module(model, torch.float64),
                          copy_module(model, device="meta"))
    assert shared[0].weight is model[0].weight
    assert wide[0].weight.dtype == torch.float64
    assert wide[1].num_batches_tracked.dtype == torch.int64
    assert meta[0].weight.device.type == "meta" and isinstance(meta[0].weight, nn.Parameter)
    assert model[0].weight.dtype == torch.float32  # the original is untouched


# ---- shapes ----

def test_meta_propagation_records_what_a_real_run_would():
    gm = archc.build("specs/shufflenet_v2_x0_5.yaml")
    x = torch.randn(2, 3, 64, 64)
    propagate_shapes(gm, (x,))
    ours = {n.name: node_shape(n) for n in gm.graph.nodes}
    ShapeProp(gm).propagate(x)
    assert ours == {n.name: node_shape(n) for n in gm.graph.nodes}
    assert next(gm.parameters()).device.type == "cpu"


def test_new_nodes_get_shapes_from_their_inputs():
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU()))
    propagate_shapes(gm, [(1, 3, 9, 9)])
    relu = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "1")
    with gm.graph.inserting_after(relu):
        pooled = gm.graph.call_function(torch.flatten, (relu, 1))
    refresh_shapes(gm)
    assert node_shape(pooled) == (1, 8 * 4 * 4)


REFRESH_A_NEW_LINEAR = """
import sys, torch
from torch import nn
from archc.ir import shapes
gm = torch.fx.symbolic_trace(nn.Sequential(nn.Flatten(), nn.Linear(12, 5)).eval())
shapes.propagate_shapes(gm, [torch.randn(2, 3, 2, 2)])
linear = next(n for n in gm.graph.nodes if n.target == "1")
gm.add_submodule("new", nn.Linear(5, 7).eval())
with gm.graph.inserting_after(linear):
    new = gm.graph.call_module("new", (linear,))
shapes.REAL_EVALUATION_ELEMENTS = int(sys.argv[1])
shapes.refresh_shapes(gm)
print(shapes.node_shape(new), shapes.node_dtype(new), "torch._dynamo" in sys.modules)
"""


@pytest.mark.parametrize("limit, dynamo", [(1 << 20, "False"), (0, "True")])
def test_new_nodes_with_small_inputs_get_shapes_from_a_real_evaluation(limit, dynamo):
    """A new Linear with a bias evaluated on meta imports torch._dynamo (1 s in a fresh process);
    evaluated for real on zeros it does not. Both give the same shape (a fresh process, since
    this one may have imported it already)."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", REFRESH_A_NEW_LINEAR, str(limit)],
                         capture_output=True, text=True, timeout=120)
    assert run.stdout.split() == ["(2,", "7)", "torch.float32", dynamo], run.stderr


# ---- pass options ----

def test_options_are_declared_typed_and_suggested():
    names = ["align_channels"]
    assert check_options({"align_channels.multiple": "16"}, names) == {
        "align_channels.multiple": 16}
    with pytest.raises(ArchcError, match=r"align_channels has no option 'mutliple' \(did you mean "
                                         r"'multiple'\?\); its options: multiple"):
        check_options({"align_channels.mutliple": "16"}, names)
    with pytest.raises(ArchcError, match="multiple: expected an integer, got 'sixteen'"):
        check_options({"align_channels.multiple": "sixteen"}, names)
    with pytest.raises(ArchcError, match="multiple: expected an integer, got 1.5"):
        check_options({"align_channels.multiple": 1.5}, names)
    with pytest.raises(ArchcError, match="fold_bn has no option 'eps'.*it has no options"):
        check_options({"fold_bn.eps": "1"}, ["fold_bn"])
    with pytest.raises(ArchcError, match="unknown pass 'align_chanels'"):
        check_options({"align_chanels.multiple": "8"}, names)
    with pytest.raises(ArchcError, match="pass 'align_channels' is not in the pipeline"):
        check_options({"align_channels.multiple": "8"}, ["fold_bn"])


def test_cli_rejects_a_misspelt_option_in_one_line(tmp_path, capsys):
    from archc.cli.main import main

    out = tmp_path / "m.onnx"
    code = main(["build", "specs/regnetx_600mf.yaml", "-o", str(out), "--pass-option",
                 "align_channels.mutliple=16"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "'mutliple'" in err[0] and "'multiple'" in err[0]
    assert not out.exists()


# ---- float64 verification ----

class DeepInvertedResiduals(nn.Module):
    """A MobileNetV2-like stack (conv-BN-ReLU6, depthwise, linear projection, residual)."""

    def __init__(self, width=16, depth=17):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU6())
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(width, 6 * width, 1, bias=False), nn.BatchNorm2d(6 * width),
                          nn.ReLU6(),
                          nn.Conv2d(6 * width, 6 * width, 3, 1, 1, groups=6 * width, bias=False),
                          nn.BatchNorm2d(6 * width), nn.ReLU6(),
                          nn.Conv2d(6 * width, width, 1, bias=False), nn.BatchNorm2d(width))
            for _ in range(depth))

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x)
        return x


def _spread_statistics(model: nn.Module, size: int) -> nn.Module:
    """Random weights, BN statistics calibrated on a batch, then every running variance scaled by
    10^U(-1, 1): variances over two orders of magnitude around the data's, as after training."""
    randomize(model, 0, calibration_input=random_input((2, 3, size, size), 1))
    generator = torch.Generator().manual_seed(0)
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            spread = 10 ** (torch.rand(bn.num_features, generator=generator) * 2 - 1)
            bn.running_var = bn.running_var * spread
    return model.eval()


def test_a_deep_net_with_spread_bn_statistics_folds_and_verifies():
    model = _spread_statistics(DeepInvertedResiduals(), 224)
    x = random_input((1, 3, 224, 224), 0)
    ctx = PassContext(example_inputs=(x,))
    result = run_pipeline(model, ["fold_bn"], ctx)
    assert result.reports[0].modified and result.exactness == "float64"
    assert result.reports[0].error < 1e-12 and result.max_error < 1e-12
    # in float32 the folded graph is more than 1e-5 from the unfolded one: rounding, not a bug
    with torch.no_grad():
        float32_gap = archc.ir.verify.relative_error(model(x), result.graph_module(x))
    assert float32_gap > 1e-5
    assert result.noise > 1e-6 and result.artifact_error <= result.tolerance
    assert "BatchNorm2d" not in {type(m).__name__ for m in result.graph_module.modules()}


def test_a_wrong_fold_is_caught_in_float64(monkeypatch):
    model = _spread_statistics(DeepInvertedResiduals(width=8, depth=2), 32)
    affine = weight_algebra.bn_affine
    monkeypatch.setattr(weight_algebra, "bn_affine",
                        lambda mean, var, weight, bias, eps: affine(mean, var, weight, bias, 1e-3))
    with pytest.raises(PassError, match=r"pass 'fold_bn': output changed: relative error "
                                        r"\S+ > rtol 1e-09"):
        run_pipeline(model, ["fold_bn"], PassContext(input_shape=(1, 3, 32, 32)))


class ExplicitCast(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x.float()))  # insists on float32


def test_a_model_that_cannot_run_in_float64_is_checked_in_its_own_dtype():
    result = run_pipeline(randomize(ExplicitCast()).eval(), PIPELINES["default"],
                          PassContext(input_shape=(1, 3, 8, 8)))
    assert result.exactness.startswith("float32 (it does not run in float64")
    assert result.max_error <= 1e-5 and result.artifact_error is None
    assert "pipeline: rel err" in result.format() and "in float32 (it does not run" in (
        result.format())
