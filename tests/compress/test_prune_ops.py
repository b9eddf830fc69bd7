"""Pruning through the ops beyond conv/BN/Linear (tests/wild/prunable_ops.py): pixel shuffle and
unshuffle, GroupNorm by whole groups, PReLU slopes, concatenations of unequal inputs, bare
parameters (layer scales, a learned bias, a position embedding) through symbolic tracing and a
torch.export program; dead channels removed exactly in float64; the pruned program prunes again;
one refusal per op variant that still cannot be followed; the pure functions on their own."""

from __future__ import annotations

import json

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from torch import nn

from archc.backends.importers import canonical_graph
from archc.cli.main import main
from archc.compress.pruning import PruneConfig, PruneError, prune, prune_to_macs
from archc.ir import channels
from archc.ir.channels import analyze_channels
from archc.ir.init import random_input, randomize
from archc.ir.shapes import propagate_shapes
from archc.rewrite.channel_resize import composite_source, kept_norm_groups
from tests.helpers import Fn, kill_half
from tests.wild.prunable_ops import NETWORKS, ClassConditional

SHAPE = (2, 3, 16, 16)


def _model(name: str) -> nn.Module:
    """Random non-degenerate weights, the GroupNorm, PReLU and bare parameters included."""
    model = randomize(NETWORKS[name](), 0, calibration_input=random_input((4, *SHAPE[1:]), 1))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d)):
                continue  # `randomize` did these
            for key, value in module.named_parameters(recurse=False):
                if key == "bias" or key in ("pos_embed", "down_bias"):
                    value.copy_(0.2 * torch.randn(value.shape, generator=generator))
                else:  # GroupNorm and PReLU weights, layer scales
                    value.copy_(0.25 + torch.rand(value.shape, generator=generator))
    return model.eval()


def _graph(name: str, route: str, example):
    model = _model(name)
    if route == "trace":
        gm = torch.fx.symbolic_trace(model)
    else:
        from archc.backends.importers import lift_aten_graph

        gm = lift_aten_graph(torch.export.export(model, (example,)).module())
    return canonical_graph(gm, example).double()


def _sizes(gm) -> dict[str, tuple[int, ...]]:
    """The shapes of the GroupNorm, PReLU and bare parameters, and the pixel shuffles' convs."""
    found = {}
    for key, value in gm.named_parameters():
        owner = gm.get_submodule(key.rsplit(".", 1)[0]) if "." in key else gm
        if isinstance(owner, (nn.GroupNorm, nn.PReLU)) or not isinstance(
                owner, (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.BatchNorm1d)):
            found[key] = tuple(value.shape)
    for key, module in gm.named_modules():
        if isinstance(module, nn.GroupNorm):
            found[f"{key}.groups"] = (module.num_groups,)
    return found


@pytest.mark.parametrize("name", list(NETWORKS))
@pytest.mark.parametrize("route", ["trace", "export"])
def test_dead_channels_pruned_exactly(name, route):
    """Half of every free group dead (whole norm groups where a GroupNorm reads it) -> pruned away
    exactly; the ops' parameters follow their channels."""
    example = random_input(SHAPE, 0).double()
    gm = _graph(name, route, example.float())
    kill_half(gm, example)
    result = prune(gm, example, PruneConfig(0.5))
    assert result.macs[1] < 0.6 * result.macs[0]
    x = random_input(SHAPE, 5).double()
    torch.testing.assert_close(result.graph_module(x), gm(x), rtol=1e-12, atol=1e-12)
    before, after = _sizes(gm), _sizes(result.graph_module)
    assert before.keys() == after.keys()
    halved = {key for key in before if after[key] != before[key]}
    expected = {  # the parameters that must have lost half their channels (or norm groups)
        "super_resolution": {"upsample.5.weight"},
        "group_norm_resnet": {"bn1.weight", "bn1.bias", "bn1.groups",
                              "layers.2.downsample.1.groups"},
        "face_net": {"conv1.prelu.weight", "conv_3.conv.prelu.weight"},
        "metaformer": {"pos_embed", "down_bias", "stage1.layer_scale_1",
                       "stage2.layer_scale_2"},
        "fpn_unet": set(),  # convs and BatchNorms only: the MACs and the outputs tell
    }[name]
    assert expected <= halved, (halved, expected)
    for key in halved:
        assert [b // a for a, b in zip(after[key], before[key]) if a != b] == [2], key
    if name == "super_resolution":  # the upsampler's convs lose whole blocks of r² = 4 rows
        modules = dict(result.graph_module.named_modules())
        assert modules["upsample.0"].out_channels == 4 * modules["upsample.3"].in_channels == 32


@pytest.mark.slow  # two CLI runs, each exporting and verifying a program (~6 s of CPU)
@pytest.mark.parametrize("name", ["super_resolution", "group_norm_resnet", "metaformer",
                                  "fpn_unet"])
def test_pruned_program_prunes_again(tmp_path, capsys, name):
    source, once, twice = tmp_path / "m.pt2", tmp_path / "p.pt2", tmp_path / "pp.pt2"
    torch.export.save(torch.export.export(_model(name), (random_input(SHAPE, 0),)), str(source))
    assert main(["prune", str(source), "--ratio", "0.5", "-o", str(once), "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(["prune", str(once), "--ratio", "0.5", "-o", str(twice), "--json"]) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["macs"][0] == first["macs"][1] and second["macs"][1] < first["macs"][1]


@pytest.mark.slow
def test_pickled_super_resolution_prunes_to_a_mac_target(tmp_path, capsys):
    source, out = tmp_path / "model.pt", tmp_path / "pruned.pt2"
    torch.save(_model("super_resolution"), source)
    assert main(["prune", str(source), "--trust-pickle", "--input-shape", "2,3,16,16",
                 "--macs", "0.5", "-o", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert 0.4 * report["macs"][0] <= report["macs"][1] <= 0.5 * report["macs"][0]
    program = torch.export.load(str(out)).module()
    assert program(random_input(SHAPE, 3)).shape == (2, 3, 32, 32)


def test_round_to_holds_on_both_sides_of_a_pixel_shuffle():
    """round_to applies to the coarse group (the unit); the fine side, r² = 4 channels per
    coarse one, is then a multiple too, and whole blocks go: every conv width in the
    super-resolution net is a multiple of 8 but those reading or writing the image (its 3
    channels, 12 unshuffled, 3 + 8 concatenated)."""
    example = random_input(SHAPE, 0)
    gm = _graph("super_resolution", "trace", example).float()
    pruned = prune(gm, example, PruneConfig(0.5, round_to=8)).graph_module
    widths = {(name, side): getattr(m, f"{side}_channels") for name, m in
              pruned.named_modules() if isinstance(m, nn.Conv2d) for side in ("in", "out")}
    assert {key for key, w in widths.items() if w % 8} == {
        ("conv_first", "in"), ("refine", "in"), ("refine", "out")}
    modules = dict(pruned.named_modules())
    assert modules["upsample.0"].out_channels == 4 * modules["upsample.3"].in_channels
    assert modules["upsample.3"].in_channels % 8 == 0 and modules["upsample.3"].in_channels < 16


def test_pixel_unshuffle_modules_prune_exactly():
    """nn.PixelUnshuffle -> conv -> nn.PixelShuffle between two convs: both coarse groups and the
    fine one in between are pruned (dead channels, float64); the fine group's conv loses whole
    blocks of r² = 4."""
    middle = nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(32, 32, 1), nn.PixelShuffle(2))
    model = randomize(Fixture(middle), 0).double()
    x = random_input((2, 3, 8, 8), 0).double()
    gm = torch.fx.symbolic_trace(model)
    kill_half(gm, x)
    result = prune(gm, x, PruneConfig(0.5))
    torch.testing.assert_close(result.graph_module(x), gm(x), rtol=1e-12, atol=1e-12)
    modules = dict(result.graph_module.named_modules())
    assert (modules["a"].out_channels, modules["b"].in_channels) == (4, 4)
    assert (modules["middle.1"].in_channels, modules["middle.1"].out_channels) == (16, 16)


# ---- what is still refused: one line naming the op ----

class Fixture(nn.Module):
    """conv a -> `middle` -> conv b; `middle` is the op under test."""

    def __init__(self, middle, channels: int = 8):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, channels, 1), nn.Conv2d(channels, 4, 1)
        self.middle = middle

    def forward(self, x):
        return self.b(self.middle(self.a(x)))


class GroupNormOfCat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.norm, self.b = nn.GroupNorm(2, 8), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(self.norm(torch.cat([self.a(x), self.c(x)], 1)))


class SharedSlope(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)
        self.slope = nn.Parameter(torch.full((8,), 0.25))

    def forward(self, x):
        return self.b(F.prelu(F.prelu(self.a(x), self.slope), self.slope))


class LabelEmbedding(nn.Module):
    """A class-conditional CNN: a label embedding added to the features."""

    def __init__(self, max_norm: float | None = None):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)
        self.embed = nn.Embedding(10, 8, max_norm=max_norm)

    def forward(self, x, labels):
        return self.b(self.a(x) + self.embed(labels)[:, :, None, None])


class TimestepMLP(nn.Module):
    """A diffusion-style timestep embedding through an MLP, added to the features: nothing but
    the lookup writes the embedded channels."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)
        self.embed, self.mlp = nn.Embedding(10, 6), nn.Linear(6, 8)

    def forward(self, x, labels):
        return self.b(self.a(x) + self.mlp(F.silu(self.embed(labels)))[:, :, None, None])


class FunctionalGroupNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)
        self.weight, self.bias = nn.Parameter(torch.ones(8)), nn.Parameter(torch.zeros(8))

    def forward(self, x):
        return self.b(F.group_norm(self.a(x), 2, self.weight, self.bias))


class HardCodedScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)
        self.gamma = nn.Parameter(torch.ones(8))

    def forward(self, x):
        return self.b(self.a(x) * self.gamma.view(1, 8, 1, 1))


REFUSED = {  # id -> (model, the module writing the refused group, reason)
    "pixel_shuffle_computed_factor": (
        Fixture(Fn(lambda x: F.pixel_shuffle(F.pixel_unshuffle(x, x.shape[-1] // 4), 2))),
        "a",
        f"{channels.UNSUPPORTED}: pixel_unshuffle with a computed factor"),
    "group_norm_of_a_concatenation": (GroupNormOfCat(), "norm", channels.NORM_PARTS),
    "functional_group_norm": (FunctionalGroupNorm(), "a", f"{channels.UNSUPPORTED}: group_norm"),
    "prelu_shared_slope": (SharedSlope(), "a",
                           f"{channels.UNSUPPORTED}: prelu with a shared or computed slope"),
    "embedding_max_norm": (LabelEmbedding(max_norm=1.0), "a",
                           f"{channels.UNSUPPORTED}: Embedding with max_norm"),
    "embedding_read_by_a_linear_alone": (TimestepMLP(), "embed",
                                         f"{channels.UNSUPPORTED}: no op writes these channels"),
    "constant_view_hard_codes_channels": (HardCodedScale(), "a", channels.SIZE_READ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refusal(case):
    model, where, reason = REFUSED[case]
    inputs = (random_input((2, 3, 8, 8), 0),)
    if isinstance(model, (LabelEmbedding, TimestepMLP)):
        inputs += (torch.tensor([1, 7]),)
    gm = torch.fx.symbolic_trace(model)
    graph = analyze_channels(gm, inputs)
    group = next(g for g in graph.groups if any(str(n.target) == where for n in g.tensors))
    assert group.fixed.startswith(reason) and "\n" not in group.fixed


def test_pruning_a_model_with_a_label_input_names_what_it_lacks():
    """Given one example for two inputs prune says so; given both, or the shapes recorded for
    both, it prunes the embedded group with the conv writing it."""
    x, labels = random_input((2, 3, 8, 8), 0), torch.tensor([1, 7])
    gm = torch.fx.symbolic_trace(LabelEmbedding().eval())
    with pytest.raises(PruneError, match=r"takes 2 inputs \(x, labels\) and prune one example"):
        prune(gm, x, PruneConfig(0.5))
    with pytest.raises(PruneError, match=r"takes 2 inputs \(x, labels\) and prune 3 examples"):
        prune(gm, (x, labels, labels), PruneConfig(0.5))
    given = prune(gm, (x, labels), PruneConfig(0.5)).graph_module
    propagate_shapes(gm, (x, labels))
    recorded = prune(gm, x, PruneConfig(0.5)).graph_module
    for pruned in (given, recorded):
        assert pruned.embed.weight.shape == (10, 4) and pruned.a.out_channels == 4
        assert pruned(x, labels).shape == (2, 4, 8, 8)


def test_a_model_with_a_label_input_is_refused_by_the_cli(tmp_path, capsys):
    """The embedding's model takes the labels as a second input: `archc prune` says so in one
    line (the Python API prunes it: `prune(gm, (x, labels), config)`)."""
    source = tmp_path / "m.pt2"
    model = LabelEmbedding().eval()
    torch.export.save(torch.export.export(model, (random_input((2, 3, 8, 8), 0),
                                                  torch.tensor([1, 7]))), str(source))
    assert main(["prune", str(source), "--ratio", "0.5", "-o", str(tmp_path / "p.pt2")]) != 0
    error = capsys.readouterr().err.strip()
    assert "the model takes 2 inputs" in error and "\n" not in error


def _conditional(route: str):
    """`ClassConditional` in float64 with random weights, embeddings and BN statistics, traced or
    lifted from a torch.export program; (graph, image, labels)."""
    model = randomize(ClassConditional(), 0, calibration_input=(
        random_input((4, *SHAPE[1:]), 1), torch.tensor([0, 3, 5, 9])))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for embedding in (model.label, model.gain, model.bias):
            embedding.weight.copy_(0.2 * torch.randn(embedding.weight.shape, generator=generator))
    x, labels = random_input(SHAPE, 0), torch.tensor([2, 7])
    if route == "trace":
        gm = torch.fx.symbolic_trace(model.eval())
    else:
        from archc.backends.importers import lift_aten_graph

        gm = lift_aten_graph(torch.export.export(model.eval(), (x, labels)).module())
    return canonical_graph(gm, (x, labels)).double(), x.double(), labels


@pytest.mark.parametrize("route", ["trace", "export"])
def test_class_conditioned_network_prunes_its_embeddings_exactly(route):
    """Half of every free group dead (the embeddings' columns too) -> removed exactly with the
    embedding columns of their group; the labels' table keeps its rows; the pruned graph prunes
    again."""
    gm, x, labels = _conditional(route)
    kill_half(gm, (x, labels))
    result = prune(gm, (x, labels), PruneConfig(0.5))
    pruned = result.graph_module
    assert result.macs[1] < 0.6 * result.macs[0]
    other = torch.tensor([0, 9])
    for inputs in ((x, labels), (random_input(SHAPE, 5).double(), other)):
        torch.testing.assert_close(pruned(*inputs), gm(*inputs), rtol=1e-12, atol=1e-12)
    for name in ("label", "gain", "bias"):
        assert pruned.get_submodule(name).weight.shape == (10, 16)
        assert pruned.get_submodule(name).embedding_dim == 16
    assert pruned.conv1.out_channels == pruned.conv2.out_channels == 16
    again = prune(pruned, (x, labels), PruneConfig(0.5))
    assert again.macs[0] == result.macs[1] and again.macs[1] < result.macs[1]
    assert again.graph_module.label.weight.shape == (10, 8)


def test_class_conditioned_network_prunes_to_a_mac_target():
    gm, x, labels = _conditional("trace")
    result = prune_to_macs(gm, (x, labels), 0.5, PruneConfig)
    assert 0.45 * result.macs[0] <= result.macs[1] <= 0.5 * result.macs[0]
    assert result.graph_module(x, labels).shape == (2, 10)


def test_an_embedding_does_not_tie_its_indices():
    """Labels of shape [N, 1] are a model input with one channel, fixed; the embedded group
    [N, 1, 8] (channels last) is free and follows the conv it is added to."""
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)
            self.embed = nn.Embedding(10, 8)

        def forward(self, x, labels):
            return self.b(self.a(x) + self.embed(labels).transpose(1, 2)[..., None])

    gm = torch.fx.symbolic_trace(Tokens())
    graph = analyze_channels(gm, (random_input((2, 3, 8, 8), 0), torch.tensor([[1], [7]])))
    nodes = {node.name: node for node in gm.graph.nodes}
    group = graph.of(nodes["a"])
    assert graph.of(nodes["embed"]) is group and graph.dim(nodes["embed"]) == 2
    assert not group.fixed and nodes["embed"] in group.channelwise
    assert graph.of(nodes["labels"]).fixed == channels.MODEL_INPUT


@pytest.mark.parametrize("middle, note", [
    (nn.GroupNorm(1, 8), "a GroupNorm with one group normalizes all these channels together"),
    (nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1, groups=2), nn.GroupNorm(2, 8)),
     "a GroupNorm and a grouped conv on these channels"),
])
def test_group_norms_left_alone_are_noted(middle, note):
    example = random_input((2, 3, 8, 8), 0)
    gm = torch.fx.symbolic_trace(Fixture(middle))
    propagate_shapes(gm, (example,))
    try:
        notes = prune(gm, example, PruneConfig(0.5)).notes
    except PruneError as exc:  # nothing else to prune: the notes are the reason
        notes = [str(exc)]
    assert any(note in line for line in notes)


# ---- the pure functions ----

@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(1, 4), st.data())
def test_kept_norm_groups_counts_whole_groups_and_refuses_partial_ones(groups, width, data):
    channels_ = groups * width
    kept = sorted(data.draw(st.sets(st.integers(0, groups - 1), min_size=1)))
    source = torch.tensor([g * width + c for g in kept for c in range(width)])
    assert kept_norm_groups(source, channels_, groups) == len(kept)
    if width > 1:
        drop = data.draw(st.integers(0, len(source) - 1))
        with pytest.raises(ValueError, match="whole groups"):
            kept_norm_groups(torch.cat([source[:drop], source[drop + 1:]]), channels_, groups)
    with pytest.raises(ValueError, match="new channels"):
        kept_norm_groups(torch.cat([source, torch.tensor([-1])]), channels_, groups)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6), st.integers(2, 3), st.data())
def test_pruned_pixel_shuffle_reads_the_interleaved_blocks(channels_, r, data):
    """The analysis' layout (the input interleaves r² copies of the output's group) and
    `composite_source`: shuffling the input's kept positions gives the output's kept channels."""
    kept = torch.tensor(sorted(data.draw(st.sets(st.integers(0, channels_ - 1), min_size=1))))
    x = torch.randn(1, channels_ * r * r, 3, 3)
    positions = composite_source([(k, r * r, kept) for k in range(r * r)])
    torch.testing.assert_close(F.pixel_shuffle(x[:, positions], r),
                               F.pixel_shuffle(x, r)[:, kept])
    y = torch.randn(1, channels_, 2 * r, 2 * r)  # and the reverse
    torch.testing.assert_close(F.pixel_unshuffle(y[:, kept], r),
                               F.pixel_unshuffle(y, r)[:, positions])


SPELLINGS = {  # how a per-channel constant of C channels is written into `y = conv(x) op c`
    "bare": (lambda c: torch.rand(1, c, 1, 1), lambda p: p),
    "layer_scale": (lambda c: torch.rand(c, 1, 1), lambda p: p),
    "position": (lambda c: torch.rand(1, c, 4, 4), lambda p: p),
    "view": (lambda c: torch.rand(c), lambda p: p.view(1, -1, 1, 1)),
    "reshape": (lambda c: torch.rand(c), lambda p: torch.reshape(p, (1, -1, 1, 1))),
    "unsqueeze": (lambda c: torch.rand(c), lambda p: p.unsqueeze(-1).unsqueeze(-1)),
    "index": (lambda c: torch.rand(c), lambda p: p[None, :, None, None]),
}


class ScaledConv(nn.Module):
    def __init__(self, channels: int, spelling: str, shift: bool):
        super().__init__()
        make, self.spell = SPELLINGS[spelling]
        self.a, self.b = nn.Conv2d(3, channels, 1), nn.Conv2d(channels, 2, 1)
        self.constant = nn.Parameter(make(channels) + 0.5)
        self.shift = shift

    def forward(self, x):
        y = self.a(x)
        y = y + self.spell(self.constant) if self.shift else self.spell(self.constant) * y
        return self.b(torch.relu(y))


@settings(max_examples=15, deadline=None)
@given(st.integers(2, 6), st.sampled_from(list(SPELLINGS)), st.booleans(), st.data())
def test_per_channel_constants_follow_their_channels(channels_, spelling, shift, data):
    """Every spelling of a per-channel constant is a channelwise member along its own channel
    dim: with random channels dead (and the constant 0 there for a shift), removing them through
    the constant is exact (float64)."""
    from archc.rewrite.channel_resize import resize_channels

    model = ScaledConv(channels_, spelling, shift).double()
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    graph = analyze_channels(gm, (x,))
    group = graph.of(next(n for n in gm.graph.nodes if n.target == "a"))
    assert not group.fixed
    (read,) = [r for node in group.channelwise for r in graph.constants[node]]
    assert read[0] == "constant" and read[2] == ("shift" if shift else "scale")
    dead = sorted(data.draw(st.sets(st.integers(0, channels_ - 1), max_size=channels_ - 1)))
    with torch.no_grad():
        gm.a.weight[dead] = 0
        gm.a.bias[dead] = 0
        if shift:
            gm.constant.index_fill_(read[1], torch.tensor(dead, dtype=torch.long), 0)
    expected = gm(x)
    kept = torch.tensor([c for c in range(channels_) if c not in dead])
    resize_channels(gm, graph, {group.index: kept})
    assert gm.constant.shape[read[1]] == len(kept) == gm.a.out_channels
    torch.testing.assert_close(gm(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("module", [nn.GroupNorm(3, 12, eps=1e-3), nn.GroupNorm(2, 8, affine=False),
                                    nn.PReLU(6), nn.PReLU(), nn.Embedding(10, 8, padding_idx=0)])
def test_new_module_configs_rebuild_the_module(module):
    """A pruned GroupNorm, PReLU or Embedding is recorded as a `module` edit: its config rebuilds
    it."""
    from archc.ir.graph_edits import make_module, module_config

    rebuilt = make_module(module_config(module))
    assert type(rebuilt) is type(module) and module_config(rebuilt) == module_config(module)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == \
        {k: v.shape for k, v in module.state_dict().items()}


class Conditioned(nn.Module):
    """A conv whose channels a label embedding shifts (`h + emb(y)`) or scales (`h * emb(y)`)."""

    def __init__(self, channels_: int, classes: int, shift: bool):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, channels_, 1), nn.Conv2d(channels_, 2, 1)
        self.embed = nn.Embedding(classes, channels_)
        self.shift = shift

    def forward(self, x, labels):
        e = self.embed(labels)[:, :, None, None]
        return self.b(torch.relu(self.a(x) + e if self.shift else self.a(x) * e))


@settings(max_examples=15, deadline=None)
@given(st.integers(2, 8), st.integers(1, 5), st.booleans(), st.data())
def test_embedding_columns_follow_their_channels(channels_, classes, shift, data):
    """With random channels dead (the embedding's columns 0 there when it shifts them), removing
    them takes the same columns out of the embedding, exactly (float64), for any labels."""
    from archc.rewrite.channel_resize import resize_channels

    gm = torch.fx.symbolic_trace(Conditioned(channels_, classes, shift)).double()
    labels = torch.tensor(data.draw(st.lists(st.integers(0, classes - 1), min_size=2,
                                             max_size=2)))
    x = random_input((2, 3, 4, 4), 0).double()
    graph = analyze_channels(gm, (x, labels))
    group = graph.of(next(n for n in gm.graph.nodes if n.name == "embed"))
    assert not group.fixed and group.size == channels_
    dead = data.draw(st.lists(st.integers(0, channels_ - 1), unique=True, max_size=channels_ - 1))
    with torch.no_grad():
        gm.a.weight[dead] = 0
        gm.a.bias[dead] = 0
        if shift:
            gm.embed.weight[:, dead] = 0
    others = torch.tensor([classes - 1, 0])
    expected = gm(x, labels), gm(x, others)
    kept = torch.tensor([c for c in range(channels_) if c not in dead])
    columns = gm.embed.weight[:, kept].clone()
    resize_channels(gm, graph, {group.index: kept})
    assert torch.equal(gm.embed.weight, columns) and gm.embed.embedding_dim == len(kept)
    torch.testing.assert_close((gm(x, labels), gm(x, others)), expected, rtol=1e-12, atol=1e-12)
