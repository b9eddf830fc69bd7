"""Channel shuffles (passes/channel_shuffle.py): every spelling recognized, folding into dense
neighbours (numeric, structural, one negative test per refusal reason, a property test),
insertion between grouped convs, and the ONNX form of the shuffles that remain."""

from __future__ import annotations

import hypothesis.strategies as st
import onnx
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from torch import nn

from archc.backends.export import export_onnx
from archc.ir.init import random_input, randomize
from archc.ir.verify import relative_error
from archc.passes import channel_shuffle as cs
from archc.passes.pipelines import PIPELINES
from archc.rewrite.pipeline import PassContext, graph_stats, list_passes, run_pipeline
from tests.helpers import TOLERANCE, run_randomized

BATCH, SIDE = 2, 5
# Op kinds (archc.ir.ops.op_kind) that only a shuffle uses in these models.
SHUFFLE_OPS = {"ChannelShuffle", "channel_shuffle", "Tensor.transpose", "Tensor.permute",
               "Tensor.swapaxes", "transpose"}


# ---- the spellings: (x, groups, channels) -> x[:, π] ----

def _view_transpose(x, g, c):
    n, c, h, w = x.size()
    return x.view(n, g, c // g, h, w).transpose(1, 2).contiguous().view(n, c, h, w)


def _reshape_permute_flatten(x, g, c):
    return x.reshape(x.shape[0], g, -1, x.shape[2], x.shape[3]).permute(0, 2, 1, 3, 4).flatten(1, 2)


def _literal_torch_transpose(x, g, c):
    split = torch.reshape(x, (BATCH, g, c // g, SIDE, SIDE))
    return torch.reshape(torch.transpose(split, 1, 2).contiguous(), (BATCH, c, SIDE, SIDE))


def _unflatten_swapaxes(x, g, c):
    return x.unflatten(1, (g, -1)).swapaxes(1, 2).reshape(x.shape)


SPELLINGS = {
    "view_transpose": _view_transpose,
    "reshape_permute_flatten": _reshape_permute_flatten,
    "literal_torch_transpose": _literal_torch_transpose,
    "unflatten_swapaxes": _unflatten_swapaxes,
    "torch.channel_shuffle": lambda x, g, c: torch.channel_shuffle(x, g),
    "F.channel_shuffle": lambda x, g, c: F.channel_shuffle(x, g),
    "nn.ChannelShuffle": None,  # a module, built by Net
}


class Net(nn.Module):
    """[producer] -> pre ops -> shuffle -> post ops -> [consumer]; `spelling=None`: no shuffle."""

    def __init__(self, channels, groups, spelling, producer=None, pre=(), post=(),
                 consumer=None):
        super().__init__()
        self.channels, self.groups, self.spelling = channels, groups, spelling
        self.producer, self.consumer = producer, consumer
        self.pre, self.post = nn.ModuleList(pre), nn.ModuleList(post)
        self.shuffle = nn.ChannelShuffle(groups) if spelling == "nn.ChannelShuffle" else None

    def forward(self, x):
        if self.producer is not None:
            x = self.producer(x)
        for op in self.pre:
            x = op(x)
        if self.shuffle is not None:
            x = self.shuffle(x)
        elif self.spelling is not None:
            x = SPELLINGS[self.spelling](x, self.groups, self.channels)
        for op in self.post:
            x = op(x)
        return x if self.consumer is None else self.consumer(x)


def _ops(gm) -> dict[str, int]:
    return {op: n for op, n in graph_stats(gm).ops.items() if n}


def _shuffle_ops(gm) -> int:
    return sum(n for op, n in _ops(gm).items() if op in SHUFFLE_OPS)


def _reasons(result) -> list[str]:
    return [refusal.reason for report in result.reports for refusal in report.refusals]


def _begin_with(reasons: list[str], beginnings: list[str]) -> bool:
    return len(reasons) == len(beginnings) and all(
        reason.startswith(beginning) for reason, beginning in zip(reasons, beginnings))


SHAPE = (BATCH, 12, SIDE, SIDE)
FOLDS = {  # the modules around the shuffle, built fresh per test
    # a grouped producer, so the shuffle can only go into the dense 1x1 consumer
    "shuffle_into_dense_1x1": lambda: dict(producer=nn.Conv2d(12, 12, 3, padding=1, groups=3),
                                           consumer=nn.Conv2d(12, 6, 1)),
    # a grouped consumer, so the shuffle goes into the conv and its BN before
    "conv_bn_relu_into_producer": lambda: dict(producer=nn.Conv2d(12, 12, 3, padding=1),
                                               pre=[nn.BatchNorm2d(12), nn.ReLU()],
                                               consumer=nn.Conv2d(12, 12, 1, groups=3)),
    "shuffle_bn_relu_into_consumer": lambda: dict(post=[nn.BatchNorm2d(12), nn.ReLU()],
                                                  consumer=nn.Conv2d(12, 4, 3)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
@pytest.mark.parametrize("case", sorted(FOLDS))
def test_fold_is_exact_and_leaves_no_shuffle(case, spelling, dtype):
    model, result, error = run_randomized(Net(12, 3, spelling, **FOLDS[case]()),
                                          ["fold_channel_shuffle"], SHAPE, dtype)
    assert error <= TOLERANCE[dtype] and result.max_error <= TOLERANCE[dtype]
    unshuffled = torch.fx.symbolic_trace(Net(12, 3, None, **FOLDS[case]()))
    assert _ops(result.graph_module) == _ops(unshuffled)  # no shuffle, no size arithmetic left
    assert len(result.reports[0].rewrites) == 1 and not _reasons(result)
    assert all(p.dtype == dtype for p in result.graph_module.parameters())


def test_fold_report_names_the_layer_and_the_bn():
    model = Net(12, 3, "torch.channel_shuffle", **FOLDS["conv_bn_relu_into_producer"]())
    _, result, _ = run_randomized(model, ["fold_channel_shuffle"], SHAPE)
    assert result.reports[0].rewrites == [
        "folded shuffle channel_shuffle (groups=3) into the producer producer through pre.0, pre.1"]


def _linear_net(consumer: bool) -> nn.Module:
    """Linear -> ReLU -> 2-D shuffle (reshape spelling) -> [Linear]."""

    class Linear2d(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(5, 12), nn.Linear(12, 4) if consumer else None

        def forward(self, x):
            x = torch.relu(self.fc1(x))
            x = x.view(x.shape[0], 3, 4).transpose(1, 2).reshape(x.shape[0], 12)
            return self.fc2(x) if consumer else x

    return Linear2d()


@pytest.mark.parametrize("consumer", [True, False], ids=["into_consumer", "into_producer"])
def test_fold_into_linear_on_2d_tensors(consumer):
    _, result, error = run_randomized(_linear_net(consumer), ["fold_channel_shuffle"], (3, 5),
                            torch.float64)
    assert error <= 1e-12 and _shuffle_ops(result.graph_module) == 0
    assert ("consumer fc2" if consumer else "producer fc1") in result.reports[0].rewrites[0]


@pytest.mark.parametrize("groups", [1, 12])
def test_identity_shuffle_is_removed_between_grouped_convs(groups):
    model = Net(12, groups, "view_transpose", producer=nn.Conv2d(12, 12, 1, groups=3),
                consumer=nn.Conv2d(12, 12, 1, groups=3))
    _, result, error = run_randomized(model, ["fold_channel_shuffle"], SHAPE)
    assert error == 0 and _shuffle_ops(result.graph_module) == 0
    assert "is the identity" in result.reports[0].rewrites[0]


def test_two_shuffles_between_dense_convs_both_fold():
    model = Net(12, 3, "torch.channel_shuffle", producer=nn.Conv2d(12, 12, 1),
                post=[nn.ChannelShuffle(4)], consumer=nn.Conv2d(12, 12, 1))
    _, result, error = run_randomized(model, ["fold_channel_shuffle"], SHAPE)
    assert error <= 1e-5 and _shuffle_ops(result.graph_module) == 0
    assert len(result.reports[0].rewrites) == 2


def test_shufflenet_unit_with_a_dense_first_conv_in_the_default_pipeline():
    # ShuffleNetV1's first stage-2 unit: its first 1x1 conv is dense, so the shuffle folds into it
    model = Net(12, 3, "view_transpose", producer=nn.Conv2d(8, 12, 1, bias=False),
                pre=[nn.BatchNorm2d(12), nn.ReLU(inplace=True)],
                post=[nn.Conv2d(12, 12, 3, padding=1, groups=12, bias=False),
                      nn.BatchNorm2d(12)],
                consumer=nn.Conv2d(12, 24, 1, groups=3))
    _, result, error = run_randomized(model, PIPELINES["default"], (BATCH, 8, SIDE, SIDE))
    assert error <= 1e-5 and result.max_error <= 1e-5
    assert _shuffle_ops(result.graph_module) == 0
    assert "folded shuffle" in result.format(explain=True)


# ---- one negative test per refusal reason ----

class Grouped(nn.Module):
    """grouped conv -> [op] -> shuffle -> grouped conv (the ShuffleNet shape)."""

    def __init__(self, op=None):
        super().__init__()
        self.c1, self.op, self.c2 = (nn.Conv2d(12, 12, 1, groups=3), op,
                                     nn.Conv2d(12, 12, 1, groups=3))

    def forward(self, x):
        x = self.c1(x)
        return self.c2(torch.channel_shuffle(x if self.op is None else self.op(x), 3))


class ShuffleReadTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(12, 12, 1)

    def forward(self, x):
        y = torch.channel_shuffle(x, 3)
        return self.conv(y) + y


class ProducerReadTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.g = nn.Conv2d(12, 12, 1), nn.Conv2d(12, 12, 1, groups=3)

    def forward(self, x):
        z = self.conv(x)
        return self.g(torch.channel_shuffle(z, 3)) + z


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(12, 12, 1)

    def forward(self, x):
        return self.conv(torch.channel_shuffle(self.conv(x), 3))


class InPlaceAfter(nn.Module):
    def __init__(self):
        super().__init__()
        self.g, self.conv = nn.Conv2d(12, 12, 1, groups=3), nn.Conv2d(12, 12, 1)

    def forward(self, x):
        x = self.g(x)
        return self.conv(F.relu(torch.channel_shuffle(x, 3), inplace=True)) + x


GROUPED_C2 = f"{cs.GROUPED_CONSUMER}: c2 has groups=3, 3x the multiply-adds"
GROUPED_C1 = f"{cs.GROUPED_PRODUCER}: c1 has groups=3, 3x the multiply-adds"
AT_INPUT = f"{cs.NO_LAYER}: stopped at the graph input"
REFUSED = {  # model, input shape, the refusal reasons' beginnings (consumer side first)
    "grouped_both_sides": (Grouped, SHAPE, [GROUPED_C2, GROUPED_C1]),
    "non_agnostic_op": (lambda: Grouped(nn.PReLU(12)), SHAPE,
                        [GROUPED_C2, f"{cs.NO_LAYER}: stopped at op (PReLU)"]),
    "shuffle_output_read_twice": (ShuffleReadTwice, SHAPE, [cs.CONSUMER_USERS, AT_INPUT]),
    "producer_output_read_twice": (ProducerReadTwice, SHAPE,
                                   [cs.GROUPED_CONSUMER, cs.PRODUCER_USERS]),
    "shared_module": (SharedConv, SHAPE, [f"{cs.SHARED_MODULE}: conv"] * 2),
    "in_place_after": (InPlaceAfter, SHAPE, [cs.IN_PLACE, cs.PRODUCER_USERS]),
    "linear_on_3d": (lambda: Net(12, 3, "torch.channel_shuffle", consumer=nn.Linear(SIDE, 4),
                                 producer=nn.Conv1d(12, 12, 1, groups=3)), (BATCH, 12, SIDE),
                     [f"{cs.CHANNEL_DIM}: consumer on a 3-D tensor", cs.GROUPED_PRODUCER]),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refusal_is_reported_and_the_shuffle_stays(case):
    build, shape, expected = REFUSED[case]
    _, result, error = run_randomized(build(), ["fold_channel_shuffle"], shape)
    assert error <= 1e-5 and not result.modified
    assert _begin_with(_reasons(result), expected)
    assert all(reason in result.format(explain=True) for reason in _reasons(result))
    assert _shuffle_ops(result.graph_module) == 1


class GroupsInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(12, 12, 1)

    def forward(self, x, groups):
        return self.conv(torch.channel_shuffle(x, groups))


def test_unknown_group_count_is_refused():
    model = randomize(GroupsInput())
    x = random_input(SHAPE, 1)
    result = run_pipeline(model, ["fold_channel_shuffle"], PassContext(example_inputs=(x, 3)))
    assert _reasons(result) == [cs.UNKNOWN_GROUPS]


def test_unknown_shapes_are_refused():
    model = randomize(Net(12, 3, "F.channel_shuffle", consumer=nn.Conv2d(12, 4, 1)))
    result = run_pipeline(model, ["fold_channel_shuffle"], PassContext(verify=False))
    assert _reasons(result) == [cs.SHAPES_UNKNOWN]


# ---- recognition and the canonical form ----

@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
def test_every_spelling_canonicalizes_to_one_node(spelling):
    build = dict(producer=nn.Conv2d(12, 12, 1, groups=3), consumer=nn.Conv2d(12, 12, 1, groups=3))
    _, result, error = run_randomized(Net(12, 3, spelling, **build),
                                      ["canonicalize_channel_shuffle"], SHAPE)
    canonical = torch.fx.symbolic_trace(Net(12, 3, "torch.channel_shuffle", **build))
    assert error == 0 and _ops(result.graph_module) == _ops(canonical)
    assert result.reports[0].modified == (spelling not in ("torch.channel_shuffle",
                                                           "F.channel_shuffle"))
    again = run_pipeline(result.graph_module, ["canonicalize_channel_shuffle"],
                         PassContext(input_shape=SHAPE))
    assert not again.modified and again.graph_module.code == result.graph_module.code


class Lookalike(nn.Module):
    """Reshape -> swap -> reshape chains that are not channel shuffles."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def forward(self, x):
        n, c, h, w = x.size()
        if self.kind == "swaps_spatial_dims":
            return x.view(n, 3, c // 3, h, w).transpose(3, 4).reshape(n, c, h, w)
        if self.kind == "other_output_shape":
            return x.view(n, 3, c // 3, h, w).transpose(1, 2).reshape(n, c, h * w)
        if self.kind == "groups_from_height":  # a shuffle with 3 groups only where h = 3
            return x.unflatten(1, (h, -1)).transpose(1, 2).reshape(n, c, h, w)
        # a shuffle on a square input only: h and w swapped in both reshapes
        return x.view(n, 3, c // 3, w, h).transpose(1, 2).contiguous().view(n, c, w, h)


@pytest.mark.parametrize("kind", ["swaps_spatial_dims", "other_output_shape", "groups_from_height",
                                  "square_only"])
def test_lookalikes_are_not_shuffles(kind):
    _, result, _ = run_randomized(Lookalike(kind), ["canonicalize_channel_shuffle",
                                          "fold_channel_shuffle"], (BATCH, 12, 3, 3))
    assert not result.modified and not _reasons(result)


def test_rank_2_shuffle_keeps_its_reshape_form():
    _, result, _ = run_randomized(_linear_net(True), ["canonicalize_channel_shuffle"], (3, 5))
    assert _reasons(result) == [cs.RANK_2] and not result.modified


def test_shuffle_written_in_place_keeps_its_spelling():
    model = Net(12, 12, "view_transpose", post=[nn.ReLU(inplace=True)])
    _, result, error = run_randomized(
        model, ["canonicalize_channel_shuffle", "fold_channel_shuffle"], SHAPE)
    assert error == 0 and not result.modified
    expected = [cs.IN_PLACE, f"{cs.IN_PLACE}: post.0 (ReLU)", AT_INPUT]
    assert _reasons(result) == expected  # canonicalize, then fold's consumer and producer sides


# ---- property: fold over random shuffle graphs ----

@st.composite
def shuffle_nets(draw):
    """[conv] -> BN/ReLU -> shuffle -> BN/ReLU -> [conv], random channels, groups and spelling;
    with whether the shuffle must fold (derived here, not by the pass)."""
    channels = draw(st.sampled_from([4, 6, 8, 12]))
    divisors = [d for d in range(1, channels + 1) if channels % d == 0]
    groups = draw(st.sampled_from(divisors))

    def conv(out):
        g = draw(st.sampled_from(divisors))
        return nn.Conv2d(channels, out, draw(st.sampled_from([1, 3])), padding="same", groups=g,
                         bias=draw(st.booleans()))

    def ops(in_place_first: bool):
        kinds = draw(st.lists(st.sampled_from(["bn", "relu", "relu_"]), max_size=2))
        if not in_place_first and kinds[:1] == ["relu_"]:
            kinds[0] = "relu"
        return [nn.BatchNorm2d(channels, affine=draw(st.booleans())) if k == "bn"
                else nn.ReLU(inplace=k == "relu_") for k in kinds]

    producer = conv(channels) if draw(st.booleans()) else None
    pre = ops(in_place_first=producer is not None)  # never write the caller's input
    post = ops(in_place_first=True)
    consumer = conv(channels * draw(st.sampled_from([1, 2]))) if draw(st.booleans()) else None
    spelling = draw(st.sampled_from(sorted(SPELLINGS)))
    # the op after the shuffle writes in place: only a fold into the producer keeps that safe
    written = bool(post) and getattr(post[0], "inplace", False)
    foldable = ((groups in (1, channels) and not written)  # the identity
                or (consumer is not None and consumer.groups == 1 and not written)
                or (producer is not None and producer.groups == 1))
    return Net(channels, groups, spelling, producer, pre, post, consumer), channels, foldable


def _snapshot(gm) -> tuple:
    return gm.code, sorted(n for n, _ in gm.named_modules()), sorted(gm.state_dict())


@settings(max_examples=40, deadline=None)
@given(shuffle_nets(), st.integers(0, 2**16))
def test_fold_property(net, seed):
    model, channels, foldable = net
    shape = (BATCH, channels, SIDE, SIDE)
    gm = torch.fx.symbolic_trace(randomize(model, seed))
    before = _snapshot(gm)
    first = run_pipeline(gm, ["fold_channel_shuffle"], PassContext(input_shape=shape, seed=seed))
    assert first.max_error <= 1e-5
    assert first.reports[0].modified == (_snapshot(first.graph_module) != before)
    assert _shuffle_ops(gm) == 1
    assert _shuffle_ops(first.graph_module) == (0 if foldable else 1)
    x = random_input(shape, seed + 1)
    with torch.no_grad():
        assert relative_error([model(x)], [first.graph_module(x)]) <= 1e-5
    second = run_pipeline(first.graph_module, ["fold_channel_shuffle"],
                          PassContext(input_shape=shape, seed=seed))
    assert not second.modified and second.graph_module.code == first.graph_module.code


# ---- insert_channel_shuffle ----

def _unit(channels, g, mid_groups=None):
    """ShuffleNetV1 unit without its shuffle: 1x1 gconv -> BN -> ReLU -> 3x3 depthwise -> BN ->
    1x1 gconv -> BN, plus the input."""

    class Unit(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(channels, channels, 1, groups=g, bias=False)
            self.bn1, self.bn2, self.bn3 = (nn.BatchNorm2d(channels) for _ in range(3))
            self.dw = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
            self.c2 = nn.Conv2d(channels, channels, 1, groups=mid_groups or g, bias=False)

        def forward(self, x):
            y = F.relu(self.bn1(self.c1(x)))
            return F.relu(x + self.bn3(self.c2(self.bn2(self.dw(y)))))

    return Unit()


Seq = nn.Sequential
INSERT = {  # model, shuffles it must gain, refusal reasons
    "two_grouped_1x1": (lambda: Seq(nn.Conv2d(12, 12, 1, groups=3), nn.BatchNorm2d(12), nn.ReLU(),
                                    nn.Conv2d(12, 12, 1, groups=3)), 1, []),
    "g1_divides_g2": (lambda: Seq(nn.Conv2d(12, 12, 1, groups=2), nn.Conv2d(12, 12, 1, groups=4)),
                      1, []),
    "shufflenet_v1_units": (lambda: Seq(_unit(12, 3), _unit(12, 3)), 2, []),
    "dense_neighbour": (lambda: Seq(nn.Conv2d(12, 12, 1, groups=3), nn.ReLU(),
                                    nn.Conv2d(12, 12, 1)), 0, [cs.DENSE_NEXT]),
    "depthwise_then_pointwise": (lambda: Seq(nn.Conv2d(12, 12, 3, groups=12), nn.ReLU(),
                                             nn.Conv2d(12, 24, 1)), 0, []),
    "already_shuffled": (Grouped, 0, [cs.SHUFFLED]),
    "already_shuffled_reshape_spelling": (
        lambda: Net(12, 3, "view_transpose", producer=nn.Conv2d(12, 12, 1, groups=3),
                    consumer=nn.Conv2d(12, 12, 1, groups=3)), 0, [cs.SHUFFLED]),
    "groups_2_then_3_mix": (lambda: Seq(nn.Conv2d(12, 12, 1, groups=2),
                                        nn.Conv2d(12, 12, 1, groups=3)), 0, [cs.MIXED]),
    "groups_4_then_2_mix": (lambda: _unit(12, 4, mid_groups=2), 0, [cs.MIXED]),
}


@pytest.mark.parametrize("case", sorted(INSERT))
def test_insert_counts_and_reasons(case):
    build, count, reasons = INSERT[case]
    _, result, _ = run_randomized(build(), ["insert_channel_shuffle"], SHAPE)
    report = result.reports[0]
    added = _ops(result.graph_module).get("channel_shuffle", 0) - _ops(
        torch.fx.symbolic_trace(build())).get("channel_shuffle", 0)
    assert added == count == len(report.rewrites)
    assert _begin_with(_reasons(result), reasons)
    assert report.modified == bool(count)
    assert report.check == ("not verified: changes the function" if count else "unchanged")
    assert result.max_error is None or not count
    second = run_pipeline(result.graph_module, ["insert_channel_shuffle"],
                          PassContext(input_shape=SHAPE))
    assert not second.modified and second.graph_module.code == result.graph_module.code


def test_insert_reports_where_and_why_and_declares_a_function_change():
    assert ("insert_channel_shuffle", False) in {(p.name, p.preserves_function)
                                                 for p in list_passes()}
    _, result, _ = run_randomized(INSERT["two_grouped_1x1"][0](), ["insert_channel_shuffle"], SHAPE)
    assert result.reports[0].rewrites == [
        "inserted channel_shuffle(groups=3) before 3: each of its 3 groups saw one of the 3 "
        "groups of 0"]
    assert "not verified: changes the function" in result.format()


def test_inserted_shuffle_makes_every_output_group_see_every_input_group():
    model = randomize(INSERT["two_grouped_1x1"][0]())
    result = run_pipeline(model, ["insert_channel_shuffle"], PassContext(input_shape=SHAPE))
    x = random_input(SHAPE, 1)
    bumped = x.clone()
    bumped[:, :4] += 1  # the input channels of the first conv's group 0
    with torch.no_grad():
        for gm, groups_reached in ((model, 1), (result.graph_module, 3)):
            changed = (gm(bumped) - gm(x)).abs().amax(dim=(0, 2, 3)).reshape(3, 4)
            assert int((changed.amax(dim=1) > 1e-6).sum()) == groups_reached


def test_insert_refuses_an_unbatched_conv():
    model = Seq(nn.Conv2d(6, 6, 1, groups=3), nn.Conv2d(6, 6, 1, groups=3))
    _, result, _ = run_randomized(model, ["insert_channel_shuffle"], (6, SIDE, SIDE))
    assert _reasons(result) == [f"{cs.CHANNEL_DIM}: 1 on a 3-D tensor"]


# ---- the registry, the default pipeline, ONNX ----

def test_passes_are_registered_and_fold_runs_in_default():
    passes = {p.name: p.preserves_function for p in list_passes()}
    assert passes["fold_channel_shuffle"] and passes["canonicalize_channel_shuffle"]
    default = PIPELINES["default"]
    assert default.index("fold_bn") < default.index("fold_channel_shuffle")
    assert default.index("fold_channel_shuffle") < default.index("merge_sequential_convs")


@pytest.mark.parametrize("canonical", [True, False], ids=["channel_shuffle", "view_transpose"])
def test_remaining_shuffle_exports_to_reshape_transpose_reshape(canonical, tmp_path):
    model = Net(12, 3, "view_transpose", producer=nn.Conv2d(12, 12, 1, groups=3),
                pre=[nn.BatchNorm2d(12), nn.ReLU()], consumer=nn.Conv2d(12, 12, 1, groups=3))
    passes = [*PIPELINES["default"], *(["canonicalize_channel_shuffle"] if canonical else [])]
    _, result, _ = run_randomized(model, passes, SHAPE)
    assert _shuffle_ops(result.graph_module) == 1
    x = random_input(SHAPE, 3)
    report = export_onnx(result.graph_module, tmp_path / "m.onnx", x)
    assert report.relative_error <= 1e-5
    nodes = onnx.load(tmp_path / "m.onnx").graph.node
    types = [node.op_type for node in nodes]
    assert "DepthToSpace" not in types
    start = types.index("Transpose")
    assert types[start - 1:start + 2] == ["Reshape", "Transpose", "Reshape"]
    perm = next(a.ints for a in nodes[start].attribute if a.name == "perm")
    assert list(perm) == [0, 2, 1, 3, 4]
