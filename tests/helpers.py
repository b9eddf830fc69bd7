"""Test helpers shared by the pass test modules."""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from archc.compress.pruning import _positions, _unit_pieces
from archc.ir.channels import analyze_channels
from archc.ir.graph import attribute
from archc.ir.init import random_input, randomize
from archc.ir.verify import relative_error
from archc.passes.pipelines import PIPELINES
from archc.rewrite.pipeline import PassContext, resolve_pipeline, run_pipeline


class Fn(nn.Module):
    """Wrap a function as a module (a non-linearity, a custom op) in hand-built graphs."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class BNAndPad(nn.Module):
    """DBB's BNAndPadLayer: BN, then pad with the BN's own shift (what BN makes of a zero)."""

    def __init__(self, c, pad):
        super().__init__()
        self.bn, self.pad = nn.BatchNorm2d(c), pad

    def forward(self, x):
        bn = self.bn
        shift = bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)
        shift = shift.view(1, -1, 1, 1)
        return F.pad(bn(x) - shift, [self.pad] * 4) + shift


# Pipeline tolerance and independent check per dtype: float32 at 1e-5, float64 models exactly.
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}


def run_randomized(model: nn.Module, passes: str | list[str], shape: tuple[int, ...],
                   dtype=torch.float32, seed: int = 0, inputs: tuple | None = None, **ctx):
    """Randomize `model` (seeded, non-trivial BN statistics), cast it, run `passes` (a pipeline
    text such as "default" or a list of pass names) and check the result on a fresh input,
    independently of the pipeline's own verification: (model, result, relative error)."""
    model = randomize(model.to(dtype), seed)
    names = resolve_pipeline(passes) if isinstance(passes, str) else list(passes)
    context = PassContext(input_shape=None if inputs else shape, example_inputs=inputs,
                          rtol=TOLERANCE[dtype], seed=seed, explain=True, **ctx)
    result = run_pipeline(model, names, context)
    fresh = inputs or (random_input(shape, seed + 1, dtype),)
    with torch.no_grad():
        error = relative_error([model(*fresh)], [result.graph_module(*fresh)])
    return model, result, error


def snapshot(gm) -> tuple:
    return gm.code, sorted(n for n, _ in gm.named_modules()), sorted(gm.state_dict())


def assert_default_pipeline_exact_idempotent_honest(model, shape, seed) -> None:
    """The property every rewrite family is tested for: each default pass reports `modified`
    exactly when it changed the graph; the pipeline preserves the output (rel <= 1e-5), and a
    second run changes nothing."""
    ctx = PassContext(input_shape=shape, seed=seed)
    gm = torch.fx.symbolic_trace(copy.deepcopy(model))  # tracing stores constants on its root
    for name in PIPELINES["default"]:
        before = snapshot(gm)
        result = run_pipeline(gm, [name], ctx)
        assert result.reports[0].modified == (snapshot(result.graph_module) != before), name
        gm = result.graph_module
    first = run_pipeline(model, PIPELINES["default"], ctx)
    assert first.max_error <= 1e-5
    assert first.graph_module.code == gm.code
    x = random_input(shape, seed + 1)
    with torch.no_grad():
        assert relative_error([model(x)], [first.graph_module(x)]) <= 1e-5
    second = run_pipeline(first.graph_module, PIPELINES["default"], ctx)
    assert not any(report.modified for report in second.reports)
    assert second.graph_module.code == first.graph_module.code


def kill_half(gm, example, whole_segments: bool = False) -> None:
    """Make the first half of every pruning unit's channels (of every segment; with
    whole_segments, the first half of the segments) exactly dead wherever they are (in the
    composites holding them too: concatenations, splits, shuffles): producer rows and biases 0, BN
    gamma and beta 0. A unit is a free leaf group, or a group the analysis cut into pieces; a group
    with GroupNorms loses the first half of its norm groups, whole; groups a LayerNorm normalizes
    have no dead channels (PruneConfig.keep_normalized leaves them)."""
    dtype = next(gm.parameters()).dtype
    examples = example if isinstance(example, tuple) else (example,)  # several: a label too
    cg = analyze_channels(gm, tuple(x.to(dtype) if x.is_floating_point() else x
                                    for x in examples))
    positions = _positions(cg)
    pieces = _unit_pieces(cg)
    in_unit = {leaf for unit in pieces.values() for leaf in unit}
    killed = 0
    for group in cg.groups:
        if group.fixed or group.parts and group.index not in pieces or group.size < 2 \
                or group.index in in_unit or group.normalized:
            continue
        killed += 1
        segments = group.norm_groups or group.divisor
        per = group.size // segments
        if (whole_segments or group.norm_groups) and segments > 1:
            dead = [c for s in range(segments // 2) for c in range(s * per, (s + 1) * per)]
        else:
            dead = [s * per + c for s in range(segments) for c in range(per // 2)]
        leaves = pieces.get(group.index, {group.index: np.arange(group.size)})
        for leaf, channels in leaves.items():
            local = np.flatnonzero(np.isin(channels, dead))
            for top, where in positions[leaf]:
                _zero(gm, cg, cg.groups[top], torch.from_numpy(where[local]))
    assert killed, "no free group to kill"


def _zero(gm, cg, group, channels) -> None:
    """Channels of a group exactly 0: its producers' rows and biases, its BNs' gamma and beta,
    its depthwise convs' biases, its Embeddings' columns, its per-channel shifts."""
    with torch.no_grad():
        for node in group.producers:
            module = gm.get_submodule(node.target)
            module.weight[channels] = 0
            if module.bias is not None:
                module.bias[channels] = 0
        for node in group.channelwise:
            if node in cg.constants:
                for name, axis, kind in cg.constants[node]:
                    if kind == "shift":
                        attribute(gm, name).index_fill_(axis, channels, 0)
                continue
            module = gm.get_submodule(node.target)
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.weight[channels] = 0
                module.bias[channels] = 0
            elif isinstance(module, nn.Embedding):  # its columns are the channels
                module.weight[:, channels] = 0
            elif getattr(module, "bias", None) is not None:
                module.bias[channels] = 0
