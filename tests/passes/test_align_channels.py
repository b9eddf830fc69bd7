"""align_channels (passes/layout.py): outputs unchanged and every conv aligned where not refused,
on every spec in specs/, on hand-built odd widths (N = 8 and 16) and on random graphs; the weight
scatter on its own; one negative test per refusal reason; idempotence."""

from __future__ import annotations

import math
import re
from pathlib import Path

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from torch import nn

import archc
from archc.errors import ArchcError, PassError
from archc.frontend.blocks.layers import channel_shuffle
from archc.ir import channels
from archc.ir.channels import analyze_channels
from archc.ir.init import random_input, randomize
from archc.ir.verify import relative_error
from archc.passes import layout
from archc.rewrite.pipeline import PassContext, run_pipeline
from tests.helpers import TOLERANCE, Fn

SHAPE = (2, 3, 8, 8)
SPECS = sorted(Path(__file__).resolve().parents[2].glob("specs/*.yaml"))
FAST_SPECS = {"regnetx_200mf", "regnety_200mf", "regnety_400mf", "mobilenet_v1", "mobilenet_v2",
              "shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v1_g3", "resnet18",
              "repvgg_a0", "reducenet20_train", "reducenet20_reduced", "dbb_style",
              "mobileone_s0"}




def _align(model: nn.Module, multiple: int, shape=SHAPE, randomized: bool = True,
           dtype=torch.float32):
    """Run align_channels twice; check outputs (independently of the pipeline's check) and
    idempotence; return (the first run's result, its report)."""
    if randomized:
        model = randomize(model, 0)
    rtol = TOLERANCE[dtype]
    ctx = PassContext(input_shape=shape, explain=True, rtol=rtol,
                      options={"align_channels.multiple": multiple})
    result = run_pipeline(model.to(dtype), ["align_channels", "align_channels"], ctx)
    first, second = result.reports
    assert not second.modified and second.refusals == first.refusals
    x = random_input(shape, 1, dtype)
    with torch.no_grad():
        assert relative_error([model(x)], [result.graph_module(x)]) <= rtol
    return result, first


def _exempt(graph, group, multiple: int) -> bool:
    """Whether a group may stay misaligned: fixed, reordered by a channel shuffle, or padding one
    of its leaves would more than double it (the pass's rules, restated)."""
    shuffled = graph.shuffled()
    if group.index in shuffled:
        return True
    for leaf in graph.leaves(group):
        s = leaf.divisor
        if leaf.fixed or leaf.index in shuffled or (
                math.ceil(leaf.size / s / multiple) * multiple * s > 2 * leaf.size):
            return True
    return False


def _misaligned(gm, multiple: int, shape=SHAPE, dtype=torch.float32) -> list[str]:
    """Convs/Linears whose in/out channels or per-group width are not multiples of N although
    their groups are not exempt (read from the modules)."""
    graph = analyze_channels(gm, (random_input(shape, 0, dtype),))
    wrong = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        if isinstance(module, nn.Conv2d):
            c_in, c_out, groups = module.in_channels, module.out_channels, module.groups
        elif isinstance(module, nn.Linear):
            c_in, c_out, groups = module.in_features, module.out_features, 1
        else:
            continue
        in_group, out_group = graph.of(node.args[0]), graph.of(node)
        checks = [(c_in, in_group, "in"), (c_out, out_group, "out")]
        if 1 < groups < c_in:  # per-group width (a depthwise conv has 1)
            checks.append((c_in // groups, in_group, "in per group"))
        wrong += [f"{node.target} {what} {value}" for value, group, what in checks
                  if value % multiple and not _exempt(graph, group, multiple)]
    return wrong


def _reasons(report) -> list[str]:
    return [r.reason for r in report.refusals]


def _shapes(gm) -> dict[str, tuple[int, ...]]:
    return {name: tuple(m.weight.shape) for name, m in gm.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))}


# ---- hand-built odd widths ----

class OddNet(nn.Module):
    """Widths 20/36/12 with a grouped conv (group width 12), SE, a residual add, a concat and a
    channel split; 3 input channels and 10 outputs stay."""

    def __init__(self):
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(3, 20, 3, padding=1), nn.BatchNorm2d(20)
        self.a, self.a_bn = nn.Conv2d(20, 36, 1, bias=False), nn.BatchNorm2d(36)
        self.b = nn.Conv2d(36, 36, 3, padding=1, groups=3, bias=False)
        self.b_bn = nn.BatchNorm2d(36)
        self.reduce, self.expand = nn.Conv2d(36, 5, 1), nn.Conv2d(5, 36, 1)
        self.c, self.c_bn = nn.Conv2d(36, 20, 1, bias=False), nn.BatchNorm2d(20)
        self.left, self.right = nn.Conv2d(20, 12, 1), nn.Conv2d(20, 20, 3, padding=1)
        self.dw = nn.Conv2d(20, 20, 3, padding=1, groups=20)
        self.fc = nn.Linear(52, 10)

    def forward(self, x):
        x = F.relu(self.stem_bn(self.stem(x)))
        y = F.relu(self.b_bn(self.b(F.relu(self.a_bn(self.a(x))))))
        y = y * torch.sigmoid(self.expand(F.relu(self.reduce(y.mean((2, 3), keepdim=True)))))
        x = F.relu(x + self.c_bn(self.c(y)))  # residual: stem and c write one group
        z = torch.cat([self.left(x), self.right(x)], 1)  # 12 + 20
        p, q = z.split([12, 20], 1)  # the same segments as the concat
        z = torch.cat([p, self.dw(q) + z[:, 12:], x], 1)  # 12 + 20 + 20
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(z, 1), 1))


ODD_SHAPES = {
    8: {"stem": (24, 3, 3, 3), "a": (48, 24, 1, 1), "b": (48, 16, 3, 3),
        "reduce": (8, 48, 1, 1), "expand": (48, 8, 1, 1), "c": (24, 48, 1, 1),
        "left": (16, 24, 1, 1), "right": (24, 24, 3, 3), "dw": (24, 1, 3, 3), "fc": (10, 64)},
    16: {"stem": (32, 3, 3, 3), "a": (48, 32, 1, 1), "b": (48, 16, 3, 3),
         "reduce": (5, 48, 1, 1), "expand": (48, 5, 1, 1), "c": (32, 48, 1, 1),
         "left": (16, 32, 1, 1), "right": (32, 32, 3, 3), "dw": (32, 1, 3, 3), "fc": (10, 80)},
}


@pytest.mark.parametrize("multiple", [8, 16])
def test_odd_widths(multiple):
    result, report = _align(OddNet(), multiple)
    gm = result.graph_module
    assert _shapes(gm) == ODD_SHAPES[multiple]
    left, right = ODD_SHAPES[multiple]["left"][0], ODD_SHAPES[multiple]["right"][0]
    split = next(n for n in gm.graph.nodes if n.target == "split")
    assert split.args[1:] == ([left, right],)  # the concat's padded segments
    cut = next(n for n in gm.graph.nodes if n.name == "getitem_2")
    assert cut.args[1][1] == slice(left, left + right)
    assert _misaligned(gm, multiple) == []
    assert any(line.startswith("padded b, expand: 36 -> 48 channels (3 segments of 12 -> 16)")
               for line in report.rewrites)
    assert report.rewrites[-1].startswith("params ")
    assert report.after.params > report.before.params
    if multiple == 16:  # SE width 5 -> 16
        assert f"{layout.DOUBLES}: 5 -> 16" in _reasons(report)


# ---- one negative test per refusal reason ----

class Fixture(nn.Module):
    """conv (3 -> 12) -> `middle` -> conv (-> 10); `middle` is where the refusal happens."""

    def __init__(self, middle, width: int = 12, out: int = 10):
        super().__init__()
        self.a, self.b, self.middle = nn.Conv2d(3, width, 1), nn.Conv2d(width, out, 1), middle

    def forward(self, x):
        return self.b(self.middle(self.a(x)))


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(12, 12, 1)

    def forward(self, x):
        return self.conv(F.relu(self.conv(x)))


class ChannelsLastNorm(nn.Module):
    """ConvNeXt's LayerNorm over the channels, between permutes."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(12)

    def forward(self, x):
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConcatSplit(nn.Module):
    def __init__(self, sizes, groups=1):
        super().__init__()
        self.sizes = sizes
        self.p, self.q = nn.Conv2d(12, 12, 1), nn.Conv2d(12, 12, 1)
        self.r = nn.Conv2d(24, 12, 1, groups=groups)

    def forward(self, x):
        z = torch.cat([self.p(x), self.q(x)], 1)
        p, q = torch.split(z, self.sizes, 1)
        return self.r(torch.cat([q, p], 1))


REFUSED = {  # id -> (reason, middle module, the refused group's first producer)
    "shuffled": (layout.SHUFFLED, Fn(lambda x: channel_shuffle(x, 3)), "part of a"),
    "shuffle_sizes": (channels.SHUFFLE_SIZES,  # a shuffle spelt with the batch and channels
                      Fn(lambda x: x.view(2, 3, 4, 8, 8).transpose(1, 2).reshape(2, 12, 8, 8)),
                      "a"),
    "moves_channels": (channels.MOVES_CHANNELS,
                       Fn(lambda x: x.flatten(2).transpose(1, 2).reshape(2, -1, 8, 8)),
                       "a"),
    "size_read": (channels.SIZE_READ, Fn(lambda x: x / x.shape[1]), "a"),
    "unsupported": (channels.UNSUPPORTED, nn.LocalResponseNorm(3), "a"),
    "pixel_shuffled": (layout.SHUFFLED,
                       Fn(lambda x: F.pixel_unshuffle(F.pixel_shuffle(x, 2), 2)), "a"),
    "normalized": (layout.NORMALIZED, ChannelsLastNorm(), "a"),
    "normalized_by_hand": (layout.NORMALIZED, Fn(lambda x: (x - x.mean(1, keepdim=True)) / (
        x.var(1, keepdim=True, unbiased=False) + 1e-5).sqrt()), "a"),
    "normed": (layout.NORMED, nn.GroupNorm(3, 12), "a"),
    "shared_module": (channels.SHARED_MODULE, Shared(), "a"),
    "segment_conflict": (channels.SEGMENT_CONFLICT, ConcatSplit([6, 18]), "middle.p"),
    "grouped_parts": (channels.GROUPED_PARTS, ConcatSplit([12, 12], groups=3), "middle.p"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refusal(case):
    reason, middle, where = REFUSED[case]
    _, report = _align(Fixture(middle), 8)
    refused = {r.nodes[0]: r.reason for r in report.refusals}
    assert refused[where].startswith(reason)
    assert not any(line.startswith(f"padded {where}") for line in report.rewrites)
    explained = [line for line in report.details(explain=True) if "refused" in line]
    assert any(reason in line and where in line for line in explained)  # what --explain prints


class ShuffleByInput(nn.Module):
    """A channel shuffle whose group count is the model's second input."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 12, 1), nn.Conv2d(12, 10, 1)

    def forward(self, x, groups):
        return self.b(torch.channel_shuffle(self.a(x), groups))


def test_refusal_when_the_shuffle_groups_are_computed():
    ctx = PassContext(example_inputs=(random_input(SHAPE, 0), 3), explain=True)
    result = run_pipeline(randomize(ShuffleByInput(), 0), ["align_channels"], ctx)
    report = result.reports[0]
    assert {r.nodes[0]: r.reason for r in report.refusals}["a"] == channels.SHUFFLE_GROUPS
    assert not report.modified


def test_refusal_at_model_input_and_output():
    _, report = _align(Fixture(nn.ReLU(), width=16), 8)
    assert {r.nodes[0]: r.reason for r in report.refusals} == {
        "x": channels.MODEL_INPUT, "b": channels.MODEL_OUTPUT}
    assert not report.modified


def test_refusal_when_padding_more_than_doubles():
    _, report = _align(Fixture(nn.ReLU(), width=3), 8)
    assert f"{layout.DOUBLES}: 3 -> 8" in _reasons(report)
    _, report = _align(Fixture(nn.Conv2d(12, 12, 1, groups=4), width=12), 8)
    assert f"{layout.DOUBLES}: 12 -> 32 (4 segments of 3 -> 8)" in _reasons(report)


def test_options_and_inputs_are_checked():
    with pytest.raises(ArchcError, match="align_channels.multiple: must be positive, got 0"):
        run_pipeline(Fixture(nn.ReLU()).eval(), ["align_channels"],
                     PassContext(input_shape=SHAPE, options={"align_channels.multiple": 0}))
    with pytest.raises(PassError, match=re.escape(layout.NEEDS_INPUTS)):
        run_pipeline(Fixture(nn.ReLU()).eval(), ["align_channels"], PassContext(verify=False))


def test_not_in_the_default_pipeline():
    from archc.passes.pipelines import PIPELINES

    assert all("align_channels" not in names for names in PIPELINES.values())


# ---- every spec ----

@pytest.mark.parametrize("path", [
    pytest.param(p, id=p.stem, marks=() if p.stem in FAST_SPECS else pytest.mark.slow)
    for p in SPECS])
def test_specs(path):
    """fp32 within 1e-5 on the small specs. The deep ones are checked in float64 within 1e-12:
    their fp32 noise floor (fp32 against float64 of the unmodified model) is ~1.5e-5 at
    RegNetY-1.6GF, and any change of summation order reaches it."""
    dtype = torch.float32 if path.stem in FAST_SPECS else torch.float64
    shape = (1, 3, 64, 64)
    spec = archc.load_spec(path)
    spec = spec.model_copy(update={"input": spec.input.model_copy(update={"size": 64})})
    model = archc.build(spec, init="random").to(dtype)
    for multiple in (8, 16):
        result, _ = _align(model, multiple, shape, randomized=False, dtype=dtype)
        assert _misaligned(result.graph_module, multiple, shape, dtype) == []


# ---- random graphs ----

class RandomNet(nn.Module):
    """A chain of blocks drawn by hypothesis on a running width w: conv (grouped), residual,
    concat, split (keep k channels, convolve the rest), SE, depthwise; then pool, flatten,
    Linear."""

    def __init__(self, blocks, classes: int):
        super().__init__()
        self.layers = nn.ModuleList()
        self.plan: list[tuple[str, int]] = []
        width = 3
        for kind, size, groups in blocks:
            if kind == "split" and width < 2:
                kind = "conv"
            self.plan.append((kind, min(size, width - 1)))
            width = self._build(kind, width, size, groups)
        self.fc = nn.Linear(width, classes)

    def _conv(self, c_in, c_out, k=1, groups=1):
        self.layers.append(nn.Sequential(
            nn.Conv2d(c_in, c_out, k, padding=k // 2, groups=groups, bias=False),
            nn.BatchNorm2d(c_out)))

    def _build(self, kind, width, size, groups):
        if kind == "conv":
            self._conv(width, size, 3, math.gcd(math.gcd(width, size), groups))
            return size
        if kind == "residual":
            self._conv(width, size)
            self._conv(size, width, 3)
            return width
        if kind == "concat":
            self._conv(width, size)
            self._conv(width, groups)
            return size + groups
        if kind == "split":
            kept = min(size, width - 1)
            self._conv(width - kept, size)
            return kept + size
        if kind == "se":
            self.layers.append(nn.Conv2d(width, size, 1))
            self.layers.append(nn.Conv2d(size, width, 1))
            return width
        self._conv(width, width, 3, width)  # depthwise
        return width

    def forward(self, x):
        layers = iter(self.layers)
        for kind, kept in self.plan:
            if kind in ("conv", "dw"):
                x = F.relu(next(layers)(x))
            elif kind == "residual":
                first, second = next(layers), next(layers)
                x = F.relu(x + second(F.relu(first(x))))
            elif kind == "concat":
                first, second = next(layers), next(layers)
                x = torch.cat([first(x), torch.sigmoid(second(x))], 1)
            elif kind == "split":
                x = torch.cat([x[:, :kept], F.relu(next(layers)(x[:, kept:]))], 1)
            else:
                reduce, expand = next(layers), next(layers)
                x = x * torch.sigmoid(expand(F.relu(reduce(F.adaptive_avg_pool2d(x, 1)))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


BLOCKS = st.tuples(st.sampled_from(["conv", "residual", "concat", "split", "se", "dw"]),
                   st.integers(1, 40), st.sampled_from([1, 2, 3, 4]))


@settings(max_examples=30, deadline=None)
@given(blocks=st.lists(BLOCKS, min_size=1, max_size=5), classes=st.integers(1, 12),
       multiple=st.sampled_from([4, 8, 16]))
def test_random_graphs(blocks, classes, multiple):
    result, _ = _align(RandomNet(blocks, classes), multiple)
    assert _misaligned(result.graph_module, multiple) == []


class _Scaled(nn.Module):
    """conv 3 -> 20, a layer scale gamma [20, 1, 1] and a shift [1, 20, 1, 1], conv 20 -> 10."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 20, 3, padding=1), nn.Conv2d(20, 10, 1)
        self.gamma = nn.Parameter(torch.rand(20, 1, 1) + 0.5)
        self.register_buffer("shift", torch.rand(1, 20, 1, 1))

    def forward(self, x):
        return self.b(torch.relu(self.a(x) * self.gamma + self.shift))


def test_per_channel_constants_are_padded_with_their_channels():
    """A layer scale and a shift grow with their channels, 0 on the new ones (a padded channel
    stays 0), and the function is unchanged (checked by `_align`)."""
    model = _Scaled().double()
    result, _ = _align(model, 8, (1, 3, 8, 8), dtype=torch.float64)
    gm = result.graph_module
    for name, axis in (("gamma", 0), ("shift", 1)):
        padded, old = getattr(gm, name), getattr(model, name)
        assert padded.shape[axis] == 24
        torch.testing.assert_close(padded.detach().movedim(axis, 0)[:20].flatten(),
                                   old.detach().movedim(axis, 0).flatten())
        assert (padded.detach().movedim(axis, 0)[20:] == 0).all()
