"""What a block, a stem and a head type is, and their registries.

A block type is one `Block` class registered with `@register_block`: it names itself, lists the
optional stage fields it reads (`uses`), checks a stage given the width entering it (`check`,
returning the offending field and why), builds itself from `(w_in, w_out, stride, stage)`, may
vary the fields along a stage (`stage_at`: RepViT's SE in alternate blocks) and counts itself
without being built (`complexity(cx, w_in, w_out, stride, stage)`, its analytic twin). A stem
type (`Stem`) builds a stem and counts it; a head type (`Head`) is the head module and counts
itself. Registering a class that does not define its own `complexity` raises `TypeError`, so
`archc.frontend.analytic_complexity` has a twin for everything a spec can name.

The spec loader calls `check_stage`, so a stage a block cannot build is a spec error, not a shape
error deep inside torch. Importing any module of `archc.frontend.blocks` first runs the package's
`__init__`, which imports every family and so fills the registries.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from archc.common.suggest import did_you_mean
from archc.errors import SpecError
from archc.frontend.blocks.counting import Cx
from archc.frontend.spec import HeadSpec, StageSpec, StemSpec

BLOCKS: dict[str, type[Block]] = {}
STEMS: dict[str, type[Stem]] = {}
HEADS: dict[str, type[Head]] = {}
SE_FIELDS = frozenset({"se_ratio", "se_base", "se_divisor", "se_gate", "se_activation"})
# stage fields every block has: the stage's shape, and the pool after its last block
STAGE_FIELDS = frozenset({"block", "depth", "width", "stride", "pool"})
BOTTLENECK_FIELDS = frozenset({"bottleneck_multiplier", "bottleneck_ratio"})


def _require_twin(cls: type, base: type) -> None:
    """Raise `TypeError` unless `cls` or a class between it and `base` defines `complexity`."""
    owner = next(klass for klass in cls.__mro__ if "complexity" in vars(klass))
    if owner is base:
        raise TypeError(f"{cls.__name__} ({cls.name!r}) has no analytic complexity twin: "
                        f"define its complexity beside its build")


def register_block(cls: type[Block]) -> type[Block]:
    _require_twin(cls, Block)
    BLOCKS[cls.name] = cls
    return cls


def register_stem(cls: type[Stem]) -> type[Stem]:
    _require_twin(cls, Stem)
    STEMS[cls.name] = cls
    return cls


def register_head(cls: type[Head]) -> type[Head]:
    _require_twin(cls, Head)
    HEADS[cls.name] = cls
    return cls


def check_stage(block: str, stage: StageSpec | None, path: str, w_in: int = 0) -> None:
    """Raise `SpecError` if `block` is unknown or cannot build `stage` entered with width `w_in`
    (stage None: check the name only)."""
    if block not in BLOCKS:
        field = path if path.endswith(".block") else f"{path}.block"
        raise SpecError(f"unknown block {block!r}{did_you_mean(block, BLOCKS)}; registered: "
                        f"{', '.join(BLOCKS)}", field)
    if stage is None:
        return
    cls = BLOCKS[block]
    optional = set(type(stage).model_fields) - STAGE_FIELDS
    uses = cls.uses | ({"bn"} if cls.has_batch_norm else set())
    unused = sorted(
        field
        for field in optional - uses
        if getattr(stage, field) != type(stage).model_fields[field].default
    )
    if unused:
        raise SpecError(f"block {block!r} does not use this field", f"{path}.{unused[0]}")
    problem = cls.check(stage, w_in)
    if problem is not None:
        field, message = problem
        raise SpecError(message, f"{path}.{field}")


class Block(nn.Module):
    """Base class of registered blocks."""

    name: ClassVar[str]
    uses: ClassVar[frozenset[str]] = frozenset()  # optional stage fields the block reads
    # whether the block has BatchNorm layers, which then read the stage's `bn` (every block does
    # but the plain `conv` and `fire`)
    has_batch_norm: ClassVar[bool] = True
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
    def complexity(cx: Cx, w_in: int, w_out: int, stride: int, stage: StageSpec) -> Cx:
        """The analytic twin: count the layers `cls(w_in, w_out, stride, stage)` builds, in the
        order it builds them, into `cx` (`archc.frontend.blocks.counting`); every registered
        block defines its own."""
        raise NotImplementedError


class Stem:
    """Base class of registered stem types (`archc.frontend.spec.StemSpec` states each)."""

    name: ClassVar[str]
    has_batch_norm: ClassVar[bool] = True  # whether the stem has BatchNorm layers

    @staticmethod
    def build(stem: StemSpec, w_in: int) -> nn.Module | None:
        """The stem entered with `w_in` channels, leaving with `stem.channels`; None: no stem."""
        raise NotImplementedError

    @staticmethod
    def complexity(cx: Cx, stem: StemSpec, w_in: int) -> Cx:
        """The analytic twin of `build`; every registered stem type defines its own."""
        raise NotImplementedError


class Head(nn.Module):
    """Base class of registered head types, built from `(head, w_in, num_classes)`."""

    name: ClassVar[str]

    @staticmethod
    def has_batch_norm(head: HeadSpec) -> bool:
        """Whether the head `head` describes has BatchNorm layers."""
        return True

    @staticmethod
    def complexity(cx: Cx, head: HeadSpec, w_in: int, num_classes: int) -> Cx:
        """The analytic twin of the head; every registered head type defines its own."""
        raise NotImplementedError
