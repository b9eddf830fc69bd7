"""Pass infrastructure (archc/rewrite/pipeline.py, archc/rewrite/rules.py): registry, pipeline
names, verification, reports, dumps, the rule applier and its helpers, and the default pipeline on a
real network."""

from __future__ import annotations

import operator

import pytest
import torch
from torch import nn

from archc.errors import ArchcError, PassError
from archc.ir.graph import bypass, called_once, has_other_users, module_uses, unique_user
from archc.ir.init import randomize
from archc.ir.shapes import node_dtype, node_shape, propagate_shapes
from archc.ir.verify import below_normal, float64_reference, relative_error
from archc.passes.pipelines import PIPELINES
from archc.rewrite import pipeline
from archc.rewrite.pipeline import (
    PassContext,
    PassReport,
    PassResult,
    get_pass,
    list_passes,
    register_pass,
    resolve_pipeline,
    run_pipeline,
)
from archc.rewrite.rules import Op, Plan, Refuse, Rule, apply_rules

SHAPE = (2, 3, 6, 6)


def _model() -> nn.Module:
    return randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                   nn.Dropout()), 0)


@pytest.fixture
def registry(monkeypatch):
    """A scratch copy of the pass registry, so test passes do not leak into other tests."""
    monkeypatch.setattr(pipeline, "_PASSES", dict(pipeline._PASSES))


def test_registry_lists_builtin_passes():
    passes = {p.name: (p.summary, p.preserves_function) for p in list_passes()}
    for name in ("remove_identity", "fold_bn", "eliminate_dead_code", "fold_constants"):
        assert passes[name][1] is True and passes[name][0]
    assert all(name in passes for names in PIPELINES.values() for name in names)


def test_resolve_pipeline():
    default = resolve_pipeline("default")
    assert default == PIPELINES["default"] and default is not PIPELINES["default"]
    assert default[:3] == ["remove_identity", "canonicalize", "fold_bn"]
    assert default[-1] == "eliminate_dead_code"
    assert resolve_pipeline("none") == []
    assert resolve_pipeline(" fold_bn, eliminate_dead_code ") == ["fold_bn", "eliminate_dead_code"]
    assert resolve_pipeline("default,align_channels") == [*PIPELINES["default"], "align_channels"]
    assert resolve_pipeline("none,fold_bn") == ["fold_bn"]
    with pytest.raises(ArchcError, match=r"unknown pass 'fold_bm' \(did you mean 'fold_bn'\?\); "
                                         r"valid: .*remove_identity.*; "
                                         r"pipelines: default, canonical, none"):
        resolve_pipeline("remove_identity,fold_bm")
    with pytest.raises(ArchcError, match="unknown pass 'nope'"):
        get_pass("nope")


def test_training_mode_is_refused():
    model = _model().train()
    with pytest.raises(PassError, match=r"pass 'remove_identity': model is in training mode; "
                                        r"call \.eval\(\) — BN would use batch statistics"):
        run_pipeline(model, PIPELINES["default"], PassContext(input_shape=SHAPE))


FOLD_ONLY = ["remove_identity", "fold_bn", "eliminate_dead_code"]


def test_run_pipeline_report_and_explain():
    ctx = PassContext(input_shape=SHAPE, explain=True,
                      measure=lambda gm: len(gm.graph.nodes))
    result = run_pipeline(_model(), FOLD_ONLY, ctx)
    text = str(result)
    assert [r.name for r in result.reports] == FOLD_ONLY
    assert [r.modified for r in result.reports] == [True, True, False]
    assert [r.check for r in result.reports] == ["verified in float64"] * 2 + ["unchanged"]
    fold = result.reports[1]
    assert (fold.before.nodes, fold.after.nodes) == (5, 4)
    assert (fold.before.flops, fold.after.flops) == (5, 4)
    assert fold.before.params - fold.after.params == 8  # the BN's 2C affine parameters
    assert "folded 1 into 0" in text and "BatchNorm2d 1->0" in text and "rel err" in text
    assert "rewrote:" not in result.format(explain=False)
    assert result.max_error <= 1e-5 and result.modified
    nothing = run_pipeline(_model(), PIPELINES["none"], ctx)
    assert nothing.reports == [] and nothing.max_error == 0 and not nothing.modified


def test_pipeline_needs_inputs_to_verify():
    with pytest.raises(PassError, match="verification needs example_inputs or input_shape"):
        run_pipeline(_model(), ["fold_bn"], PassContext())
    assert run_pipeline(_model(), ["fold_bn"], PassContext(verify=False)).max_error is None


def test_example_inputs_and_float64():
    model = _model().double()
    x = torch.randn(SHAPE, dtype=torch.float64)
    result = run_pipeline(model, PIPELINES["default"], PassContext(example_inputs=(x,), rtol=1e-12))
    assert result.max_error <= 1e-12


def test_the_float64_reference_run_records_the_shapes(monkeypatch):
    """One float64 run serves as the reference and as the shape propagation of the working copy:
    its recorded shapes are those a separate propagation finds, and the pipeline runs none."""
    gm = torch.fx.symbolic_trace(_model())
    x = torch.randn(SHAPE)
    copy, _ = float64_reference(gm, (x,))
    recorded = {n.name: (node_shape(n), node_dtype(n)) for n in copy.graph.nodes}
    propagate_shapes(copy, (x.double(),))
    assert recorded == {n.name: (node_shape(n), node_dtype(n)) for n in copy.graph.nodes}
    assert recorded["output"] == ((2, 4, 4, 4), torch.float64)
    propagations = []
    monkeypatch.setattr(pipeline, "propagate_shapes", lambda *a: propagations.append(a))
    result = run_pipeline(gm, ["fold_bn"], PassContext(example_inputs=(x,)))
    assert result.exactness == "float64" and propagations == []


def test_dump_after(tmp_path):
    ctx = PassContext(input_shape=SHAPE, dump_after={"fold_bn"}, dump_dir=tmp_path / "dump")
    result = run_pipeline(_model(), FOLD_ONLY, ctx)
    assert [p.name for p in (tmp_path / "dump").iterdir()] == ["02_fold_bn.py"]
    ctx = PassContext(input_shape=SHAPE, dump_after="all", dump_dir=tmp_path / "all")
    run_pipeline(_model(), FOLD_ONLY, ctx)
    files = sorted(p.name for p in (tmp_path / "all").iterdir())
    assert files == ["01_remove_identity.py", "02_fold_bn.py", "03_eliminate_dead_code.py"]
    code = [line.strip() for line in result.graph_module.code.splitlines() if line.strip()]
    dumped = [line.strip() for line in (tmp_path / "all" / files[-1]).read_text().splitlines()]
    assert dumped[-len(code):] == code  # the file ends with the final graph's forward
    with pytest.raises(ArchcError, match="unknown pass in dump_after 'fold'"):
        run_pipeline(_model(), ["fold_bn"], PassContext(input_shape=SHAPE, dump_after={"fold"},
                                                        dump_dir=tmp_path))
    with pytest.raises(ArchcError, match="dump_after needs a dump_dir"):
        run_pipeline(_model(), ["fold_bn"], PassContext(input_shape=SHAPE, dump_after="all"))


def test_a_dump_is_runnable_python(tmp_path):
    """A dumped file runs as a script (its header imports every name the code uses) and defines
    a module class whose forward, bound to the graph module after the pass, is that graph."""
    import runpy
    import subprocess
    import sys

    traced = torch.fx.symbolic_trace(_model().eval())
    next(iter(traced.graph.nodes)).type = "Tensor"  # as archc's lowering annotates `x: Tensor`
    traced.recompile()
    assert "_Tensor_" in traced.code  # a name only torch.fx's globals define
    ctx = PassContext(input_shape=SHAPE, dump_after={"fold_bn"}, dump_dir=tmp_path)
    result = run_pipeline(traced, FOLD_ONLY, ctx)
    dump = tmp_path / "02_fold_bn.py"
    ran = subprocess.run([sys.executable, str(dump)], capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    namespace = runpy.run_path(str(dump))
    graph_class = namespace["GraphAfterFoldBn"]
    assert issubclass(graph_class, nn.Module)
    x = torch.randn(SHAPE)
    gm = result.graph_module
    with torch.no_grad():
        assert torch.equal(graph_class.forward(gm, x), gm(x))


def _insert_before_output(gm: torch.fx.GraphModule, fn) -> None:
    output = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(output):
        new = gm.graph.call_function(fn, (output.args[0],))
    output.args = (new,)


def test_function_changing_pass_is_not_verified(registry):
    @register_pass("test_negate", "negate the output", preserves_function=False)
    def negate(gm, ctx):
        _insert_before_output(gm, operator.neg)
        return PassResult(gm, True, PassReport(rewrites=["negated the output"]))

    result = run_pipeline(_model(), ["test_negate", "fold_bn"], PassContext(input_shape=SHAPE))
    assert [r.check for r in result.reports] == ["not verified: changes the function",
                                                 "verified in float64"]
    assert result.reports[1].error <= 1e-12  # fold_bn checked against the negated graph
    assert result.max_error is None
    assert ("test_negate", "negate the output", False) in {
        (p.name, p.summary, p.preserves_function) for p in list_passes()}


def test_wrong_pass_fails_loudly(registry):
    @register_pass("test_wrong", "claims to preserve the function, negates it", True)
    def wrong(gm, ctx):
        _insert_before_output(gm, operator.neg)
        return PassResult(gm, True)

    @register_pass("test_lies", "changes the graph, reports modified=False", True)
    def lies(gm, ctx):
        _insert_before_output(gm, operator.pos)
        return PassResult(gm, False)

    @register_pass("test_breaks", "uses a node before defining it", True)
    def breaks(gm, ctx):
        first, last = list(gm.graph.nodes)[0], list(gm.graph.nodes)[-2]
        with gm.graph.inserting_after(first):
            early = gm.graph.call_function(operator.neg, (last,))
        list(gm.graph.nodes)[-1].args = (early,)
        return PassResult(gm, True)

    ctx = PassContext(input_shape=SHAPE)
    with pytest.raises(PassError, match="pass 'test_breaks': left an invalid graph"):
        run_pipeline(_model(), ["test_breaks"], ctx)
    with pytest.raises(PassError, match=r"pass 'test_wrong' \(after fold_bn\): output changed: "
                                        r"relative error 2 > rtol 1e-09"):
        run_pipeline(_model(), ["fold_bn", "test_wrong"], ctx)
    with pytest.raises(PassError, match="pass 'test_lies': reported modified=False but changed"):
        run_pipeline(_model(), ["test_lies"], ctx)
    with pytest.raises(ValueError, match="registered twice"):
        register_pass("test_wrong", "again", True)(lies)


def test_relative_error():
    a = torch.tensor([1.0, -2.0, float("nan")])
    assert relative_error([a], [a + torch.tensor([0.0, 0.2, 0.0])]) == pytest.approx(0.1)
    assert relative_error([a], [torch.tensor([1.0, -2.0, 0.0])]) == float("inf")
    assert relative_error([a], [a[:2]]) == float("inf")
    assert relative_error([torch.zeros(2)], [torch.full((2,), 1e-3)]) == pytest.approx(1e-3)
    assert relative_error([a], [torch.tensor([1.0, float("inf"), float("nan")])]) == float("inf")


def test_below_normal_names_outputs_a_format_flushes():
    tiny = [torch.tensor([3e-9, -1e-10])]
    assert below_normal(tiny, torch.float16) == (
        "its outputs, at most 3.0e-09 in magnitude, are below float16's smallest normal number "
        "6.1e-05")
    assert below_normal(tiny, torch.bfloat16) == ""  # bfloat16 has float32's exponent range
    assert below_normal([torch.tensor([1e-4, float("nan")])], torch.float16) == ""


# ---- rules ----

class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        y = torch.neg(torch.neg(torch.neg(x)))
        return self.conv(y) + self.conv(torch.relu(y)) + y


def test_rule_helpers():
    gm = torch.fx.symbolic_trace(Branchy())
    nodes = {n.name: n for n in gm.graph.nodes}
    assert unique_user(nodes["neg"]) is nodes["neg_1"] and unique_user(nodes["neg_2"]) is None
    assert has_other_users(nodes["neg_2"], nodes["conv"])
    assert not has_other_users(nodes["neg_1"], nodes["neg_2"])
    assert module_uses(gm, "conv") == 2 and not called_once(gm, nodes["conv"])
    relu = Op(functions=(torch.relu,))
    assert relu.matches(gm, nodes["relu"]) and not relu.matches(gm, nodes["neg"])
    assert Op(modules=(nn.Conv2d,)).matches(gm, nodes["conv"])


class Negations(nn.Module):
    def forward(self, x):
        y = torch.neg(x)
        shared = torch.neg(y) + y  # -(-x), but -x is read again: refused
        return shared + torch.neg(torch.neg(torch.neg(x)))  # one pair cancels


def _cancel(match, plan) -> str:
    inner, outer = match.nodes
    bypass(match.gm, outer, inner.args[0])
    match.gm.graph.erase_node(inner)
    return f"cancelled {inner.name}, {outer.name}"


# -(-x) -> x
CANCEL = Rule("double_negation", (Op(functions=(torch.neg,)), Op(functions=(torch.neg,))),
              lambda m: Refuse("shared") if has_other_users(*m.nodes) else Plan(), _cancel,
              "-(-x) -> x")


def test_apply_rules_reaches_a_fixpoint_and_reports_final_refusals():
    gm = torch.fx.symbolic_trace(Negations())
    result = apply_rules(gm, [CANCEL])
    assert result.modified and result.report.rewrites == ["cancelled neg_2, neg_3"]
    assert [str(r) for r in result.report.refusals] == ["double_negation at neg -> neg_1: shared"]
    gm.recompile()
    x = torch.randn(3)
    torch.testing.assert_close(gm(x), Negations()(x))
    again = apply_rules(gm, [CANCEL])
    assert not again.modified and len(again.report.refusals) == 1


def test_default_pipeline_on_regnet():
    from archc.frontend.lower import build

    gm = build("specs/regnety_200mf.yaml", init="random")
    ctx = PassContext(input_shape=(1, 3, 32, 32))
    result = run_pipeline(gm, PIPELINES["default"], ctx)
    ops = result.reports[-1].after.ops
    assert ops["BatchNorm2d"] == 0 and result.max_error <= 1e-5
    assert any(m.__class__.__name__ == "BatchNorm2d" for m in gm.modules())  # input untouched
    fold_refusals = [r.refusals for r in result.reports if r.name == "fold_bn"]
    assert fold_refusals == [[], []]
    second = run_pipeline(result.graph_module, PIPELINES["default"], ctx)
    assert not second.modified and second.graph_module.code == result.graph_module.code
