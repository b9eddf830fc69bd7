"""Registered building blocks, stems and heads (as pycls' AnyNet).

A block type is one class registered with `@register_block`: it names itself, lists the optional
stage fields it reads (`uses`), checks a stage given the width entering it (`check`, returning the
offending field and why) and builds itself from `(w_in, w_out, stride, stage)`; `stage_at` may
vary the fields along a stage (RepViT's SE in alternate blocks). The spec loader calls
`check_stage`, so a stage a block cannot build is a spec error, not a shape error deep inside
torch.

Module naming is part of the contract (qualified names in graphs, checkpoints and reports):
`stem.conv`, `s1.b1.proj.conv`, `s1.b1.f.a.conv`, `s1.b1.f.se.reduce`, `s2.pool`, `head.fc`, ...

Notation: s = stride, act = the stage's activation, BN after every conv, convs without bias and
with padding (k-1)//2; proj = 1x1 conv stride s + BN, present only when w_in != w_out or s != 1;
k = the stage's `kernel`.

- `res_bottleneck` (RegNetX/Y, ResNet-50 v1.5, ResNeXt): `act(proj(x) + c(se(b(a(x)))))`, a = 1x1
  w_in->w_b act, b = 3x3 stride s (v1.5: the stride is on the 3x3) with w_b/g groups (or `groups`)
  act, c = 1x1 w_b->w_out; w_b = round(w_out * bottleneck_multiplier). `se_position: output`
  moves SE after c (SE-ResNet).
- `res_basic` (ResNet-18/34): `act(proj(x) + se(b(a(x))))`, a = 3x3 stride s act, b = 3x3.
- `vanilla`: `b(a(x))`, a = 3x3 stride s act, b = 3x3 act.
- `dw_separable` (MobileNetV1): `pw(se(dw(x)))`, dw = 3x3 depthwise stride s act, pw = 1x1 act.
- `inverted_residual` (MobileNetV2/V3, EfficientNet's MBConv): `[x +] project(se(dw(expand(x))))`,
  h = round(t * w_in), expand = 1x1 w_in->h act (absent when t = 1), dw = kxk depthwise stride s
  act, project = 1x1 h->w_out with no activation (linear bottleneck); the residual only when
  s = 1 and w_in = w_out (with stochastic depth in training); `remove_activations`: DepthShrinker.
- `shufflenet_v1`: f = c(b(shuffle_g(a(x)))), a = 1x1 w_in->m with g groups act, b = 3x3
  depthwise stride s, c = 1x1 m->w_f with g groups, m = round(w_out * bottleneck_multiplier).
  s = 1: `act(x + f(x))`, w_f = w_out; s > 1: `act(cat(avgpool3x3_s(x), f(x)))`, w_f = w_out - w_in.
- `shufflenet_v2`, h = w_out / 2: s = 1: `shuffle_2(cat(x1, f(x2)))` with (x1, x2) the channel
  halves of x; s > 1: `shuffle_2(cat(g(x), f(x)))`; f = 1x1 ->h act, 3x3 depthwise stride s,
  1x1 h->h act; g = 3x3 depthwise stride s, 1x1 w_in->h act.
- `reducenet`: `c(branch1(x) + branch2(x)) + proj(x)` (train phase) or `c(branch2(x)) + proj(x)`
  (reduced phase, branch1 not built), branch1 = 3x3 stride s w_in->e act, 1x1 e->w_out act with
  e = round(expansion * w_out); branch2 = 3x3 stride s act; c = 3x3 (no activation).
- Without BN (AlexNet, SqueezeNet), convs with bias: `conv` = act(kxk conv), `fire` =
  cat(e1(s(x)), e3(s(x))).
- Train forms that `archc fuse` re-parameterizes: `repvgg`, `qarepvgg`, `acb`, `dbb`,
  `mobileone`, `qamobileone`, `mobileone_unit`, `repmixer` (FastViT), `repvit`, `vanillanet`
  (each class states its math; the `qa` variants place the BNs as QARepVGG, for int8).

shuffle_g(x) moves channel i * (C/g) + j to j * g + i: view (N, g, C/g, H, W), swap dims 1 and 2,
reshape back (written out in `forward`, so graphs show it and the shuffle passes can find it).
SE (`se_ratio` > 0): `x * gate(expand(act(reduce(avgpool(x)))))`, 1x1 convs with bias, act ReLU
(`se_activation`), width round(se_ratio * base) or make_divisible(se_ratio * base, se_divisor),
base = the block input width (`se_base: input`, pycls) or the width SE acts on (`inner`,
MobileNetV3).
"""

from __future__ import annotations

import difflib
from collections import OrderedDict
from typing import ClassVar

import torch
from torch import Tensor, nn

from archc.errors import SpecError
from archc.frontend.spec import HeadSpec, PoolSpec, StageSpec, StemSpec, se_in_alternate_blocks
from archc.ir.modules import LayerScale

BLOCKS: dict[str, type[Block]] = {}
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "hardswish": nn.Hardswish,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
}
GATES: dict[str, type[nn.Module]] = {"sigmoid": nn.Sigmoid, "hardsigmoid": nn.Hardsigmoid}
SE_FIELDS = frozenset({"se_ratio", "se_base", "se_divisor", "se_gate", "se_activation"})
# stage fields every block has: the stage's shape, and the pool after its last block
STAGE_FIELDS = frozenset({"block", "depth", "width", "stride", "pool"})
BOTTLENECK_FIELDS = frozenset({"bottleneck_multiplier", "bottleneck_ratio"})


def register_block(cls: type[Block]) -> type[Block]:
    BLOCKS[cls.name] = cls
    return cls


def check_stage(block: str, stage: StageSpec | None, path: str, w_in: int = 0) -> None:
    """Raise `SpecError` if `block` is unknown or cannot build `stage` entered with width `w_in`
    (stage None: check the name only)."""
    if block not in BLOCKS:
        close = difflib.get_close_matches(block, list(BLOCKS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        field = path if path.endswith(".block") else f"{path}.block"
        raise SpecError(f"unknown block {block!r}{hint}; registered: {', '.join(BLOCKS)}", field)
    if stage is None:
        return
    cls = BLOCKS[block]
    optional = set(type(stage).model_fields) - STAGE_FIELDS
    unused = sorted(
        field
        for field in optional - cls.uses
        if getattr(stage, field) != type(stage).model_fields[field].default
    )
    if unused:
        raise SpecError(f"block {block!r} does not use this field", f"{path}.{unused[0]}")
    problem = cls.check(stage, w_in)
    if problem is not None:
        field, message = problem
        raise SpecError(message, f"{path}.{field}")


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


class Block(nn.Module):
    """Base class of registered blocks."""

    name: ClassVar[str]
    uses: ClassVar[frozenset[str]] = frozenset()  # optional stage fields the block reads
    # whether the block has a residual branch that `drop_path_rate` may drop: the network then
    # sets its `drop_path` to a `StochasticDepth`
    stochastic_depth: ClassVar[bool] = False

    @classmethod
    def check(cls, stage: StageSpec, w_in: int) -> tuple[str, str] | None:
        """(field, why) if the stage cannot be built when entered with `w_in` channels."""
        return None

    @classmethod
    def stage_at(cls, stage: StageSpec, index: int) -> StageSpec:
        """The stage fields block `index` (0-based) of the stage is built with: the stage's own,
        unless the architecture varies them along the stage (RepViT's SE in alternate blocks)."""
        return stage

    @staticmethod
    def projection(w_in: int, w_out: int, stride: int) -> nn.Module | None:
        if w_in == w_out and stride == 1:
            return None
        return conv_bn(w_in, w_out, 1, stride, act=None)


class Residual(Block):
    """`act(proj(x) + f(x))`: subclasses build `proj` (None: the identity), `f` and `act`."""

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.proj is None else self.proj(x)
        return self.act(shortcut + self.f(x))


def _with_se(f: OrderedDict[str, nn.Module], stage: StageSpec, w_in: int, width: int) -> None:
    """Append the stage's squeeze-excitation on `width` channels to `f`, if it has one."""
    se = squeeze_excitation(stage, w_in, width)
    if se is not None:
        f["se"] = se


@register_block
class ResBottleneck(Residual):
    name = "res_bottleneck"
    uses = SE_FIELDS | BOTTLENECK_FIELDS | {"group_width", "groups", "activation", "se_position"}

    @staticmethod
    def bottleneck_width(stage: StageSpec) -> int:
        return int(round(stage.width * stage.bottleneck))

    @classmethod
    def check(cls, stage, w_in):
        w_b = cls.bottleneck_width(stage)
        if w_b < 1:
            return (
                "bottleneck_multiplier",
                f"bottleneck width round({stage.width} * {stage.bottleneck}) is 0",
            )
        which = "group_width" if stage.group_width is not None else "groups"
        divisor = stage.group_width or stage.groups
        if divisor is not None and w_b % divisor:
            return which, (
                f"bottleneck width {w_b} (width {stage.width} x bottleneck {stage.bottleneck:g}) "
                f"is not divisible by {which} {divisor}"
            )
        return None

    def __init__(self, w_in: int, w_out: int, stride: int, stage: StageSpec):
        super().__init__()
        w_b = self.bottleneck_width(stage)
        groups = w_b // stage.group_width if stage.group_width else stage.groups or 1
        act = stage.activation
        self.proj = self.projection(w_in, w_out, stride)
        f: OrderedDict[str, nn.Module] = OrderedDict(
            a=conv_bn(w_in, w_b, 1, act=act), b=conv_bn(w_b, w_b, 3, stride, groups, act)
        )
        if stage.se_position == "inner":
            _with_se(f, stage, w_in, w_b)
        f["c"] = conv_bn(w_b, w_out, 1, act=None)
        if stage.se_position == "output":
            _with_se(f, stage, w_in, w_out)
        self.f = nn.Sequential(f)
        self.act = ACTIVATIONS[act]()


@register_block
class ResBasic(Residual):
    name = "res_basic"
    uses = SE_FIELDS | {"activation"}

    def __init__(self, w_in: int, w_out: int, stride: int, stage: StageSpec):
        super().__init__()
        act = stage.activation
        self.proj = self.projection(w_in, w_out, stride)
        f: OrderedDict[str, nn.Module] = OrderedDict(
            a=conv_bn(w_in, w_out, 3, stride, act=act), b=conv_bn(w_out, w_out, 3, act=None)
        )
        _with_se(f, stage, w_in, w_out)
        self.f = nn.Sequential(f)
        self.act = ACTIVATIONS[act]()


@register_block
class Vanilla(Block):
    name = "vanilla"
    uses = frozenset({"activation"})

    def __init__(self, w_in: int, w_out: int, stride: int, stage: StageSpec):
        super().__init__()
        self.a = conv_bn(w_in, w_out, 3, stride, act=stage.activation)
        self.b = conv_bn(w_out, w_out, 3, act=stage.activation)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(self.a(x))


# ---------------------------------------------------------------------------------------------
# Lightweight blocks: depthwise convs, inverted residuals, channel shuffle, ReduceNet.


@register_block
class DepthwiseSeparable(Block):
    """MobileNetV1 (Howard et al. 2017): `pw(se(dw(x)))`."""

    name = "dw_separable"
    uses = SE_FIELDS | {"activation"}

    def __init__(self, w_in: int, w_out: int, stride: int, stage: StageSpec):
        super().__init__()
        self.dw = conv_bn(w_in, w_in, 3, stride, w_in, stage.activation)
        self.se = squeeze_excitation(stage, w_in, w_in)
        self.pw = conv_bn(w_in, w_out, 1, act=stage.activation)

    def forward(self, x: Tensor) -> Tensor:
        x = self.dw(x)
        if self.se is not None:
            x = self.se(x)
        return self.pw(x)


@register_block
class InvertedResidual(Block):
    """MobileNetV2 (Sandler et al. 2018), MobileNetV3's and EfficientNet's MBConv:
    `[x +] project(se(dw(expand(x))))`, as torchvision: h = int(round(t * w_in)), no expand conv
    exactly when t = 1, a `kernel` x `kernel` depthwise conv.

    With `remove_activations` (DepthShrinker, Fu et al. 2022) the block has no activation and is
    linear, `[x +] project(dw(expand(x)))`; its expand conv zero-pads by (k - 1) / 2 and the
    depthwise conv does not pad, so the block is exactly one dense k x k conv of x (zero-padded
    by (k - 1) / 2), border included, which `archc fuse` can merge it into (R6, R7). Without
    that move the border would read the expand conv's bias instead of 0 (docs/rewrites.md, R6)."""

    name = "inverted_residual"
    uses = SE_FIELDS | {"expansion", "activation", "kernel", "remove_activations"}
    stochastic_depth = True

    @classmethod
    def check(cls, stage, w_in):
        for width in (w_in, stage.width):
            if int(round(stage.expansion * width)) < 1:
                return "expansion", f"hidden width round({stage.expansion:g} * {width}) is 0"
        if stage.remove_activations and stage.se_ratio:
            return "remove_activations", (
                "a block with squeeze-excitation is not linear without its activations: "
                "set se_ratio to 0")
        return None

    def __init__(self, w_in: int, w_out: int, stride: int, stage: StageSpec):
        super().__init__()
        hidden = int(round(stage.expansion * w_in))
        act = None if stage.remove_activations else stage.activation
        moved = stage.remove_activations and stage.expansion != 1  # the expand conv pads
        pad = (stage.kernel - 1) // 2
        f: OrderedDict[str, nn.Module] = OrderedDict()
        if stage.expansion != 1:
            f["expand"] = conv_bn(w_in, hidden, 1, act=act, padding=pad if moved else 0)
        f["dw"] = conv_bn(hidden, hidden, stage.kernel, stride, hidden, act,
                          padding=0 if moved else pad)
        _with_se(f, stage, w_in, hidden)
        f["project"] = conv_bn(hidden, w_out, 1, act=None)
        self.f = nn.Sequential(f)
        self.residual = stride == 1 and w_in == w_out
        self.drop_path: StochasticDepth | None = None  # set by the network (drop_path_rate)

    def forward(self, x: Tensor) -> Tensor:
        if not self.residual:
            return self.f(x)
        y = self.f(x)
        if self.drop_path is not None:
            y = self.drop_path(y)
        return x + y


@register_block
class ShuffleNetV1(Block):
    """ShuffleNet unit (Zhang et al. 2018, Fig. 2 b/c). With `dense_first` the first 1x1 conv of
    the stage's first (strided) unit is dense and not followed by a shuffle (the paper's Stage 2,
    whose input has only 24 channels)."""

    name = "shufflenet_v1"
    uses = BOTTLENECK_FIELDS | {"groups", "dense_first", "activation"}

    @classmethod
    def check(cls, stage, w_in):
        g, width = stage.groups or 1, stage.width
        mid = int(round(width * stage.bottleneck))
        if stage.stride == 1 and w_in != width:
            return "width", (
                f"a stride-1 shufflenet_v1 unit adds its input: width {width} must equal the "
                f"input width {w_in}"
            )
        if stage.stride > 1 and width <= w_in:
            return "width", (
                f"a strided shufflenet_v1 unit concatenates its input: width {width} must exceed "
                f"the input width {w_in}"
            )
        if stage.dense_first and stage.stride == 1:
            return "dense_first", "dense_first applies to a strided stage's first unit"
        divisible = [(mid, "bottleneck width"), (width, "width")]
        if stage.stride > 1:  # then the input width is a multiple too, unless dense_first
            divisible.append((width - w_in, f"width - input width = {width} - {w_in} ="))
        for value, what in divisible:
            if value < 1 or value % g:
                return "groups", f"{what} {value} is not a positive multiple of groups {g}"
        return None

    def __init__(self, w_in: int, w_out: int, stride: int, stage: StageSpec):
        super().__init__()
        groups = stage.groups or 1
        mid = int(round(w_out * stage.bottleneck))
        self.shuffle_groups = 1 if stage.dense_first and stride > 1 else groups
        self.a = conv_bn(w_in, mid, 1, groups=self.shuffle_groups, act=stage.activation)
        self.b = conv_bn(mid, mid, 3, stride, mid, act=None)
        self.c = conv_bn(mid, w_out - w_in if stride > 1 else w_out, 1, groups=groups, act=None)
        self.pool = nn.AvgPool2d(3, stride, padding=1) if stride > 1 else None
        self.act = ACTIVATIONS[stage.activation]()

    def forward(self, x: Tensor) -> Tensor:
        y = self.a(x)
        if self.shuffle_groups > 1:
            y = channel_shuffle(y, self.shuffle_groups)
        y = self.c(self.b(y))
        if self.pool is None:
            return self.act(x + y)
        return self.act(torch.cat([self.pool(x), y], 1))


@register_block
class ShuffleNetV2(Block):
    """ShuffleNet V2 unit (Ma et al. 2018, Fig. 3 c/d), as torchvision's `InvertedResidual`."""

    name = "shufflenet_v2"
    uses = frozenset({"activation"})

    @classmethod
    def check(cls, stage, w_in):
        if stage.width % 2:
            return "width", f"shufflenet_v2 splits channels in halves: width {stage.width} is odd"
        if stage.stride == 1 and w_in != stage.width:
            return "width", (
                f"a stride-1 shufflenet_v2 unit splits its input: width {stage.width} must equal "
                f"the input width {w_in}"
            )
        return None

    def __init__(self, w_in: int, w_out: int, stride: int, stage: StageSpec):
        super().__init__()
        half, act = w_out // 2, stage.activation
        self.branch1 = None
        if stride > 1:
            self.branch1 = nn.Sequential(
                OrderedDict(
                    dw=conv_bn(w_in, w_in, 3, stride, w_in, act=None),
                    pw=conv_bn(w_in, half, 1, act=act),
                )
            )
        self.branch2 = nn.Sequential(
            OrderedDict(
                a=conv_bn(w_in if stride > 1 else half, half, 1, act=act),
                b=conv_bn(half, half, 3, stride, half, act=None),
                c=conv_bn(half, half, 1, act=act),
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.branch1 is None:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat([x1, self.branch2(x2)], 1)
        else:
            out = torch.cat([self.branch1(x), self.branch2(x)], 1)
        return channel_shuffle(out, 2)


@register_block
class ReduceNet(Block):
    """ReduceNet block (seed 004; github.com/ohmydroid/reducenet): `c(scaler * branch1(x) +
    branch2(x)) + proj(x)`, no activation after the sum. The train phase is scaler 1; the reduced
    phase is scaler 0, built without branch1 (its modules do not exist), so every other module has
    the same name in both phases and a train-phase checkpoint loads into the reduced model."""

    name = "reducenet"
    uses = frozenset({"expansion", "phase", "activation"})

    @classmethod
    def check(cls, stage, w_in):
        if int(round(stage.expansion * stage.width)) < 1:
            return "expansion", f"branch1 width round({stage.expansion:g} * {stage.width}) is 0"
        return None

    def __init__(self, w_in: int, w_out: int, stride: int, stage: StageSpec):
        super().__init__()
        act = stage.activation
        self.branch1 = None
        if stage.phase == "train":
            expanded = int(round(stage.expansion * w_out))
            self.branch1 = nn.Sequential(
                OrderedDict(
                    a=conv_bn(w_in, expanded, 3, stride, act=act),
                    b=conv_bn(expanded, w_out, 1, act=act),
                )
            )
        self.branch2 = conv_bn(w_in, w_out, 3, stride, act=act)
        self.c = conv_bn(w_out, w_out, 3, act=None)
        self.proj = self.projection(w_in, w_out, stride)

    def forward(self, x: Tensor) -> Tensor:
        y = self.branch2(x)
        if self.branch1 is not None:
            y = self.branch1(x) + y
        shortcut = x if self.proj is None else self.proj(x)
        return self.c(y) + shortcut


# ---------------------------------------------------------------------------------------------
# Networks without BatchNorm (AlexNet, SqueezeNet): convs with bias.


def conv_act(w_in: int, w_out: int, kernel: int, stride: int = 1, padding: int | None = None,
             groups: int = 1, act: str = "relu") -> nn.Sequential:
    """conv with bias (padding (k-1)//2 unless given) -> activation, named conv/act."""
    padding = (kernel - 1) // 2 if padding is None else padding
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(w_in, w_out, kernel, stride, padding, groups=groups, bias=True),
        act=ACTIVATIONS[act](),
    ))


@register_block
class Conv(Block):
    """A plain conv layer, `act(conv(x))`, kernel x kernel with bias, no BN (AlexNet: Krizhevsky
    et al. 2012, groups 2 for the paper's two towers; SqueezeNet's first conv)."""

    name = "conv"
    uses = frozenset({"kernel", "padding", "groups", "activation"})

    @classmethod
    def check(cls, stage, w_in):
        groups = stage.groups or 1
        for width, what in ((w_in, "input width"), (stage.width, "width")):
            if width % groups:
                return "groups", f"{what} {width} is not divisible by groups {groups}"
        if stage.padding is not None and stage.padding > stage.kernel // 2:
            return "padding", f"padding {stage.padding} is more than half the kernel {stage.kernel}"
        return None

    def __init__(self, w_in: int, w_out: int, stride: int, stage: StageSpec):
        super().__init__()
        layer = conv_act(w_in, w_out, stage.kernel, stride, stage.padding, stage.groups or 1,
                         stage.activation)
        self.conv, self.act = layer.conv, layer.act

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.conv(x))


@register_block
class Fire(Block):
    """SqueezeNet's fire module (Iandola et al. 2016): `cat(e1(s(x)), e3(s(x)))`, squeeze s = 1x1
    w_in -> w_s ReLU with w_s = round(width * bottleneck_multiplier) (1/8 in SqueezeNet), expand
    e1 = 1x1 and e3 = 3x3 (padding 1), each w_s -> width / 2 ReLU; every conv with bias, no BN.
    Stride 1: SqueezeNet downsamples with the stages' pools."""

    name = "fire"
    uses = BOTTLENECK_FIELDS

    @classmethod
    def check(cls, stage, w_in):
        if stage.stride != 1:
            return "stride", "a fire module has stride 1: downsample with the stage's pool"
        if stage.width % 2:
            return "width", (f"a fire module concatenates two equal expand convs: width "
                             f"{stage.width} is odd")
        if int(round(stage.width * stage.bottleneck)) < 1:
            return "bottleneck_multiplier", (
                f"squeeze width round({stage.width} * {stage.bottleneck:g}) is 0")
        return None

    def __init__(self, w_in: int, w_out: int, stride: int, stage: StageSpec):
        super().__init__()
        squeeze = int(round(w_out * stage.bottleneck))
        self.squeeze = conv_act(w_in, squeeze, 1)
        self.expand1x1 = conv_act(squeeze, w_out // 2, 1)
        self.expand3x3 = conv_act(squeeze, w_out // 2, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.squeeze(x)
        return torch.cat([self.expand1x1(x), self.expand3x3(x)], 1)


# ---------------------------------------------------------------------------------------------
# Train-form (over-parameterized) blocks: several linear branches that the passes collapse into
# one conv per block (structural re-parameterization, R1-R9 of docs/rewrites.md).


class TrainFormBlock(Block):
    """`act(sum of branches(x))`: every branch is linear in x; checks the input width's groups."""

    uses = frozenset({"group_width"})

    @classmethod
    def check(cls, stage, w_in):
        if stage.group_width is not None and stage.width % stage.group_width:
            return "group_width", (
                f"width {stage.width} is not divisible by group_width {stage.group_width}"
            )
        groups = stage.train_form_groups(w_in)
        if stage.width % groups:
            return "width", (
                f"width {stage.width} is not divisible by the {groups} groups of the input "
                f"width {w_in} at group_width {stage.group_width}"
            )
        return None

    def branch_outputs(self, x: Tensor) -> list[Tensor]:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        outputs = self.branch_outputs(x)
        total = outputs[0]
        for output in outputs[1:]:
            total = total + output
        return self.act(total)


@register_block
class RepVGG(TrainFormBlock):
    """RepVGG (Ding et al. 2021): relu(BN(3x3 x) + BN(1x1 x) + BN(x)), the identity branch only
    when w_in == w_out and stride 1. Deploy form: one 3x3 conv with bias."""

    name = "repvgg"

    def __init__(self, w_in: int, w_out: int, stride: int, stage: StageSpec):
        super().__init__()
        groups = stage.train_form_groups(w_in)
        self.conv3x3 = conv_bn(w_in, w_out, 3, stride, groups, act=None)
        self.conv1x1 = conv_bn(w_in, w_out, 1, stride, groups, act=None)
        self.identity = nn.BatchNorm2d(w_out) if w_in == w_out and stride == 1 else None
        self.act = nn.ReLU()

    def branch_outputs(self, x):
        outputs = [self.conv3x3(x), self.conv1x1(x)]
        if self.identity is not None:
            outputs.append(self.identity(x))
        return outputs


@register_block
class QARepVGG(TrainFormBlock):
    """QARepVGG (Chu et al. 2023, "Make RepVGG Greater Again: A Quantization-aware Approach"):
    relu(BN(BN(3x3 x) + 1x1 x + x)), the identity only when w_in == w_out and stride 1.

    The BatchNorm placement is what makes the fused kernel quantize well: RepVGG's identity BN
    adds gamma / sqrt(var + eps) to the centre tap of each output channel, and where a channel's
    variance is small that entry dwarfs the rest of the fused 3x3 kernel, so one int8 scale per
    channel must span an outlier (RepVGG-A0 is reported to drop from ~72% to ~52% top-1 under
    plain PTQ). Here the 1x1 and identity branches carry no BN (their sum enters the kernel with
    weight 1 and the 1x1's trained weights), and one BN after the sum scales the whole block, so
    no branch can blow up a single tap. Deploy form: still one 3x3 conv with bias: fold the 3x3's
    BN, merge the three linear branches into one conv, fold the BN after the sum into it."""

    name = "qarepvgg"

    def __init__(self, w_in: int, w_out: int, stride: int, stage: StageSpec):
        super().__init__()
        groups = stage.train_form_groups(w_in)
        self.conv3x3 = conv_bn(w_in, w_out, 3, stride, groups, act=None)
        self.conv1x1 = nn.Conv2d(w_in, w_out, 1, stride, 0, groups=groups, bias=False)
        self.identity = w_in == w_out and stride == 1
        self.bn = nn.BatchNorm2d(w_out)
        self.act = nn.ReLU()

    def branch_outputs(self, x):
        outputs = [self.conv3x3(x), self.conv1x1(x)]
        if self.identity:
            outputs.append(x)
        return outputs

    def forward(self, x: Tensor) -> Tensor:
        outputs = self.branch_outputs(x)
        total = outputs[0]
        for output in outputs[1:]:
            total = total + output
        return self.act(self.bn(total))


@register_block
class ACB(TrainFormBlock):
    """ACNet's asymmetric convolution block (Ding et al. 2019): relu(BN(3x3 x) + BN(1x3 x) +
    BN(3x1 x)). Deploy form: one 3x3 conv with bias (1x3 and 3x1 centre-embedded)."""

    name = "acb"

    def __init__(self, w_in: int, w_out: int, stride: int, stage: StageSpec):
        super().__init__()
        groups = stage.train_form_groups(w_in)
        self.square = conv_bn(w_in, w_out, 3, stride, groups, act=None)
        self.horizontal = _conv_bn_rect(w_in, w_out, (1, 3), stride, groups)
        self.vertical = _conv_bn_rect(w_in, w_out, (3, 1), stride, groups)
        self.act = nn.ReLU()

    def branch_outputs(self, x):
        return [self.square(x), self.horizontal(x), self.vertical(x)]


def _conv_bn_rect(
    w_in: int, w_out: int, kernel: tuple[int, int], stride: int, groups: int
) -> nn.Sequential:
    padding = ((kernel[0] - 1) // 2, (kernel[1] - 1) // 2)
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(w_in, w_out, kernel, stride, padding, groups=groups, bias=False),
            bn=nn.BatchNorm2d(w_out),
        )
    )


@register_block
class DBB(TrainFormBlock):
    """Diverse Branch Block (Ding et al. 2021), KxK = 3:
    relu(BN(3x3 x) + BN(1x1 x) + BN(avg3x3(BN(1x1 x))) + BN(3x3'(BN(1x1 x)))).

    DBB's BNAndPad (pad the BN output with BN(0)) is written with standard ops: the 1x1 convs of
    the avg and 1x1->3x3 branches zero-pad by 1 and have no bias, so BN sees zeros at the border
    and emits BN(0) there; the avg-pool and the 3x3' then use no padding. This is exactly DBB's
    train form, and it makes the sequential merges exact (docs/rewrites.md: R6 border trap,
    R8 p2 = 0). Deploy form: one 3x3 conv with bias."""

    name = "dbb"

    def __init__(self, w_in: int, w_out: int, stride: int, stage: StageSpec):
        super().__init__()
        groups = stage.train_form_groups(w_in)
        self.square = conv_bn(w_in, w_out, 3, stride, groups, act=None)
        self.pointwise = conv_bn(w_in, w_out, 1, stride, groups, act=None)
        self.avg = nn.Sequential(
            OrderedDict(
                conv=nn.Conv2d(w_in, w_out, 1, padding=1, groups=groups, bias=False),
                bn=nn.BatchNorm2d(w_out),
                pool=nn.AvgPool2d(3, stride, padding=0),
                pool_bn=nn.BatchNorm2d(w_out),
            )
        )
        self.pointwise_square = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(w_in, w_in, 1, padding=1, groups=groups, bias=False),
                bn1=nn.BatchNorm2d(w_in),
                conv2=nn.Conv2d(w_in, w_out, 3, stride, padding=0, groups=groups, bias=False),
                bn2=nn.BatchNorm2d(w_out),
            )
        )
        self.act = nn.ReLU()

    def branch_outputs(self, x):
        return [self.square(x), self.pointwise(x), self.avg(x), self.pointwise_square(x)]


class MobileOneUnit(nn.Module):
    """One MobileOne re-parameterizable conv: act(se(Σ_k BN(KxK_k x) + BN(1x1 x) + BN(x))), the
    1x1 'scale' branch only when K > 1, the identity BN only when shapes allow; `act` None: no
    activation (FastViT's RepMixer), `se` None: no squeeze-excitation. `post_bn` (QARepVGG's
    placement, see `QARepVGG`): act(se(BN(Σ_k BN(KxK_k x) + 1x1 x + x))), no BN on the scale and
    identity branches, one BN after the sum."""

    def __init__(self, w_in: int, w_out: int, kernel: int, stride: int, groups: int,
                 branches: int, act: str | None = "relu", se: SqueezeExcitation | None = None,
                 post_bn: bool = False):
        super().__init__()
        self.convs = nn.ModuleList(
            conv_bn(w_in, w_out, kernel, stride, groups, act=None) for _ in range(branches)
        )
        shapes_match = w_in == w_out and stride == 1
        if post_bn:
            self.scale = (nn.Conv2d(w_in, w_out, 1, stride, 0, groups=groups, bias=False)
                          if kernel > 1 else None)
            self.identity = nn.Identity() if shapes_match else None
            self.bn = nn.BatchNorm2d(w_out)
        else:
            self.scale = (conv_bn(w_in, w_out, 1, stride, groups, act=None) if kernel > 1
                          else None)
            self.identity = nn.BatchNorm2d(w_out) if shapes_match else None
            self.bn = None
        self.se = se
        self.act = None if act is None else ACTIVATIONS[act]()

    def forward(self, x: Tensor) -> Tensor:
        total = self.convs[0](x)
        for conv in self.convs[1:]:
            total = total + conv(x)
        if self.scale is not None:
            total = total + self.scale(x)
        if self.identity is not None:
            total = total + self.identity(x)
        if self.bn is not None:
            total = self.bn(total)
        if self.se is not None:
            total = self.se(total)
        return total if self.act is None else self.act(total)


@register_block
class MobileOne(Block):
    """MobileOne block (Vasu et al. 2023): a depthwise 3x3 unit (stride s) then a pointwise 1x1
    unit, each with k over-parameterized conv branches (`branches`). Deploy form: a depthwise 3x3
    conv and a 1x1 conv, each with bias, each followed by ReLU."""

    name = "mobileone"
    uses = frozenset({"branches"})

    def __init__(self, w_in: int, w_out: int, stride: int, stage: StageSpec):
        super().__init__()
        branches = stage.branches or 1
        self.depthwise = MobileOneUnit(w_in, w_in, 3, stride, w_in, branches)
        self.pointwise = MobileOneUnit(w_in, w_out, 1, 1, 1, branches)

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise(self.depthwise(x))


@register_block
class QAMobileOne(MobileOne):
    """MobileOne with QARepVGG's BatchNorm placement in both units (`MobileOneUnit(post_bn)`):
    depthwise `relu(BN(Σ_k BN(dw3x3_k x) + dw1x1 x + x))`, pointwise `relu(BN(Σ_k BN(1x1_k x) +
    x))`. Deploy form as `mobileone`: a depthwise 3x3 and a 1x1 conv, each with bias."""

    name = "qamobileone"

    def __init__(self, w_in: int, w_out: int, stride: int, stage: StageSpec):
        Block.__init__(self)
        branches = stage.branches or 1
        self.depthwise = MobileOneUnit(w_in, w_in, 3, stride, w_in, branches, post_bn=True)
        self.pointwise = MobileOneUnit(w_in, w_out, 1, 1, 1, branches, post_bn=True)


@register_block
class MobileOneConv(Block):
    """One MobileOne unit as a block (`MobileOneUnit`): the stem of MobileOne (its Stage 1, a
    dense 3x3 stride 2) and FastViT's final conv (3x3 with group_width 1, i.e. one input channel
    per group, and SE). Deploy form: one conv with bias, [SE], act."""

    name = "mobileone_unit"
    uses = SE_FIELDS | {"kernel", "branches", "group_width", "groups", "activation"}

    @classmethod
    def check(cls, stage, w_in):
        which = "group_width" if stage.group_width else "groups"
        if stage.group_width and w_in % stage.group_width:
            return which, f"input width {w_in} is not divisible by group_width {stage.group_width}"
        groups = stage.unit_groups(w_in)
        for width, what in ((w_in, "input width"), (stage.width, "width")):
            if width % groups:
                return which, f"{what} {width} is not divisible by {groups} groups"
        return None

    def __init__(self, w_in: int, w_out: int, stride: int, stage: StageSpec):
        super().__init__()
        self.unit = MobileOneUnit(w_in, w_out, stage.kernel, stride, stage.unit_groups(w_in),
                                  stage.branches or 1, stage.activation,
                                  squeeze_excitation(stage, w_in, w_out))

    def forward(self, x: Tensor) -> Tensor:
        return self.unit(x)


class PatchEmbed(nn.Module):
    """FastViT's downsampling (Vasu et al. 2023): `pointwise(large(x) + small(x))`, large = 7x7
    and small = 3x3 conv + BN stride s with one input channel per group (w_in groups), then a
    1x1 MobileOne unit with act."""

    def __init__(self, w_in: int, w_out: int, stride: int, act: str):
        super().__init__()
        self.large = conv_bn(w_in, w_out, 7, stride, w_in, act=None)
        self.small = conv_bn(w_in, w_out, 3, stride, w_in, act=None)
        self.pointwise = MobileOneUnit(w_out, w_out, 1, 1, 1, 1, act)

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise(self.large(x) + self.small(x))


@register_block
class RepMixer(Block):
    """FastViT's RepMixer block (Vasu et al. 2023), with w = w_out:

        y = x + γ1 · (mixer(x) - norm(x))        mixer: depthwise kxk MobileOne unit, no act
        out = y + γ2 · ffn(y)                    ffn: dw 7x7 + BN, 1x1 w -> t w, act, 1x1 -> w

    norm is a BN (the identity branch of a MobileOne unit without conv branches), the 1x1 convs
    of the ConvFFN have bias, γ1, γ2 are `LayerScale`s (absent when `layer_scale` is None). The
    first block of a strided stage (or one that changes the width) starts with a `PatchEmbed`.
    Deploy form: the token mixer is one depthwise kxk conv with bias (R1, R3, R4, R5 with the
    layer scale as a constant factor)."""

    name = "repmixer"
    uses = frozenset({"kernel", "expansion", "layer_scale", "activation"})

    @classmethod
    def check(cls, stage, w_in):
        if (stage.stride > 1 or w_in != stage.width) and stage.width % w_in:
            return "width", (f"a patch embedding has one input channel per group: width "
                             f"{stage.width} is not a multiple of the input width {w_in}")
        if int(stage.width * stage.expansion) < 1:
            return "expansion", f"ConvFFN width int({stage.width} * {stage.expansion:g}) is 0"
        return None

    def __init__(self, w_in: int, w_out: int, stride: int, stage: StageSpec):
        super().__init__()
        act = stage.activation
        self.embed = PatchEmbed(w_in, w_out, stride, act) if stride > 1 or w_in != w_out else None
        self.mixer = MobileOneUnit(w_out, w_out, stage.kernel, 1, w_out, 1, act=None)
        self.norm = nn.BatchNorm2d(w_out)
        hidden = int(w_out * stage.expansion)
        self.ffn = nn.Sequential(OrderedDict(
            conv=conv_bn(w_out, w_out, 7, 1, w_out, act=None),
            fc1=nn.Conv2d(w_out, hidden, 1, bias=True),
            act=ACTIVATIONS[act](),
            fc2=nn.Conv2d(hidden, w_out, 1, bias=True),
        ))
        scale = stage.layer_scale
        self.mixer_scale = None if scale is None else LayerScale(w_out, scale)
        self.ffn_scale = None if scale is None else LayerScale(w_out, scale)

    def forward(self, x: Tensor) -> Tensor:
        if self.embed is not None:
            x = self.embed(x)
        mixed = self.mixer(x) - self.norm(x)
        x = x + (mixed if self.mixer_scale is None else self.mixer_scale(mixed))
        y = self.ffn(x)
        return x + (y if self.ffn_scale is None else self.ffn_scale(y))


class RepVGGDepthwise(nn.Module):
    """RepViT's token mixer: BN(BN(dw kxk x) + dw1x1(x) + x), the 1x1 with bias and no BN of its
    own, one BN after the sum."""

    def __init__(self, width: int, kernel: int):
        super().__init__()
        self.conv = conv_bn(width, width, kernel, 1, width, act=None)
        self.pointwise = nn.Conv2d(width, width, 1, groups=width, bias=True)
        self.bn = nn.BatchNorm2d(width)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x) + self.pointwise(x) + x)


def _repvit_ffn(width: int, hidden: int, act: str) -> nn.Sequential:
    """y + conv2(act(conv1(y))) without the residual: 1x1 + BN, act, 1x1 + BN."""
    return nn.Sequential(OrderedDict(
        conv1=conv_bn(width, hidden, 1, act=act), conv2=conv_bn(hidden, width, 1, act=None)))


@register_block
class RepViT(Block):
    """RepViT block (Wang et al. 2024), t = expansion, k = kernel:

        stride 1:  y = se(mixer(x));  out = y + ffn(y)     mixer: `RepVGGDepthwise`
        stride 2:  y = channel(spatial(pre(x)));  out = y + ffn(y)

    ffn = 1x1 + BN w -> t w, act, 1x1 + BN; pre is a stride-1 RepViT block on w_in without SE,
    spatial a depthwise kxk stride-2 conv + BN, channel a 1x1 conv + BN to w_out (the paper's
    downsampling layer). SE (`se_ratio`) sits in alternate blocks: the 1st, 3rd, ... of the
    stage's stride-1 blocks. Deploy form: the mixer is one depthwise kxk conv with bias (R3, R4,
    R5, then the BN after the sum, R1)."""

    name = "repvit"
    uses = SE_FIELDS | {"kernel", "expansion", "activation"}

    @classmethod
    def check(cls, stage, w_in):
        if stage.stride == 1 and w_in != stage.width:
            return "width", (f"a stride-1 repvit block adds its input: width {stage.width} must "
                             f"equal the input width {w_in}")
        return None

    @classmethod
    def stage_at(cls, stage, index):
        return se_in_alternate_blocks(stage, index)

    def __init__(self, w_in: int, w_out: int, stride: int, stage: StageSpec):
        super().__init__()
        act, kernel = stage.activation, stage.kernel
        if stride == 1:
            self.mixer = RepVGGDepthwise(w_out, kernel)
            self.se = squeeze_excitation(stage, w_in, w_out)
        else:
            plain = stage.model_copy(update={"se_ratio": 0.0, "stride": 1, "width": w_in})
            self.pre = RepViT(w_in, w_in, 1, plain)
            self.spatial = conv_bn(w_in, w_in, kernel, stride, w_in, act=None)
            self.channel = conv_bn(w_in, w_out, 1, act=None)
        self.ffn = _repvit_ffn(w_out, int(w_out * stage.expansion), act)
        self.downsample = stride > 1

    def forward(self, x: Tensor) -> Tensor:
        if self.downsample:
            y = self.channel(self.spatial(self.pre(x)))
        else:
            y = self.mixer(x)
            if self.se is not None:
                y = self.se(y)
        return y + self.ffn(y)


# ---- VanillaNet (Chen et al. 2023): deep training and the activation series ----


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


def _conv_bias_bn(w_in: int, w_out: int, kernel: int = 1, stride: int = 1) -> nn.Sequential:
    """VanillaNet's conv with bias (no padding) + BN (eps 1e-6), named conv/bn."""
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(w_in, w_out, kernel, stride, bias=True),
        bn=nn.BatchNorm2d(w_out, eps=1e-6),
    ))


@register_block
class VanillaNetBlock(Block):
    """VanillaNet block: `series(pool(b(σ_λ(a(x)))))`, a = 1x1 conv + BN w_in -> w_in, σ_λ the
    deep-training activation, b = 1x1 conv + BN w_in -> w_out, pool a max-pool of window and
    stride s (absent at s = 1), series the `ActivationSeries`. Deploy form at λ = 1: one 1x1
    conv (R7), pool, ReLU, a depthwise 7x7 conv with bias (R1)."""

    name = "vanillanet"

    def __init__(self, w_in: int, w_out: int, stride: int, stage: StageSpec):
        super().__init__()
        self.a = _conv_bias_bn(w_in, w_in)
        self.deep_act = DeepTrainingActivation()
        self.b = _conv_bias_bn(w_in, w_out)
        self.pool = nn.MaxPool2d(stride) if stride > 1 else None
        self.series = ActivationSeries(w_out)

    def forward(self, x: Tensor) -> Tensor:
        x = self.b(self.deep_act(self.a(x)))
        if self.pool is not None:
            x = self.pool(x)
        return self.series(x)


# ---------------------------------------------------------------------------------------------
# Stems, pools and heads


def build_stem(stem: StemSpec, in_channels: int) -> nn.Module | None:
    """The stem of `stem.type` (`archc.frontend.spec.StemSpec` states each), None for `none`."""
    width, act = stem.channels, stem.activation
    if stem.type == "none":
        return None
    if stem.type == "fastvit":
        return nn.Sequential(OrderedDict(
            conv=MobileOneUnit(in_channels, width, 3, 2, 1, 1, act),
            depthwise=MobileOneUnit(width, width, 3, 2, width, 1, act),
            pointwise=MobileOneUnit(width, width, 1, 1, 1, 1, act),
        ))
    if stem.type == "repvit":
        return nn.Sequential(OrderedDict(
            conv1=conv_bn(in_channels, width // 2, 3, 2, act=act),
            conv2=conv_bn(width // 2, width, 3, 2, act=None),
        ))
    if stem.type == "vanillanet":
        return nn.Sequential(OrderedDict(
            a=_conv_bias_bn(in_channels, width, stem.stride, stem.stride),
            deep_act=DeepTrainingActivation(),
            b=_conv_bias_bn(width, width),
            series=ActivationSeries(width),
        ))
    kernel = 7 if stem.type == "resnet" else 3
    layers = conv_bn(in_channels, width, kernel, stem.stride, act=act)
    if stem.type in ("resnet", "simple_pool"):
        layers.add_module("pool", nn.MaxPool2d(3, stride=2, padding=1))
    return layers


def build_pool(pool: PoolSpec) -> nn.Module:
    """A stage's pool: max- or average pooling (count_include_pad, torch's default)."""
    kind = nn.MaxPool2d if pool.type == "max" else nn.AvgPool2d
    return kind(pool.kernel, pool.stride, pool.padding, ceil_mode=pool.ceil_mode)


def build_head(head: HeadSpec, w_in: int, num_classes: int) -> nn.Module:
    """The head of `head.type`."""
    if head.type == "conv_classifier":
        return ConvClassifierHead(head, w_in, num_classes)
    if head.type == "vanillanet":
        return VanillaNetHead(head, w_in, num_classes)
    return ClassifierHead(head, w_in, num_classes)


def _dropout(p: float) -> nn.Dropout | None:
    return nn.Dropout(p) if p > 0 else None


class ClassifierHead(nn.Module):
    """Optional 1x1 conv + BN + act (`pre`), average pool to `pool_size`, flatten, per hidden
    width [dropout] Linear + act (`hidden.i`), [dropout], [BN1d] Linear with bias (`fc`); with
    `distillation` a second [BN1d] Linear (`dist_fc`) and the mean of both (DeiT's eval mode)."""

    def __init__(self, head: HeadSpec, w_in: int, num_classes: int):
        super().__init__()
        self.pre = None
        if head.width is not None:
            self.pre = conv_bn(w_in, head.width, 1, act=head.activation)
            w_in = head.width
        self.pool = nn.AdaptiveAvgPool2d(head.pool_size)
        self.flatten = nn.Flatten(1)
        w_in *= head.pool_size**2
        self.hidden = None
        if head.hidden:
            layers: OrderedDict[str, nn.Module] = OrderedDict()
            for index, width in enumerate(head.hidden, start=1):
                layer: OrderedDict[str, nn.Module] = OrderedDict()
                if head.hidden_dropout > 0:
                    layer["dropout"] = nn.Dropout(head.hidden_dropout)
                layer["fc"] = nn.Linear(w_in, width, bias=True)
                layer["act"] = ACTIVATIONS[head.activation]()
                layers[str(index)] = nn.Sequential(layer)
                w_in = width
            self.hidden = nn.Sequential(layers)
        self.dropout = _dropout(head.dropout)
        self.fc_norm = nn.BatchNorm1d(w_in) if head.batch_norm else None
        self.fc = nn.Linear(w_in, num_classes, bias=True)
        self.dist_norm = nn.BatchNorm1d(w_in) if head.batch_norm and head.distillation else None
        self.dist_fc = nn.Linear(w_in, num_classes, bias=True) if head.distillation else None

    def forward(self, x: Tensor) -> Tensor:
        if self.pre is not None:
            x = self.pre(x)
        x = self.flatten(self.pool(x))
        if self.hidden is not None:
            x = self.hidden(x)
        if self.dropout is not None:
            x = self.dropout(x)
        logits = self.fc(x if self.fc_norm is None else self.fc_norm(x))
        if self.dist_fc is None:
            return logits
        distilled = self.dist_fc(x if self.dist_norm is None else self.dist_norm(x))
        return (logits + distilled) / 2


class ConvClassifierHead(nn.Module):
    """SqueezeNet's head: [dropout], 1x1 conv with bias to the classes, ReLU, global average
    pool, flatten."""

    def __init__(self, head: HeadSpec, w_in: int, num_classes: int):
        super().__init__()
        self.dropout = _dropout(head.dropout)
        self.conv = nn.Conv2d(w_in, num_classes, 1, bias=True)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        if self.dropout is not None:
            x = self.dropout(x)
        return self.flatten(self.pool(self.act(self.conv(x))))


class VanillaNetHead(nn.Module):
    """VanillaNet's head: global average pool, [dropout], 1x1 conv + BN to the classes (`a`), the
    deep-training activation, 1x1 conv with bias (`b`), flatten. At λ = 1 `a` and `b` merge."""

    def __init__(self, head: HeadSpec, w_in: int, num_classes: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = _dropout(head.dropout)
        self.a = _conv_bias_bn(w_in, num_classes)
        self.deep_act = DeepTrainingActivation()
        self.b = nn.Conv2d(num_classes, num_classes, 1, bias=True)
        self.flatten = nn.Flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(x)
        if self.dropout is not None:
            x = self.dropout(x)
        return self.flatten(self.b(self.deep_act(self.a(x))))
