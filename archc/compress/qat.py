"""Quantization-aware fine-tuning of the deploy form (`archc qat`).

1. The checkpoint's train form goes through the default pass pipeline (the caller's: the core
   does not import the catalogue) to its deploy form: every re-parameterizable block one conv
   with bias, every BN folded. That graph is what ships, so it is what is fine-tuned.
2. `FakeQuant.wrap` (a `archc.train.loop.Plugin`) replaces every Conv2d and Linear of that graph by
  a
   fake-quantized one: its weight is quantized per output channel exactly as ONNX Runtime's
   quantizer will quantize it (symmetric int8, scale = max|w| / 127, range [-127, 127]) and its
   input as ORT's uint8 activations (asymmetric, range [min(0, lo), max(0, hi)] from an
   exponential moving average of the batch minimum and maximum), both with the straight-through
   estimator (`torch.fake_quantize_per_*_affine`). The shared `Trainer` then fine-tunes it.
3. The fine-tuned float weights are put back into plain convs and exported to ONNX, and
   `archc.compress.quantize.quantize` (ORT, QDQ, per-channel, min-max) writes the int8 model: the
   int8 weights ORT computes are the fake-quantized weights of the last step; the activation ranges
   are ORT's min-max calibration, not the moving averages (ORT's quantizer takes no given
   activation ranges here). The report checks that every conv runs as an integer op.

Own fake-quant modules rather than torchao's PT2E flow: the deploy graph is already a flat
torch.fx graph of plain convs, so two small modules give the exact weight quantizer of the
runtime that executes the result, and nothing new to install.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archc.train.loop import Plugin

WEIGHT_RANGE = (-127, 127)  # ORT's symmetric int8 weights
ACTIVATION_RANGE = (0, 255)  # ORT's uint8 activations


def fake_quantize_weight(weight: Tensor) -> Tensor:
    """Per-output-channel symmetric int8 fake quantization (ORT's weight scheme)."""
    absmax = weight.detach().flatten(1).abs().amax(1).clamp_min(1e-12)
    scale = (absmax / WEIGHT_RANGE[1]).float()
    zero = torch.zeros_like(scale, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(weight, scale, zero, 0, *WEIGHT_RANGE)


class ActivationQuant(nn.Module):
    """uint8 asymmetric fake quantization of a tensor with EMA min/max ranges."""

    def __init__(self, momentum: float = 0.1):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("low", torch.tensor(0.0))
        self.register_buffer("high", torch.tensor(0.0))
        self.register_buffer("seen", torch.tensor(False))

    def forward(self, x: Tensor) -> Tensor:
        x = x.float()  # ranges and rounding in float32, also under bf16/fp16 autocast
        if self.training:
            low, high = x.detach().min(), x.detach().max()
            if not bool(self.seen):
                self.low.copy_(low)
                self.high.copy_(high)
                self.seen.fill_(True)
            else:
                self.low.lerp_(low, self.momentum)
                self.high.lerp_(high, self.momentum)
        low, high = torch.clamp(self.low, max=0.0), torch.clamp(self.high, min=0.0)
        scale = float(((high - low) / ACTIVATION_RANGE[1]).clamp_min(1e-8))
        zero = int(torch.clamp(torch.round(-low / scale), *ACTIVATION_RANGE))
        return torch.fake_quantize_per_tensor_affine(x, scale, zero, *ACTIVATION_RANGE)


class QuantConv2d(nn.Module):
    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv, self.input_quant = conv, ActivationQuant()

    def forward(self, x: Tensor) -> Tensor:
        c = self.conv
        return F.conv2d(self.input_quant(x), fake_quantize_weight(c.weight), c.bias, c.stride,
                        c.padding, c.dilation, c.groups)


class QuantLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear, self.input_quant = linear, ActivationQuant()

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.input_quant(x), fake_quantize_weight(self.linear.weight),
                        self.linear.bias)


class FakeQuant(Plugin):
    """Wrap every Conv2d and Linear of a GraphModule in fake quantization (module docstring)."""

    def wrap(self, model: nn.Module) -> nn.Module:
        self.wrapped = replace_layers(model, {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear})
        if not self.wrapped:
            from archc.errors import TrainingError

            raise TrainingError("the model has no Conv2d or Linear layer to quantize")
        return model


def replace_layers(model: nn.Module, wrappers: dict) -> int:
    """Replace the modules of the types in `wrappers` (in place); return how many."""
    targets = [(name, module) for name, module in model.named_modules()
               if type(module) in wrappers]
    for name, module in targets:
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf,
                wrappers[type(module)](module))
    return len(targets)


def unwrap(model: nn.Module) -> nn.Module:
    """Put the plain (fine-tuned float) layers back in place of the fake-quantized ones."""
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, (QuantConv2d, QuantLinear))]
    for name, module in targets:
        parent, _, leaf = name.rpartition(".")
        inner = module.conv if isinstance(module, QuantConv2d) else module.linear
        setattr(model.get_submodule(parent) if parent else model, leaf, inner)
    return model
