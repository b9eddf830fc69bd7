"""The archc spec language: the one schema file.

A spec is a YAML or JSON mapping::

    name: regnetx_600mf
    input: {channels: 3, size: 224}
    num_classes: 1000
    stem: {type: simple, width: 32}
    body: {type: regnet, depth: 16, w0: 48, wa: 36.97, wm: 2.24, group_width: 24}
    head: {type: classifier}

Two body forms exist. `anynet` is the explicit form: a list of stages, each `depth` blocks of one
registered block type, the first block of a stage carrying the stage's stride. `regnet` is the
compact form of Radosavovic et al. (2020): (depth, w0, wa, wm, group_width, bottleneck) generate the
stage list (see `archc.frontend.regnet`). Everything downstream of `Spec.stages()` sees only
explicit stages.

Bottleneck width: pycls' *multiplier* `bot_mul` gives the bottleneck width `w_b = round(w *
bot_mul)`; the paper's bottleneck *ratio* `b` is its reciprocal (`w_b = w / b`). Specs say which
one they mean: `bottleneck_multiplier` or `bottleneck_ratio`, never both.

Width multiplier (MobileNet): an anynet body with `width_multiplier` m scales every stage width to
`make_divisible(w * m, width_divisor)`, torchvision's rule: round to the nearest multiple d of the
divisor, `max(d, int(v + d / 2) // d * d)`, plus d if that fell below 0.9 v. Stem and head widths
are never scaled: a spec states them.

Compound scaling (EfficientNet, Tan and Le 2019): `compound_scaling: {width: w, depth: d}` scales
the stem, every stage and the head width to `make_divisible(c * w, width_divisor)` and every stage
depth to `ceil(n * d)` (torchvision's rounding), so EfficientNet-B1..B7 differ from B0 in this one
field (and the input size and dropout the paper pairs with it).

Validation happens in two steps with one error format (`file:field.path: what is wrong`):
structure and ranges here (pydantic, `validate_schema`), then the checks that need more than one
field, by `archc.frontend.loading`: the RegNet stage count and the block-specific checks of the
registered block classes (`archc.frontend.blocks`), which live beside the modules they describe.
This module is the bottom of the spec layers: it imports only the RegNet arithmetic
(`archc.frontend.regnet`).
"""

from __future__ import annotations

import math
import typing
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from archc.errors import SpecError
from archc.frontend.regnet import adjust_block_compatibility, generate_widths
from archc.frontend.schema_errors import MAX_REPORTED, describe, ordered_errors

PositiveInt = Annotated[int, Field(ge=1)]
Activation = Literal["relu", "relu6", "hardswish", "silu", "gelu"]
Kernel = Annotated[int, Field(ge=1, le=15)]


def make_divisible(value: float, divisor: int) -> int:
    """torchvision's `_make_divisible`: nearest multiple of `divisor` (at least `divisor`), one
    multiple more if rounding lost over 10% of `value`."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class _Strict(BaseModel):
    """Unknown keys are errors; types are not coerced (a string is not a number)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class BatchNormSpec(_Strict):
    """The settings of every BatchNorm in a model (`Spec.bn`) or in one stage (`StageSpec.bn`,
    which replaces the model's there): y = gamma (x - mean) / sqrt(var + eps) + beta, and in
    training running = (1 - momentum) running + momentum batch."""

    # the variance offset (torch's default 1e-5; torchvision's MobileNetV3 1e-3)
    eps: Annotated[float, Field(gt=0.0, le=1.0)] = 1e-5
    # weight of a batch's statistics in the running ones (torch's default 0.1; torchvision's
    # MobileNetV3 0.01; TensorFlow's decay d is 1 - d); null: their cumulative average
    momentum: Annotated[float, Field(ge=0.0, le=1.0)] | None = 0.1

    @model_serializer(mode="wrap")
    def _momentum_even_if_null(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """A null momentum is a setting (the cumulative average), not an absent one: it stays in
        `Spec.to_dict()`, which drops None values, so the dump loads back to this spec."""
        return {**handler(self), "momentum": self.momentum}


class InputSpec(_Strict):
    channels: PositiveInt = 3  # input channels (3 for RGB)
    size: Annotated[int, Field(ge=8, le=4096)] = 224  # square input side, pixels


class PoolSpec(_Strict):
    type: Literal["max", "avg"] = "max"  # max-pool or average pool (count_include_pad, torch's)
    kernel: Annotated[int, Field(ge=1, le=16)] = 3  # pooling window side
    stride: Annotated[int, Field(ge=1, le=16)] = 2  # pooling stride
    padding: Annotated[int, Field(ge=0, le=8)] = 0  # zero (avg) / -inf (max) padding, <= k / 2
    ceil_mode: bool = False  # round the output side up (SqueezeNet's pools), torch's ceil_mode

    @field_validator("padding")
    @classmethod
    def _padding_within_half_window(cls, padding: int, info: ValidationInfo) -> int:
        kernel = info.data.get("kernel")
        if kernel is not None and padding > kernel // 2:
            raise ValueError(f"padding {padding} is more than half the window {kernel}")
        return padding


# The fields each stem type reads besides `type` (the others must keep their defaults).
STEM_FIELDS: dict[str, frozenset[str]] = {
    "simple": frozenset({"width", "stride", "activation"}),
    "simple_pool": frozenset({"width", "stride", "activation"}),
    "resnet": frozenset({"width", "stride", "activation"}),
    "fastvit": frozenset({"width", "activation"}),
    "repvit": frozenset({"width", "activation"}),
    "vanillanet": frozenset({"width", "stride"}),
    "none": frozenset(),
}


class StemSpec(_Strict):
    # simple: 3x3 conv + BN + act (pycls SimpleStem); simple_pool: simple + 3x3 max-pool stride 2
    # (ShuffleNet); resnet: 7x7 conv + BN + act + 3x3 max-pool stride 2; fastvit: three MobileOne
    # units (3x3 stride 2, depthwise 3x3 stride 2, 1x1); repvit: 3x3 stride-2 conv to width/2 + BN
    # + act, 3x3 stride-2 conv + BN; vanillanet: patchify conv (kernel = stride) + BN, the
    # deep-training activation, 1x1 conv + BN, activation series; none: no stem, the first stage
    # reads the input (RepVGG's stem is its first block)
    type: Literal["simple", "simple_pool", "resnet", "fastvit", "repvit", "vanillanet", "none"] = (
        "simple")
    # output channels, default 32 (RegNet: always 32); not allowed with none
    width: PositiveInt | None = None
    stride: Annotated[int, Field(ge=1, le=4)] = 2  # stride of the stem conv (1: CIFAR-size input)
    activation: Activation = "relu"  # activation after the stem's BN

    @model_validator(mode="after")
    def _only_the_fields_of_its_type(self):
        given = [name for name, field in type(self).model_fields.items()
                 if name != "type" and name not in STEM_FIELDS[self.type]
                 and getattr(self, name) != field.default]
        if given:
            raise ValueError(f"a stem of type {self.type} has no {given[0]}")
        return self

    @property
    def channels(self) -> int:
        return 32 if self.width is None else self.width


# The fields each head type reads besides `type` (the others must keep their defaults).
HEAD_FIELDS: dict[str, frozenset[str]] = {
    "classifier": frozenset({"width", "activation", "dropout", "hidden", "hidden_dropout",
                             "pool_size", "batch_norm", "distillation"}),
    "conv_classifier": frozenset({"dropout"}),
    "vanillanet": frozenset({"dropout"}),
}


class HeadSpec(_Strict):
    # classifier: [1x1 conv BN act], avg pool, flatten, [hidden Linear + act]*, [BN1d] Linear;
    # conv_classifier (SqueezeNet): dropout, 1x1 conv with bias to the classes, ReLU, avg pool;
    # vanillanet: avg pool, dropout, 1x1 conv + BN, the deep-training activation, 1x1 conv
    type: Literal["classifier", "conv_classifier", "vanillanet"] = "classifier"
    # output channels of a 1x1 conv + BN + act before the pool (MobileNetV2 1280); None: no conv
    width: PositiveInt | None = None
    # widths of Linear + act layers between the pool and the classifier (MobileNetV3: [1280],
    # AlexNet: [4096, 4096])
    hidden: list[PositiveInt] = []
    activation: Activation = "relu"  # activation of that conv and of the hidden layers
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0  # dropout before the classifier
    hidden_dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0  # before each hidden Linear
    pool_size: Annotated[int, Field(ge=1, le=32)] = 1  # adaptive avg-pool output side (AlexNet 6)
    batch_norm: bool = False  # BatchNorm1d before the classifier Linear (RepViT, LeViT)
    # a second classifier (DeiT's distillation head), averaged with the first: RepViT
    distillation: bool = False

    @field_validator("activation")
    @classmethod
    def _activation_needs_layers(cls, activation: str, info: ValidationInfo) -> str:
        if activation != "relu" and info.data.get("width") is None and not info.data.get("hidden"):
            raise ValueError("the head has an activation only after its 1x1 conv or hidden "
                             "layers: give width or hidden")
        return activation

    @field_validator("hidden_dropout")
    @classmethod
    def _dropout_needs_hidden(cls, dropout: float, info: ValidationInfo) -> float:
        if dropout and not info.data.get("hidden"):
            raise ValueError("hidden_dropout is the dropout before hidden layers: give hidden")
        return dropout

    @model_validator(mode="after")
    def _only_the_fields_of_its_type(self):
        given = [name for name, field in type(self).model_fields.items()
                 if name != "type" and name not in HEAD_FIELDS[self.type]
                 and getattr(self, name) != field.default]
        if given:
            raise ValueError(f"a head of type {self.type} has no {given[0]}")
        return self


class _BottleneckFields(_Strict):
    # pycls' bot_mul: bottleneck width = round(width * bottleneck_multiplier)
    bottleneck_multiplier: Annotated[float, Field(gt=0.0, le=64.0)] | None = None
    # the paper's b (= 1 / bottleneck_multiplier); give one of the two at most
    bottleneck_ratio: Annotated[float, Field(gt=0.0, le=64.0)] | None = None
    # squeeze-excitation width = round(se_ratio * block input width); 0 disables SE
    se_ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0

    @model_validator(mode="after")
    def _one_bottleneck_form(self):
        if self.bottleneck_multiplier is not None and self.bottleneck_ratio is not None:
            raise ValueError(
                "give bottleneck_multiplier (pycls bot_mul) or bottleneck_ratio (the paper's b),"
                " not both: one is the reciprocal of the other"
            )
        return self

    @property
    def bottleneck(self) -> float:
        """The bottleneck multiplier (pycls bot_mul)."""
        if self.bottleneck_ratio is not None:
            return 1.0 / self.bottleneck_ratio
        return 1.0 if self.bottleneck_multiplier is None else self.bottleneck_multiplier


class StageSpec(_BottleneckFields):
    block: str = "res_bottleneck"  # a registered block type (`archc schema` lists them)
    depth: PositiveInt  # number of blocks
    width: PositiveInt  # output channels of every block in the stage
    stride: Annotated[int, Field(ge=1, le=8)] = 2  # stride of the stage's first block
    group_width: PositiveInt | None = None  # channels per group of the grouped conv; None: dense
    groups: PositiveInt | None = None  # number of groups instead (ResNeXt's cardinality)
    # mobileone, mobileone_unit: k over-parameterized conv branches (None: 1)
    branches: Annotated[int, Field(ge=1, le=16)] | None = None
    activation: Activation = "relu"  # the block's non-linearity
    kernel: Kernel = 3  # side of the block's spatial (depthwise) conv, odd (MBConv: 3 or 5)
    padding: Annotated[int, Field(ge=0, le=8)] | None = None  # conv: zero padding; None: (k-1)//2
    # inverted_residual, repmixer, repvit: expansion t (hidden = round(t * w_in)); reducenet:
    # branch1 width factor
    expansion: Annotated[float, Field(gt=0.0, le=64.0)] = 1.0
    se_base: Literal["input", "inner"] = "input"  # SE width from the block input or SE's input
    se_divisor: PositiveInt = 1  # SE width: make_divisible(se_ratio * base, se_divisor); 1: round
    se_gate: Literal["sigmoid", "hardsigmoid"] = "sigmoid"  # SE gate
    se_activation: Literal["relu", "silu"] = "relu"  # SE's inner activation (EfficientNet: silu)
    # res_bottleneck: SE after the 3x3 (inner: RegNetY) or after the last conv's BN (output: SENet)
    se_position: Literal["inner", "output"] = "inner"
    dense_first: bool = False  # shufflenet_v1: the strided first unit has a dense first 1x1 conv
    phase: Literal["train", "reduced"] = "train"  # reducenet: train (scaler 1) or reduced (0)
    # inverted_residual (DepthShrinker): no activations in this stage's blocks, which are then
    # linear; the expand conv pads instead of the depthwise one, so `fuse` merges exactly
    remove_activations: bool = False
    # repmixer: initial value of the per-channel layer scales (FastViT 1e-5); None: no scales
    layer_scale: Annotated[float, Field(gt=0.0, le=16.0)] | None = None
    pool: PoolSpec | None = None  # a pooling layer after the stage's last block (`sN.pool`)
    bn: BatchNormSpec | None = None  # this stage's BatchNorm eps and momentum; None: the model's

    def se_width(self, w_in: int, width: int) -> int:
        """Width of the SE on `width` channels of a block entered with `w_in` (0: no SE):
        round(se_ratio * base), or make_divisible(se_ratio * base, se_divisor) when the divisor
        is above 1; base is w_in (`se_base: input`) or `width` (`inner`)."""
        if self.se_ratio == 0:
            return 0
        value = self.se_ratio * (w_in if self.se_base == "input" else width)
        return make_divisible(value, self.se_divisor) if self.se_divisor > 1 else int(round(value))

    def train_form_groups(self, w_in: int) -> int:
        """Groups of a train-form block's convs (repvgg, qarepvgg, acb, dbb): w_in / group_width,
        dense where the input width does not divide (a first block reading the image)."""
        if not self.group_width or w_in % self.group_width:
            return 1
        return w_in // self.group_width

    def unit_groups(self, w_in: int) -> int:
        """Groups of a `mobileone_unit`'s convs: `groups`, or w_in / group_width (group_width 1:
        depthwise)."""
        if self.group_width:
            return w_in // self.group_width
        return self.groups or 1

    @field_validator("kernel")
    @classmethod
    def _odd_kernel(cls, kernel: int) -> int:
        if kernel % 2 == 0:
            raise ValueError(f"kernel {kernel} is even: 'same' padding needs an odd kernel")
        return kernel

    @field_validator("groups")
    @classmethod
    def _one_group_form(cls, groups: int | None, info: ValidationInfo) -> int | None:
        if groups is not None and info.data.get("group_width") is not None:
            raise ValueError("give group_width (channels per group) or groups, not both")
        return groups

    @field_validator("se_base", "se_divisor", "se_gate", "se_activation", "se_position")
    @classmethod
    def _se_options_need_se(cls, value: Any, info: ValidationInfo) -> Any:
        if value != cls.model_fields[info.field_name].default and not info.data.get("se_ratio"):
            raise ValueError(f"{info.field_name} needs squeeze-excitation: set se_ratio > 0")
        return value


class CompoundScaling(_Strict):
    # widths of stem, stages and head: make_divisible(c * width, width_divisor) (B1: 1.0, B7: 2.0)
    width: Annotated[float, Field(gt=0.0, le=16.0)]
    depth: Annotated[float, Field(gt=0.0, le=16.0)]  # stage depths: ceil(n * depth) (B7: 3.1)


class AnyNetBody(_Strict):
    type: Literal["anynet"]
    stages: Annotated[list[StageSpec], Field(min_length=1)]  # the explicit stage list
    # MobileNet's alpha: stage width w -> make_divisible(w * alpha, width_divisor); None: as given
    width_multiplier: Annotated[float, Field(gt=0.0, le=16.0)] | None = None
    # EfficientNet's compound scaling of stem, stage and head widths and of stage depths
    compound_scaling: CompoundScaling | None = None
    width_divisor: PositiveInt = 8  # rounding quantum of multiplied widths (needs a multiplier)
    # stochastic depth: block i of n drops its residual branch with probability rate * i / n in
    # training mode (torchvision's EfficientNet schedule); the identity in eval mode
    drop_path_rate: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0

    @field_validator("compound_scaling")
    @classmethod
    def _one_width_rule(cls, scaling: CompoundScaling | None, info: ValidationInfo):
        if scaling is not None and info.data.get("width_multiplier") is not None:
            raise ValueError("give width_multiplier (MobileNet: stage widths) or compound_scaling"
                             " (EfficientNet: stem, stages, head and depths), not both")
        return scaling

    @field_validator("width_divisor")
    @classmethod
    def _divisor_needs_multiplier(cls, divisor: int, info: ValidationInfo) -> int:
        multiplied = info.data.get("width_multiplier") or info.data.get("compound_scaling")
        if divisor != 8 and multiplied is None:
            raise ValueError("width_divisor rounds multiplied widths: give width_multiplier or "
                             "compound_scaling")
        return divisor

    def scale_width(self, width: int) -> int:
        """A stem or head width under compound scaling (unchanged without it)."""
        if self.compound_scaling is None:
            return width
        return make_divisible(width * self.compound_scaling.width, self.width_divisor)


class RegNetBody(_BottleneckFields):
    type: Literal["regnet"]
    q: PositiveInt = 8  # widths are quantized to multiples of q (validated before w0)
    depth: Annotated[int, Field(ge=1, le=256)]  # d: total number of blocks
    w0: Annotated[int, Field(ge=1)]  # initial width, a multiple of q
    wa: Annotated[float, Field(ge=0.0)]  # slope of the linear widths u_j = w0 + wa * j
    wm: Annotated[float, Field(gt=1.0)]  # width multiplier between stages (> 1)
    group_width: PositiveInt  # g: channels per group
    num_stages: PositiveInt | None = 4  # stages the config must give; null accepts any count
    block: str = "res_bottleneck"  # block type of every stage

    @field_validator("w0")
    @classmethod
    def _w0_quantized(cls, w0: int, info: ValidationInfo) -> int:
        q = info.data.get("q")
        if q and w0 % q:
            raise ValueError(f"w0 = {w0} is not a multiple of q = {q}")
        return w0

    def stages(self) -> list[StageSpec]:
        """The explicit stage list (`archc.frontend.regnet`: quantized linear widths, then block
        compatibility); every stage has stride 2."""
        generated = generate_widths(self.depth, self.w0, self.wa, self.wm, self.q)
        widths, group_widths = adjust_block_compatibility(
            generated.widths, self.bottleneck, self.group_width
        )
        return [
            StageSpec(
                block=self.block,
                depth=depth,
                width=width,
                stride=2,
                group_width=group_width,
                bottleneck_multiplier=self.bottleneck,
                se_ratio=self.se_ratio,
            )
            for width, depth, group_width in zip(widths, generated.depths, group_widths)
        ]


Body = Annotated[AnyNetBody | RegNetBody, Field(discriminator="type")]


class Spec(_Strict):
    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")]  # model name
    input: InputSpec = InputSpec()
    num_classes: PositiveInt = 1000  # classifier outputs
    stem: StemSpec = StemSpec()
    body: Body
    head: HeadSpec = HeadSpec()
    # VanillaNet's deep-training lambda, shared by the vanillanet stem, blocks and head: their
    # activation between two convs is (1 - lambda) relu(x) + lambda x; 1 removes it
    activation_lambda: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    # eps and momentum of every BatchNorm (stem, blocks, head) unless a stage gives its own; None:
    # each layer's own (torch's 1e-5 and 0.1; VanillaNet's layers eps 1e-6, as its reference)
    bn: BatchNormSpec | None = None

    def stages(self) -> list[StageSpec]:
        """The explicit stage list (a regnet body is lowered by `archc.frontend.regnet`; an anynet
        width multiplier or compound scaling is applied)."""
        if not isinstance(self.body, AnyNetBody):
            return self.body.stages()
        body, divisor = self.body, self.body.width_divisor
        if body.compound_scaling is not None:
            scaling = body.compound_scaling
            return [stage.model_copy(update={
                "width": make_divisible(stage.width * scaling.width, divisor),
                "depth": math.ceil(stage.depth * scaling.depth)}) for stage in body.stages]
        if body.width_multiplier is None:
            return list(body.stages)
        alpha = body.width_multiplier
        return [stage.model_copy(update={"width": make_divisible(stage.width * alpha, divisor)})
                for stage in body.stages]

    def built_stem(self) -> StemSpec:
        """The stem as built: its width compound-scaled where the body says so."""
        if not isinstance(self.body, AnyNetBody) or self.stem.width is None:
            return self.stem
        return self.stem.model_copy(update={"width": self.body.scale_width(self.stem.width)})

    def built_head(self) -> HeadSpec:
        """The head as built: its conv width compound-scaled where the body says so."""
        if not isinstance(self.body, AnyNetBody) or self.head.width is None:
            return self.head
        return self.head.model_copy(update={"width": self.body.scale_width(self.head.width)})

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


# ---------------------------------------------------------------------------------------------
# Loading and error formatting

_UNION_TAGS = {"anynet", "regnet"}


def _field_path(loc: tuple) -> str:
    parts: list[str] = []
    for index, item in enumerate(loc):
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif index > 0 and loc[index - 1] == "body" and item in _UNION_TAGS:
            continue  # pydantic's discriminator tag, not a field of the file
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "<root>"


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The schema class that owns the last element of `loc` (for key suggestions)."""
    model: Any = Spec
    for item in loc[:-1]:
        if isinstance(item, int):
            continue
        if model is Spec and item == "body":
            model = None
            continue
        if model is None and item in _UNION_TAGS:
            model = AnyNetBody if item == "anynet" else RegNetBody
            continue
        if model is AnyNetBody and item == "stages":
            model = StageSpec
            continue
        field = model.model_fields.get(item) if model else None
        model = _mapping_model(getattr(field, "annotation", None))
    return model


def _mapping_model(annotation: Any) -> type[BaseModel] | None:
    """The schema class of a field annotated `Model` or `Model | None`."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _body_union(error: dict) -> str:
    if error["type"] == "union_tag_invalid":
        return f"unknown body type {error['ctx']['tag']!r}; valid types: anynet, regnet"
    return "body needs a 'type' (anynet or regnet)"


def validate_schema(data: Any, source: str = "<spec>") -> Spec:
    """Validate a mapping against the schema (structure, types, ranges); raise `SpecError` naming
    `source` and the field path. Cross-field checks are `archc.frontend.loading`'s."""
    if not isinstance(data, Mapping):
        raise SpecError(f"a spec must be a mapping, got {type(data).__name__}", "<root>", source)
    try:
        return Spec.model_validate(dict(data))
    except ValidationError as exc:
        found = [(describe(error, _model_at, _body_union), _error_path(error))
                 for error in ordered_errors(exc)]
        (message, path), *others = found
        raise SpecError(message, path, source, tuple(others[:MAX_REPORTED - 1]),
                        max(0, len(found) - MAX_REPORTED)) from None


def _error_path(error: dict) -> str:
    path = _field_path(error["loc"])
    return path + ".type" if error["type"] == "union_tag_invalid" else path
