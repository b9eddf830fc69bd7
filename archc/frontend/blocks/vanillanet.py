"""VanillaNet (Chen et al. 2023): deep training, the activation series and the `vanillanet`
block; each layer with its analytic twin (the stem and head are in
`archc.frontend.blocks.stems_heads`).
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from archc.frontend.blocks.counting import Cx, conv2d_cx, norm2d_cx, pool2d_cx
from archc.frontend.blocks.registry import Block, register_block
from archc.frontend.spec import StageSpec


class DeepTrainingActivation(nn.Module):
    """VanillaNet's deep-training activation between two convs, `(1 - λ) relu(x) + λ x =
    leaky_relu(x, λ)`: λ goes from 0 (ReLU) to 1 (the identity) during training
    (`deep_training_lambda`), after which the two convs are linear and merge. At λ = 1 it is
    written as nothing at all (exactly the identity), so traced graphs have no op there."""

    def __init__(self):
        super().__init__()
        self.lam = 0.0

    def forward(self, x: Tensor) -> Tensor:
        return x if self.lam == 1.0 else nn.functional.leaky_relu(x, self.lam)


def deep_training_lambda(epoch: float, decay_epochs: float) -> float:
    """VanillaNet's schedule: λ = epoch / decay_epochs, 1 from then on."""
    return min(1.0, epoch / decay_epochs)


def set_activation_lambda(model: nn.Module, lam: float) -> nn.Module:
    """Set λ of every deep-training activation in an eager model (the schedule's step; a spec's
    `activation_lambda` is applied this way at build). Returns `model`."""
    for module in model.modules():
        if isinstance(module, DeepTrainingActivation):
            module.lam = float(lam)
    return model


class ActivationSeries(nn.Module):
    """VanillaNet's series-informed activation: BN(dw(relu(x))), dw a depthwise 7x7 conv (n = 3:
    2n + 1 taps per side) without bias, so each channel's activation mixes its neighbours."""

    def __init__(self, width: int, n: int = 3):
        super().__init__()
        self.act = nn.ReLU()
        self.conv = nn.Conv2d(width, width, 2 * n + 1, padding=n, groups=width, bias=False)
        self.bn = nn.BatchNorm2d(width, eps=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(self.act(x)))

    @staticmethod
    def complexity(cx: Cx, width: int) -> Cx:
        """The depthwise 7x7 conv (padding 3, no bias), then BN."""
        return norm2d_cx(conv2d_cx(cx, width, width, 7, groups=width), width)


def conv_bias_bn(w_in: int, w_out: int, kernel: int = 1, stride: int = 1) -> nn.Sequential:
    """VanillaNet's conv with bias (no padding) + BN (eps 1e-6), named conv/bn."""
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(w_in, w_out, kernel, stride, bias=True),
        bn=nn.BatchNorm2d(w_out, eps=1e-6),
    ))


def conv_bias_bn_cx(cx: Cx, w_in: int, w_out: int, kernel: int = 1, stride: int = 1) -> Cx:
    """`conv_bias_bn`: conv with bias and no padding, then BN."""
    return norm2d_cx(conv2d_cx(cx, w_in, w_out, kernel, stride, bias=True, padding=0), w_out)


@register_block
class VanillaNetBlock(Block):
    """VanillaNet block: `series(pool(b(σ_λ(a(x)))))`, a = 1x1 conv + BN w_in -> w_in, σ_λ the
    deep-training activation, b = 1x1 conv + BN w_in -> w_out, pool a max-pool of window and
    stride s (absent at s = 1), series the `ActivationSeries`. Deploy form at λ = 1: one 1x1
    conv (R7), pool, ReLU, a depthwise 7x7 conv with bias (R1)."""

    name = "vanillanet"

    @staticmethod
    def complexity(cx: Cx, w_in: int, w_out: int, stride: int, stage: StageSpec) -> Cx:
        """The two 1x1 convs with bias + BN, [the max-pool], the activation series; the
        deep-training activation counts nothing (at λ = 1 it is not in the graph at all)."""
        conv_bias_bn_cx(cx, w_in, w_in)
        conv_bias_bn_cx(cx, w_in, w_out)
        if stride > 1:
            pool2d_cx(cx, w_out, stride, stride, 0)
        return ActivationSeries.complexity(cx, w_out)

    def __init__(self, w_in: int, w_out: int, stride: int, stage: StageSpec):
        super().__init__()
        self.a = conv_bias_bn(w_in, w_in)
        self.deep_act = DeepTrainingActivation()
        self.b = conv_bias_bn(w_in, w_out)
        self.pool = nn.MaxPool2d(stride) if stride > 1 else None
        self.series = ActivationSeries(w_out)

    def forward(self, x: Tensor) -> Tensor:
        x = self.b(self.deep_act(self.a(x)))
        if self.pool is not None:
            x = self.pool(x)
        return self.series(x)
