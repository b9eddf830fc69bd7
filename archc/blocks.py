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
    unused = sorted(stage.model_fields_set - cls.uses - {"block", "depth", "width", "stride"})
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


def build_stem(stem: StemSpec, in_channels: int) -> nn.Sequential:
    if stem.type == "simple":
        return conv_bn(in_channels, stem.width, 3, stride=2)
    layers = conv_bn(in_channels, stem.width, 7, stride=2)
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
