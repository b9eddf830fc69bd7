"""Layers several block families share, each with its analytic twin beside it: conv + BN,
squeeze-excitation, the projection shortcut, a stage's pool, and the channel shuffle and
stochastic depth (which count nothing); and `set_batch_norm`, which gives the BatchNorms of a
built part the spec's eps and momentum.

SE (`se_ratio` > 0): `x * gate(expand(act(reduce(avgpool(x)))))`, 1x1 convs with bias, act ReLU
(`se_activation`), width round(se_ratio * base) or make_divisible(se_ratio * base, se_divisor),
base = the block input width (`se_base: input`, pycls) or the width SE acts on (`inner`,
MobileNetV3).

shuffle_g(x) moves channel i * (C/g) + j to j * g + i: view (N, g, C/g, H, W), swap dims 1 and 2,
reshape back (written out in `forward`, so graphs show it and the shuffle passes can find it).
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from archc.frontend.blocks.counting import Cx, branch_cx, conv2d_cx, norm2d_cx, pool2d_cx
from archc.frontend.spec import BatchNormSpec, PoolSpec, StageSpec

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "hardswish": nn.Hardswish,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
}
GATES: dict[str, type[nn.Module]] = {"sigmoid": nn.Sigmoid, "hardsigmoid": nn.Hardsigmoid}


def conv_bn(
    w_in: int,
    w_out: int,
    kernel: int,
    stride: int = 1,
    groups: int = 1,
    act: str | None = "relu",
    padding: int | None = None,
) -> nn.Sequential:
    """conv (no bias, padding (k-1)//2 unless given) -> BN -> optional activation, named
    conv/bn/act."""
    padding = (kernel - 1) // 2 if padding is None else padding
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        conv=nn.Conv2d(w_in, w_out, kernel, stride, padding, groups=groups, bias=False),
        bn=nn.BatchNorm2d(w_out, eps=1e-5, momentum=0.1),
    )
    if act is not None:
        layers["act"] = ACTIVATIONS[act]()
    return nn.Sequential(layers)


def set_batch_norm(part: nn.Module, settings: BatchNormSpec | None) -> None:
    """Give every BatchNorm (1d or 2d) in `part` the `eps` and `momentum` of `settings`; None
    keeps each layer's own. eps and momentum are plain attributes of torch's BatchNorm, read at
    every call, so setting them after construction is the same as constructing with them (as
    torchvision's `norm_layer=partial(nn.BatchNorm2d, eps=..., momentum=...)` does)."""
    if settings is None:
        return
    for module in part.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eps, module.momentum = settings.eps, settings.momentum


def conv_bn_cx(cx: Cx, w_in: int, w_out: int, kernel, stride: int = 1, groups: int = 1,
               padding=None) -> Cx:
    """`conv_bn` (or a rectangular kernel's conv + BN): conv without bias, then BN."""
    return norm2d_cx(conv2d_cx(cx, w_in, w_out, kernel, stride, groups, padding=padding), w_out)


class SqueezeExcitation(nn.Module):
    """x * gate(expand(act(reduce(avgpool(x))))), 1x1 convs with bias, act ReLU (SiLU in
    EfficientNet)."""

    def __init__(self, width: int, se_width: int, gate: str = "sigmoid", act: str = "relu"):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(width, se_width, 1, bias=True)
        self.act = ACTIVATIONS[act]()
        self.expand = nn.Conv2d(se_width, width, 1, bias=True)
        self.gate = GATES[gate]()

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gate(self.expand(self.act(self.reduce(self.pool(x)))))


def squeeze_excitation(stage: StageSpec, w_in: int, width: int) -> SqueezeExcitation | None:
    """The stage's SE on `width` channels of a block entered with `w_in`; None if its width is 0."""
    se_width = stage.se_width(w_in, width)
    if se_width == 0:
        return None
    return SqueezeExcitation(width, se_width, stage.se_gate, stage.se_activation)


def squeeze_excitation_cx(cx: Cx, stage: StageSpec, w_in: int, width: int) -> Cx:
    """`squeeze_excitation`: two 1x1 convs with bias at 1x1 (pooled) size."""
    se_width = stage.se_width(w_in, width)
    if se_width == 0:
        return cx

    def squeeze(side: Cx) -> Cx:
        side.h = side.w = 1
        conv2d_cx(side, width, se_width, 1, bias=True)
        return conv2d_cx(side, se_width, width, 1, bias=True)

    return branch_cx(cx, squeeze)


def with_se(f: OrderedDict[str, nn.Module], stage: StageSpec, w_in: int, width: int) -> None:
    """Append the stage's squeeze-excitation on `width` channels to `f`, if it has one."""
    se = squeeze_excitation(stage, w_in, width)
    if se is not None:
        f["se"] = se


def projection(w_in: int, w_out: int, stride: int) -> nn.Module | None:
    """The shortcut of a residual block: None (the identity) when w_in == w_out and stride 1,
    else a 1x1 conv + BN of stride s."""
    if w_in == w_out and stride == 1:
        return None
    return conv_bn(w_in, w_out, 1, stride, act=None)


def projection_cx(cx: Cx, w_in: int, w_out: int, stride: int) -> Cx:
    """`projection`, a side branch."""
    if w_in == w_out and stride == 1:
        return cx
    return branch_cx(cx, lambda side: conv_bn_cx(side, w_in, w_out, 1, stride))


def build_pool(pool: PoolSpec) -> nn.Module:
    """A stage's pool: max- or average pooling (count_include_pad, torch's default)."""
    kind = nn.MaxPool2d if pool.type == "max" else nn.AvgPool2d
    return kind(pool.kernel, pool.stride, pool.padding, ceil_mode=pool.ceil_mode)


def pool_cx(cx: Cx, pool: PoolSpec, width: int) -> Cx:
    """`build_pool` on `width` channels."""
    return pool2d_cx(cx, width, pool.kernel, pool.stride, pool.padding, pool.ceil_mode)


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """ShuffleNet's channel shuffle: channel i * (C/g) + j moves to j * g + i."""
    batch, channels, height, width = x.size()
    x = x.view(batch, groups, channels // groups, height, width)
    return x.transpose(1, 2).reshape(batch, channels, height, width)


class StochasticDepth(nn.Module):
    """Stochastic depth (Huang et al. 2016) on a residual branch: in training mode a sample's
    branch output is zeroed with probability p and the kept ones scaled by 1 / (1 - p); the
    identity in eval mode, so traced (eval) graphs do not contain it."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)
