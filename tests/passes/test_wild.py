"""`archc fuse` on re-parameterization families written the way model libraries write them
(tests/wild): through a pickled module and through a `torch.export` program, archc's deploy form
has at most the hand-written conversion's convs, no BatchNorm, and the model's function at batch
1 and 3; random compositions of the branch patterns with library noise collapse to one conv."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from archc.cli.main import main
from archc.ir.init import random_input, randomize
from archc.ir.verify import relative_error
from archc.rewrite.pipeline import PassContext, resolve_pipeline, run_pipeline
from tests.wild import layers
from tests.wild.families import NETWORKS

_LAYERS = {"convolution", "conv2d", "linear"}


def _network(family: str) -> tuple[nn.Module, tuple[int, ...]]:
    cls, shape = NETWORKS[family]
    model = randomize(cls(), 0, calibration_input=random_input((4, *shape[1:]), 1)).eval()
    return model, shape


def _hand_written(model: nn.Module) -> tuple[int, int]:
    """(layers, BatchNorms) of the authors' own conversion."""
    deployed = layers.reparameterize(copy.deepcopy(model)).eval()
    kinds = Counter(type(m).__name__ for m in deployed.modules())
    norms = sum(n for kind, n in kinds.items() if "BatchNorm" in kind)
    return kinds["Conv2d"] + kinds["Linear"], norms


def _program_census(path) -> tuple[int, int]:
    """(layers, BatchNorms) that an emitted program executes."""
    graph = torch.export.load(str(path)).module().graph
    names = [getattr(getattr(n.target, "overloadpacket", None), "__name__", "")
             for n in graph.nodes if n.op == "call_function"]
    return (sum(name in _LAYERS for name in names),
            sum("batch_norm" in name for name in names))


def _fuse(source, out, shape, *extra) -> None:
    argv = ["fuse", str(source), "-o", str(out), "--input-shape", ",".join(map(str, shape)),
            *extra]
    assert main(argv) == 0


def _check_deploy(model, shape, fused_path) -> tuple[int, int]:
    fused = torch.export.load(str(fused_path)).module()
    for batch in (1, 3):
        x = random_input((batch, *shape[1:]), 7 + batch)
        with torch.no_grad():
            assert relative_error(model(x), fused(x)) <= 1e-5, batch
    return _program_census(fused_path)


@pytest.mark.parametrize("family", sorted(NETWORKS))
def test_pickled_module_fuses_to_the_hand_written_form(family, tmp_path, capsys):
    model, shape = _network(family)
    convs, _ = _hand_written(model)
    source = tmp_path / f"{family}.pt"
    torch.save(model, source)
    _fuse(source, tmp_path / "fused.pt2", shape, "--trust-pickle")
    fused_convs, norms = _check_deploy(model, shape, tmp_path / "fused.pt2")
    assert fused_convs <= convs and norms == 0


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(NETWORKS))
def test_exported_program_fuses_like_the_pickled_module(family, tmp_path, capsys):
    model, shape = _network(family)
    convs, _ = _hand_written(model)
    program = tmp_path / f"{family}.pt2"
    example = random_input((2, *shape[1:]), 3)
    torch.export.save(torch.export.export(
        model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},)), program)
    _fuse(program, tmp_path / "from_program.pt2", shape)
    fused_convs, norms = _check_deploy(model, shape, tmp_path / "from_program.pt2")
    assert fused_convs <= convs and norms == 0
    pickled = tmp_path / f"{family}.pt"
    torch.save(model, pickled)
    _fuse(pickled, tmp_path / "from_pickle.pt2", shape, "--trust-pickle")
    assert _program_census(tmp_path / "from_pickle.pt2") == (fused_convs, norms)


@pytest.mark.slow
def test_a_program_exported_at_a_fixed_batch_fuses_to_any_batch(tmp_path, capsys):
    """A channel shuffle in an exported program has its batch size written into its reshapes;
    the fused artifact still takes any batch."""
    import archc

    model = archc.build_module("specs/shufflenet_v2_x0_5.yaml", init="random")
    program = tmp_path / "shufflenet.pt2"
    torch.export.save(torch.export.export(model, (random_input((1, 3, 32, 32), 0),)), program)
    _fuse(program, tmp_path / "fused.pt2", (1, 3, 32, 32))
    _check_deploy(model, (1, 3, 32, 32), tmp_path / "fused.pt2")


# ---- random compositions with library noise ----

class Branches(nn.Module):
    """A sum of linear branches on one input, summed in one of the spellings libraries use."""

    def __init__(self, branches: list[nn.Module], spelling: str, scale: bool):
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.spelling = spelling
        self.layer_scale = layers.LayerScale2d(branches[0].out_channels, 0.5) if scale else None
        self.attn, self.drop_path = nn.Identity(), layers.DropPath(0.1)

    def forward(self, x):
        outputs = [branch(x) for branch in self.branches]
        if self.layer_scale is not None:
            outputs[0] = self.layer_scale(outputs[0])
        if self.spelling == "loop":
            out = 0
            for output in outputs:
                out += output
        elif self.spelling == "sum":
            out = sum(outputs)
        else:
            out = outputs[0]
            for output in outputs[1:]:
                out = torch.add(out, output)
        return torch.relu(self.attn(self.drop_path(out)))


class _Identity(nn.Module):
    """A BN-only identity branch, the library BN subclass."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = layers.BatchNormAct2d(channels, drop=nn.Dropout(0.2))
        self.out_channels = channels

    def forward(self, x):
        return self.norm(x)


class _ConvBranch(layers.ConvNormAct):
    def __init__(self, channels: int, kernel: int, groups: int):
        super().__init__(channels, channels, kernel, groups=groups)
        self.out_channels = channels


@st.composite
def noisy_networks(draw):
    channels = 8
    blocks = []
    for _ in range(draw(st.integers(1, 3))):
        groups = draw(st.sampled_from([1, 2, 8]))
        kernels = draw(st.lists(st.sampled_from([1, 3, 5]), min_size=1, max_size=3))
        branches = [_ConvBranch(channels, k, groups) for k in kernels]
        if draw(st.booleans()):
            branches.append(_Identity(channels))
        blocks.append(Branches(branches, draw(st.sampled_from(["loop", "sum", "add"])),
                               draw(st.booleans())))
    return nn.Sequential(*blocks)


@settings(max_examples=15, deadline=None)
@given(noisy_networks(), st.integers(0, 2**16))
def test_noisy_branch_patterns_collapse_to_one_conv_per_block(network, seed):
    shape = (2, 8, 9, 9)
    model = randomize(network, seed, calibration_input=random_input(shape, seed + 1)).eval()
    result = run_pipeline(model, resolve_pipeline("default"), PassContext(input_shape=shape,
                                                                           seed=seed))
    kinds = Counter(type(result.graph_module.get_submodule(n.target)).__name__
                    for n in result.graph_module.graph.nodes if n.op == "call_module")
    assert kinds["Conv2d"] == len(network) and not any("Norm" in k for k in kinds)
    x = random_input(shape, seed + 2)
    with torch.no_grad():
        assert relative_error(model(x), result.graph_module(x)) <= 1e-5
