"""Deterministic weight initialisation that does not depend on torch's RNG stream.

Every tensor is drawn from its own numpy generator, `PCG64(SeedSequence([seed, crc32(name)]))`,
keyed by the tensor's qualified name. The same (seed, name) therefore gives the same values on any
torch version, in any construction order, and after unrelated modules are added or removed.

Two schemes:

* `pycls_init` (archc's default, as pycls): conv `W ~ N(0, sqrt(2 / fan_out))` with
  `fan_out = kh * kw * out_channels` (not divided by groups); BN `gamma = 1, beta = 0`;
  Linear `W ~ N(0, 0.01)`, bias 0. Conv biases are 0. Layer scales
  (`archc.ir.modules.LayerScale`) hold their block's initial value (FastViT: 1e-5).
* `randomize` (tests, goldens, verification): every weight `~ N(0, 1 / sqrt(fan_in))`, biases `~
N(0, 0.1)`, layer scales `~ U(0.5, 1.5)` (at 1e-5 a residual branch would be invisible to a
check), BN `gamma ~ U(0.5, 1.5)`, `beta ~ N(0, 0.2)`, and running statistics that are either
random (`mean ~ N(0, 0.3)`, `var ~ U(0.5, 2)`) or, given a calibration batch, the batch statistics
of that input perturbed (`mean += 0.2 * std * N(0,1)`, `var *= U(0.5, 2)`), so that deep networks
keep O(1) activations while every BN still does real, non-identity work. A network with default BN
statistics can be totally wrong and still pass an absolute-tolerance check.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch
from torch import nn

from archc.ir.modules import LayerScale
from archc.ir.ops import BN_MODULES, CONV_MODULES, CONV_TRANSPOSE_MODULES


def generator(seed: int, name: str) -> np.random.Generator:
    """The numpy generator of one named tensor."""
    return np.random.Generator(
        np.random.PCG64(np.random.SeedSequence([seed, zlib.crc32(name.encode())]))
    )


def _fill(tensor: torch.Tensor, values: np.ndarray) -> None:
    with torch.no_grad():
        tensor.copy_(torch.from_numpy(np.ascontiguousarray(values)).to(tensor.dtype))


def _normal(tensor: torch.Tensor, seed: int, name: str, std: float, mean: float = 0.0) -> None:
    _fill(tensor, generator(seed, name).normal(mean, std, size=tuple(tensor.shape)))


def _uniform(tensor: torch.Tensor, seed: int, name: str, low: float, high: float) -> None:
    _fill(tensor, generator(seed, name).uniform(low, high, size=tuple(tensor.shape)))


def _fan_in(weight: torch.Tensor, module: nn.Module) -> int:
    if isinstance(module, CONV_TRANSPOSE_MODULES):
        return max(1, weight.shape[0] // module.groups * weight[0, 0].numel())
    return max(1, weight[0].numel())


def pycls_init(model: nn.Module, seed: int = 0) -> nn.Module:
    """pycls' initialisation, drawn from per-tensor numpy generators. Returns `model`."""
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, CONV_MODULES + CONV_TRANSPOSE_MODULES):
            fan_out = module.weight[0, 0].numel() * module.out_channels
            _normal(module.weight, seed, prefix + "weight", (2.0 / fan_out) ** 0.5)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, BN_MODULES):
            if module.affine:
                module.weight.data.fill_(1.0)
                module.bias.data.zero_()
            if module.track_running_stats:
                module.reset_running_stats()
        elif isinstance(module, nn.Linear):
            _normal(module.weight, seed, prefix + "weight", 0.01)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, LayerScale):
            module.gamma.data.fill_(module.init_value)
    return model


def randomize(
    model: nn.Module,
    seed: int = 0,
    calibration_input: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
) -> nn.Module:
    """Random non-degenerate weights and randomized BN statistics (see module docstring).

    Leaves `model` in eval mode. Returns `model`.
    """
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, (*CONV_MODULES, *CONV_TRANSPOSE_MODULES, nn.Linear)):
            _normal(module.weight, seed, prefix + "weight", _fan_in(module.weight, module) ** -0.5)
            if module.bias is not None:
                _normal(module.bias, seed, prefix + "bias", 0.1)
        elif isinstance(module, BN_MODULES):
            if module.affine:
                _uniform(module.weight, seed, prefix + "weight", 0.5, 1.5)
                _normal(module.bias, seed, prefix + "bias", 0.2)
            if module.track_running_stats:
                _normal(module.running_mean, seed, prefix + "running_mean", 0.3)
                _uniform(module.running_var, seed, prefix + "running_var", 0.5, 2.0)
        elif isinstance(module, LayerScale):
            _uniform(module.gamma, seed, prefix + "gamma", 0.5, 1.5)
    if calibration_input is not None:
        _calibrate_bn(model, seed, calibration_input)
    return model.eval()


def _calibrate_bn(model: nn.Module, seed: int, calibration_input) -> None:
    """Set each BN's running statistics to its batch statistics on the input, then perturb them."""
    bns = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, BN_MODULES) and m.track_running_stats
    ]
    saved = [(m.momentum, m.training) for _, m in bns]
    model.eval()
    for _, bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: after one batch, running stats = batch stats
        bn.train()
    inputs = calibration_input if isinstance(calibration_input, tuple) else (calibration_input,)
    # Batch statistics in float64: a BN late in the network sees few values, and float32 rounding
    # that varies with the thread count would otherwise reach the statistics and every output.
    dtypes = {name: t.dtype for name, t in [*model.named_parameters(), *model.named_buffers()]}
    try:
        with torch.no_grad():
            model.double()(*(x.double() if x.is_floating_point() else x for x in inputs))
    finally:  # also when the input does not fit the network
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            tensor.data = tensor.data.to(dtypes[name])
        for (_, bn), (momentum, training) in zip(bns, saved):
            bn.momentum = momentum
            bn.train(training)
    for name, bn in bns:
        std = bn.running_var.clamp_min(1e-6).sqrt()
        noise = torch.from_numpy(
            generator(seed, f"{name}.calibration").normal(size=tuple(std.shape))
        )
        scale = torch.from_numpy(
            generator(seed, f"{name}.calibration_var").uniform(0.5, 2.0, size=tuple(std.shape))
        )
        with torch.no_grad():
            bn.running_mean.add_(0.2 * std * noise.to(std.dtype))
            bn.running_var.mul_(scale.to(std.dtype))
    model.eval()


def random_input(
    shape: tuple[int, ...], seed: int = 0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """A standard-normal input tensor from the versioned numpy generator."""
    return torch.from_numpy(generator(seed, "input").standard_normal(size=shape)).to(dtype)
