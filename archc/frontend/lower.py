"""Lowering: spec -> nn.Module -> torch.fx.GraphModule.

The network is pycls' AnyNet: `stem`, stages `s1..sN` of blocks `b1..bK` (the first block of a stage
takes the previous width and the stage stride, the others stride 1), then `head`. Tracing keeps the
module hierarchy, so graph nodes carry readable qualified names (`s2.b1.f.b.conv`).

Weights come from `archc.ir.init` (pycls' scheme by default, per-tensor numpy generators keyed by
(seed, name), independent of torch's RNG stream). `build(..., device="meta")` skips allocation and
initialisation entirely, for analysis of large models.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Literal

import torch
from torch import Tensor, nn

from archc.frontend.blocks.layers import StochasticDepth, build_pool, set_batch_norm
from archc.frontend.blocks.registry import BLOCKS, HEADS, STEMS
from archc.frontend.blocks.vanillanet import set_activation_lambda
from archc.frontend.loading import load_spec
from archc.frontend.spec import Spec

Init = Literal["pycls", "random"]


class Network(nn.Module):
    """[stem] -> s1 .. sN -> head. Stage i is `b1..bK` [+ `pool`]; block j of the stage is built
    with `stage_at(stage, j)`. With a `drop_path_rate` r, the n-th of N blocks (0-based, over the
    whole body) drops its residual branch with probability r n / N in training mode; the spec's
    `activation_lambda` is set on every deep-training activation (`set_activation_lambda`); the
    spec's `bn` on every BatchNorm of the stem, the head and each stage without its own `bn`
    (`set_batch_norm`)."""

    def __init__(self, spec: Spec):
        super().__init__()
        stem_spec = spec.built_stem()
        stem = STEMS[stem_spec.type].build(stem_spec, spec.input.channels)
        if stem is not None:
            set_batch_norm(stem, spec.bn)
            self.stem = stem
        width = spec.input.channels if stem is None else stem_spec.channels
        stages = spec.stages()
        drop_rate = getattr(spec.body, "drop_path_rate", 0.0)
        total, position = sum(stage.depth for stage in stages), 0
        for stage_index, stage in enumerate(stages, start=1):
            block_cls = BLOCKS[stage.block]
            blocks: OrderedDict[str, nn.Module] = OrderedDict()
            for block_index in range(stage.depth):
                stride = stage.stride if block_index == 0 else 1
                fields = block_cls.stage_at(stage, block_index)
                block = block_cls(width, stage.width, stride, fields)
                if drop_rate and block_cls.stochastic_depth:
                    block.drop_path = StochasticDepth(drop_rate * position / total)
                blocks[f"b{block_index + 1}"] = block
                width, position = stage.width, position + 1
            if stage.pool is not None:
                blocks["pool"] = build_pool(stage.pool)
            self.add_module(f"s{stage_index}", nn.Sequential(blocks))
            set_batch_norm(self.get_submodule(f"s{stage_index}"),
                           spec.bn if stage.bn is None else stage.bn)
        head = spec.built_head()
        self.head = HEADS[head.type](head, width, spec.num_classes)
        set_batch_norm(self.head, spec.bn)
        if spec.activation_lambda is not None:
            set_activation_lambda(self, spec.activation_lambda)

    def forward(self, x: Tensor) -> Tensor:
        for module in self.children():
            x = module(x)
        return x


def input_shape(spec: Spec, batch: int = 1, size: int | None = None) -> tuple[int, int, int, int]:
    side = size or spec.input.size
    return (batch, spec.input.channels, side, side)


def build_module(
    spec: Spec | Any, *, seed: int = 0, init: Init = "pycls", device: str | torch.device = "cpu"
) -> nn.Module:
    """The eager nn.Module of a spec, in eval mode."""
    from archc.ir import init as initializers

    spec = spec if isinstance(spec, Spec) else load_spec(spec)
    with torch.device(device):
        model = Network(spec)
    if torch.device(device).type != "meta":
        if init == "pycls":
            initializers.pycls_init(model, seed)
        else:
            calibration = initializers.random_input(input_shape(spec, batch=2), seed)
            initializers.randomize(model, seed, calibration_input=calibration)
    return model.eval()


def build(
    spec: Spec | Any, *, seed: int = 0, init: Init = "pycls", device: str | torch.device = "cpu"
) -> torch.fx.GraphModule:
    """Lower a spec (object, mapping or path) to a traced GraphModule in eval mode.

    `init="random"` gives random non-degenerate weights and BN statistics calibrated on a random
    batch and then perturbed (see `archc.ir.init.randomize`): the setting for verification.
    """
    spec = spec if isinstance(spec, Spec) else load_spec(spec)
    model = build_module(spec, seed=seed, init=init, device=device)
    graph_module = torch.fx.symbolic_trace(model)
    graph_module.meta["archc_spec"] = spec.to_dict()
    return graph_module.eval()
