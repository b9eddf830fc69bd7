"""Registered building blocks, stems and heads (as pycls' AnyNet).

A block type is one class registered with `@register_block`: it names itself, lists the optional
stage fields it reads (`uses`), checks a stage (`check`, returning the offending field and why) and
builds itself from `(w_in, w_out, stride, stage)`. The spec loader calls `check_stage`, so a stage a
block cannot build is a spec error, not a shape error deep inside torch.

Module naming is part of the contract (qualified names in graphs, checkpoints and reports):
`stem.conv`, `s1.b1.proj.conv`, `s1.b1.f.a.conv`, `s1.b1.f.se.reduce`, `head.fc`, ...

Blocks (w_b = round(w_out * bottleneck_multiplier), g = group width):
- `res_bottleneck` (RegNetX; RegNetY with se_ratio > 0):
  `relu(proj(x) + c(se(b(a(x)))))`, a = 1x1 w_in->w_b BN ReLU, b = 3x3 stride s, groups w_b/g,
  BN ReLU, se = squeeze-excitation of width round(se_ratio * w_in), c = 1x1 w_b->w_out BN.
- `res_basic`: `relu(proj(x) + b(a(x)))`, a = 3x3 stride s BN ReLU, b = 3x3 BN.
- `vanilla`: `b(a(x))`, a = 3x3 stride s BN ReLU, b = 3x3 BN ReLU.
proj = 1x1 conv stride s + BN, present only when w_in != w_out or s != 1.
"""

from __future__ import annotations

import difflib
from collections import OrderedDict
from typing import ClassVar

from torch import Tensor, nn

from archc.errors import SpecError
from archc.spec import HeadSpec, StageSpec, StemSpec

BLOCKS: dict[str, type[Block]] = {}


def register_block(cls: type[Block]) -> type[Block]:
    BLOCKS[cls.name] = cls
    return cls


def check_stage(block: str, stage: StageSpec | None, path: str) -> None:
    """Raise `SpecError` if `block` is unknown or cannot build `stage` (None: name only)."""
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
    problem = cls.check(stage)
    if problem is not None:
        field, message = problem
        raise SpecError(message, f"{path}.{field}")


def conv_bn(
    w_in: int, w_out: int, kernel: int, stride: int = 1, groups: int = 1, relu: bool = True
) -> nn.Sequential:
    """conv (no bias, padding (k-1)//2) -> BN -> optional ReLU, named conv/bn/act."""
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        conv=nn.Conv2d(w_in, w_out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        bn=nn.BatchNorm2d(w_out, eps=1e-5, momentum=0.1),
    )
    if relu:
        layers["act"] = nn.ReLU()
    return nn.Sequential(layers)


class SqueezeExcitation(nn.Module):
    """x * sigmoid(expand(relu(reduce(avgpool(x))))), 1x1 convs with bias."""

    def __init__(self, width: int, se_width: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(width, se_width, 1, bias=True)
        self.act = nn.ReLU()
        self.expand = nn.Conv2d(se_width, width, 1, bias=True)
        self.gate = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gate(self.expand(self.act(self.reduce(self.pool(x)))))


class Block(nn.Module):
    """Base class of registered blocks."""

    name: ClassVar[str]
    uses: ClassVar[frozenset[str]] = frozenset()  # optional stage fields the block reads

    @classmethod
    def check(cls, stage: StageSpec) -> tuple[str, str] | None:
        return None

    @staticmethod
    def projection(w_in: int, w_out: int, stride: int) -> nn.Module | None:
        if w_in == w_out and stride == 1:
            return None
        return conv_bn(w_in, w_out, 1, stride, relu=False)


@register_block
class ResBottleneck(Block):
    name = "res_bottleneck"
    uses = frozenset({"group_width", "bottleneck_multiplier", "bottleneck_ratio", "se_ratio"})

    @staticmethod
    def bottleneck_width(stage: StageSpec) -> int:
        return int(round(stage.width * stage.bottleneck))

    @classmethod
    def check(cls, stage):
        w_b = cls.bottleneck_width(stage)
        if w_b < 1:
            return (
                "bottleneck_multiplier",
                f"bottleneck width round({stage.width} * {stage.bottleneck}) is 0",
            )
        if stage.group_width is not None and w_b % stage.group_width:
            return "group_width", (
                f"bottleneck width {w_b} (width {stage.width} x bottleneck {stage.bottleneck:g}) "
                f"is not divisible by group_width {stage.group_width}"
            )
        return None

    def __init__(self, w_in: int, w_out: int, stride: int, stage: StageSpec):
        super().__init__()
        w_b = self.bottleneck_width(stage)
        groups = w_b // stage.group_width if stage.group_width else 1
        self.proj = self.projection(w_in, w_out, stride)
        f: OrderedDict[str, nn.Module] = OrderedDict(
            a=conv_bn(w_in, w_b, 1), b=conv_bn(w_b, w_b, 3, stride, groups)
        )
        se_width = int(round(stage.se_ratio * w_in))
        if se_width > 0:
            f["se"] = SqueezeExcitation(w_b, se_width)
        f["c"] = conv_bn(w_b, w_out, 1, relu=False)
        self.f = nn.Sequential(f)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.proj is None else self.proj(x)
        return self.act(shortcut + self.f(x))


@register_block
class ResBasic(Block):
    name = "res_basic"

    def __init__(self, w_in: int, w_out: int, stride: int, stage: StageSpec):
        super().__init__()
        self.proj = self.projection(w_in, w_out, stride)
        self.f = nn.Sequential(
            OrderedDict(a=conv_bn(w_in, w_out, 3, stride), b=conv_bn(w_out, w_out, 3, relu=False))
        )
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.proj is None else self.proj(x)
        return self.act(shortcut + self.f(x))


@register_block
class Vanilla(Block):
    name = "vanilla"

    def __init__(self, w_in: int, w_out: int, stride: int, stage: StageSpec):
        super().__init__()
        self.a = conv_bn(w_in, w_out, 3, stride)
        self.b = conv_bn(w_out, w_out, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(self.a(x))


def build_stem(stem: StemSpec, in_channels: int) -> nn.Module | None:
    if stem.type == "none":
        return None
    if stem.type == "simple":
        return conv_bn(in_channels, stem.channels, 3, stride=2)
    layers = conv_bn(in_channels, stem.channels, 7, stride=2)
    layers.add_module("pool", nn.MaxPool2d(3, stride=2, padding=1))
    return layers


class ClassifierHead(nn.Module):
    """Global average pool, flatten, optional dropout, Linear with bias."""

    def __init__(self, head: HeadSpec, w_in: int, num_classes: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.dropout = nn.Dropout(head.dropout) if head.dropout > 0 else None
        self.fc = nn.Linear(w_in, num_classes, bias=True)

    def forward(self, x: Tensor) -> Tensor:
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
    def check(cls, stage):
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
        self.conv3x3 = conv_bn(w_in, w_out, 3, stride, groups, relu=False)
        self.conv1x1 = conv_bn(w_in, w_out, 1, stride, groups, relu=False)
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
        self.square = conv_bn(w_in, w_out, 3, stride, groups, relu=False)
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
        self.square = conv_bn(w_in, w_out, 3, stride, groups, relu=False)
        self.pointwise = conv_bn(w_in, w_out, 1, stride, groups, relu=False)
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
            conv_bn(w_in, w_out, kernel, stride, groups, relu=False) for _ in range(branches)
        )
        self.scale = conv_bn(w_in, w_out, 1, stride, groups, relu=False) if kernel > 1 else None
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
