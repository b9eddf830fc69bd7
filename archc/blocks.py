"""Registered building blocks, stems and heads (as pycls' AnyNet).

A block type is one class registered with `@register_block`: it names itself, lists the optional
stage fields it reads (`uses`), checks a stage given the width entering it (`check`, returning the
offending field and why) and builds itself from `(w_in, w_out, stride, stage)`. The spec loader
calls `check_stage`, so a stage a block cannot build is a spec error, not a shape error deep inside
torch.

Module naming is part of the contract (qualified names in graphs, checkpoints and reports):
`stem.conv`, `s1.b1.proj.conv`, `s1.b1.f.a.conv`, `s1.b1.f.se.reduce`, `head.fc`, ...

Notation: s = stride, act = the stage's activation, BN after every conv, convs without bias and
with padding (k-1)//2; proj = 1x1 conv stride s + BN, present only when w_in != w_out or s != 1.

- `res_bottleneck` (RegNetX/Y, ResNet-50 v1.5, ResNeXt): `act(proj(x) + c(se(b(a(x)))))`, a = 1x1
  w_in->w_b act, b = 3x3 stride s (v1.5: the stride is on the 3x3) with w_b/g groups (or `groups`)
  act, c = 1x1 w_b->w_out; w_b = round(w_out * bottleneck_multiplier).
- `res_basic` (ResNet-18/34): `act(proj(x) + se(b(a(x))))`, a = 3x3 stride s act, b = 3x3.
- `vanilla`: `b(a(x))`, a = 3x3 stride s act, b = 3x3 act.
- `dw_separable` (MobileNetV1): `pw(se(dw(x)))`, dw = 3x3 depthwise stride s act, pw = 1x1 act.
- `inverted_residual` (MobileNetV2): `[x +] project(se(dw(expand(x))))`, h = round(t * w_in),
  expand = 1x1 w_in->h act (absent when t = 1), dw = 3x3 depthwise stride s act, project = 1x1
  h->w_out with no activation (linear bottleneck); the residual only when s = 1 and w_in = w_out.
- `shufflenet_v1`: f = c(b(shuffle_g(a(x)))), a = 1x1 w_in->m with g groups act, b = 3x3
  depthwise stride s, c = 1x1 m->w_f with g groups, m = round(w_out * bottleneck_multiplier).
  s = 1: `act(x + f(x))`, w_f = w_out; s > 1: `act(cat(avgpool3x3_s(x), f(x)))`, w_f = w_out - w_in.
- `shufflenet_v2`, h = w_out / 2: s = 1: `shuffle_2(cat(x1, f(x2)))` with (x1, x2) the channel
  halves of x; s > 1: `shuffle_2(cat(g(x), f(x)))`; f = 1x1 ->h act, 3x3 depthwise stride s,
  1x1 h->h act; g = 3x3 depthwise stride s, 1x1 w_in->h act.
- `reducenet`: `c(branch1(x) + branch2(x)) + proj(x)` (train phase) or `c(branch2(x)) + proj(x)`
  (reduced phase, branch1 not built), branch1 = 3x3 stride s w_in->e act, 1x1 e->w_out act with
  e = round(expansion * w_out); branch2 = 3x3 stride s act; c = 3x3 (no activation).

shuffle_g(x) moves channel i * (C/g) + j to j * g + i: view (N, g, C/g, H, W), swap dims 1 and 2,
reshape back (written out in `forward`, so graphs show it and the shuffle passes can find it).
SE (`se_ratio` > 0): `x * gate(expand(relu(reduce(avgpool(x)))))`, 1x1 convs with bias, width
round(se_ratio * base) or make_divisible(se_ratio * base, se_divisor), base = the block input
width (`se_base: input`, pycls) or the width SE acts on (`inner`, MobileNetV3).
"""

from __future__ import annotations

import difflib
from collections import OrderedDict
from typing import ClassVar

import torch
from torch import Tensor, nn

from archc.errors import SpecError
from archc.spec import HeadSpec, StageSpec, StemSpec, make_divisible

BLOCKS: dict[str, type[Block]] = {}
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "hardswish": nn.Hardswish,
}
GATES: dict[str, type[nn.Module]] = {"sigmoid": nn.Sigmoid, "hardsigmoid": nn.Hardsigmoid}
SE_FIELDS = frozenset({"se_ratio", "se_base", "se_divisor", "se_gate"})
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
    optional = set(type(stage).model_fields) - {"block", "depth", "width", "stride"}
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
) -> nn.Sequential:
    """conv (no bias, padding (k-1)//2) -> BN -> optional activation, named conv/bn/act."""
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        conv=nn.Conv2d(w_in, w_out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        bn=nn.BatchNorm2d(w_out, eps=1e-5, momentum=0.1),
    )
    if act is not None:
        layers["act"] = ACTIVATIONS[act]()
    return nn.Sequential(layers)


class SqueezeExcitation(nn.Module):
    """x * gate(expand(relu(reduce(avgpool(x))))), 1x1 convs with bias."""

    def __init__(self, width: int, se_width: int, gate: str = "sigmoid"):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(width, se_width, 1, bias=True)
        self.act = nn.ReLU()
        self.expand = nn.Conv2d(se_width, width, 1, bias=True)
        self.gate = GATES[gate]()

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gate(self.expand(self.act(self.reduce(self.pool(x)))))


def squeeze_excitation(stage: StageSpec, w_in: int, width: int) -> SqueezeExcitation | None:
    """The stage's SE on `width` channels of a block entered with `w_in`; None if its width is 0."""
    if stage.se_ratio == 0:
        return None
    value = stage.se_ratio * (w_in if stage.se_base == "input" else width)
    se_width = (
        make_divisible(value, stage.se_divisor) if stage.se_divisor > 1 else int(round(value))
    )
    return SqueezeExcitation(width, se_width, stage.se_gate) if se_width > 0 else None


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """ShuffleNet's channel shuffle: channel i * (C/g) + j moves to j * g + i."""
    batch, channels, height, width = x.size()
    x = x.view(batch, groups, channels // groups, height, width)
    return x.transpose(1, 2).reshape(batch, channels, height, width)


class Block(nn.Module):
    """Base class of registered blocks."""

    name: ClassVar[str]
    uses: ClassVar[frozenset[str]] = frozenset()  # optional stage fields the block reads

    @classmethod
    def check(cls, stage: StageSpec, w_in: int) -> tuple[str, str] | None:
        """(field, why) if the stage cannot be built when entered with `w_in` channels."""
        return None

    @staticmethod
    def projection(w_in: int, w_out: int, stride: int) -> nn.Module | None:
        if w_in == w_out and stride == 1:
            return None
        return conv_bn(w_in, w_out, 1, stride, act=None)


@register_block
class ResBottleneck(Block):
    name = "res_bottleneck"
    uses = SE_FIELDS | BOTTLENECK_FIELDS | {"group_width", "groups", "activation"}

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
        se = squeeze_excitation(stage, w_in, w_b)
        if se is not None:
            f["se"] = se
        f["c"] = conv_bn(w_b, w_out, 1, act=None)
        self.f = nn.Sequential(f)
        self.act = ACTIVATIONS[act]()

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.proj is None else self.proj(x)
        return self.act(shortcut + self.f(x))


@register_block
class ResBasic(Block):
    name = "res_basic"
    uses = SE_FIELDS | {"activation"}

    def __init__(self, w_in: int, w_out: int, stride: int, stage: StageSpec):
        super().__init__()
        act = stage.activation
        self.proj = self.projection(w_in, w_out, stride)
        f: OrderedDict[str, nn.Module] = OrderedDict(
            a=conv_bn(w_in, w_out, 3, stride, act=act), b=conv_bn(w_out, w_out, 3, act=None)
        )
        se = squeeze_excitation(stage, w_in, w_out)
        if se is not None:
            f["se"] = se
        self.f = nn.Sequential(f)
        self.act = ACTIVATIONS[act]()

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.proj is None else self.proj(x)
        return self.act(shortcut + self.f(x))


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
    """MobileNetV2 (Sandler et al. 2018): `[x +] project(se(dw(expand(x))))`, as torchvision:
    h = int(round(t * w_in)), no expand conv exactly when t = 1."""

    name = "inverted_residual"
    uses = SE_FIELDS | {"expansion", "activation"}

    @classmethod
    def check(cls, stage, w_in):
        for width in (w_in, stage.width):
            if int(round(stage.expansion * width)) < 1:
                return "expansion", f"hidden width round({stage.expansion:g} * {width}) is 0"
        return None

    def __init__(self, w_in: int, w_out: int, stride: int, stage: StageSpec):
        super().__init__()
        hidden = int(round(stage.expansion * w_in))
        act = stage.activation
        f: OrderedDict[str, nn.Module] = OrderedDict()
        if stage.expansion != 1:
            f["expand"] = conv_bn(w_in, hidden, 1, act=act)
        f["dw"] = conv_bn(hidden, hidden, 3, stride, hidden, act)
        se = squeeze_excitation(stage, w_in, hidden)
        if se is not None:
            f["se"] = se
        f["project"] = conv_bn(hidden, w_out, 1, act=None)
        self.f = nn.Sequential(f)
        self.residual = stride == 1 and w_in == w_out

    def forward(self, x: Tensor) -> Tensor:
        return x + self.f(x) if self.residual else self.f(x)


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
# Stems and heads


def build_stem(stem: StemSpec, in_channels: int) -> nn.Module | None:
    """conv (7x7 for resnet, else 3x3) stride `stem.stride` + BN + act [+ 3x3 max-pool stride 2]."""
    if stem.type == "none":
        return None
    kernel = 7 if stem.type == "resnet" else 3
    layers = conv_bn(in_channels, stem.channels, kernel, stem.stride, act=stem.activation)
    if stem.type in ("resnet", "simple_pool"):
        layers.add_module("pool", nn.MaxPool2d(3, stride=2, padding=1))
    return layers


class ClassifierHead(nn.Module):
    """Optional 1x1 conv + BN + act (`pre`), global average pool, flatten, optional dropout,
    Linear with bias."""

    def __init__(self, head: HeadSpec, w_in: int, num_classes: int):
        super().__init__()
        self.pre = None
        if head.width is not None:
            self.pre = conv_bn(w_in, head.width, 1, act=head.activation)
            w_in = head.width
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.dropout = nn.Dropout(head.dropout) if head.dropout > 0 else None
        self.fc = nn.Linear(w_in, num_classes, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        if self.pre is not None:
            x = self.pre(x)
        x = self.flatten(self.pool(x))
        if self.dropout is not None:
            x = self.dropout(x)
        return self.fc(x)


# ---------------------------------------------------------------------------------------------
# Train-form (over-parameterized) blocks: several linear branches that the passes collapse into
# one conv per block (structural re-parameterization, REWRITES.md R1-R9).


def _groups(w_in: int, stage: StageSpec) -> int:
    """Groups of a train-form block's convs; dense where the input width does not divide
    (e.g. a stage's first block reading the 3-channel image)."""
    if not stage.group_width or w_in % stage.group_width:
        return 1
    return w_in // stage.group_width


class TrainFormBlock(Block):
    """`act(sum of branches(x))`: every branch is linear in x; checks the input width's groups."""

    uses = frozenset({"group_width"})

    @classmethod
    def check(cls, stage, w_in):
        if stage.group_width is not None and stage.width % stage.group_width:
            return "group_width", (
                f"width {stage.width} is not divisible by group_width {stage.group_width}"
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
        groups = _groups(w_in, stage)
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
class ACB(TrainFormBlock):
    """ACNet's asymmetric convolution block (Ding et al. 2019): relu(BN(3x3 x) + BN(1x3 x) +
    BN(3x1 x)). Deploy form: one 3x3 conv with bias (1x3 and 3x1 centre-embedded)."""

    name = "acb"

    def __init__(self, w_in: int, w_out: int, stride: int, stage: StageSpec):
        super().__init__()
        groups = _groups(w_in, stage)
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
    train form, and it makes the sequential merges exact (REWRITES.md R6 border trap, R8 p2 = 0).
    Deploy form: one 3x3 conv with bias."""

    name = "dbb"

    def __init__(self, w_in: int, w_out: int, stride: int, stage: StageSpec):
        super().__init__()
        groups = _groups(w_in, stage)
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
    """One MobileOne re-parameterizable conv: relu(Σ_k BN(KxK_k x) + BN(1x1 x) + BN(x)), the 1x1
    'scale' branch only when K > 1, the identity BN only when shapes allow."""

    def __init__(self, w_in: int, w_out: int, kernel: int, stride: int, groups: int, branches: int):
        super().__init__()
        self.convs = nn.ModuleList(
            conv_bn(w_in, w_out, kernel, stride, groups, act=None) for _ in range(branches)
        )
        self.scale = conv_bn(w_in, w_out, 1, stride, groups, act=None) if kernel > 1 else None
        self.identity = nn.BatchNorm2d(w_out) if w_in == w_out and stride == 1 else None
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        total = self.convs[0](x)
        for conv in self.convs[1:]:
            total = total + conv(x)
        if self.scale is not None:
            total = total + self.scale(x)
        if self.identity is not None:
            total = total + self.identity(x)
        return self.act(total)


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
