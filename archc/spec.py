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
stage list (see `archc.regnet`). Everything downstream of `Spec.stages()` sees only explicit stages.

Bottleneck width: pycls' *multiplier* `bot_mul` gives the bottleneck width `w_b = round(w *
bot_mul)`; the paper's bottleneck *ratio* `b` is its reciprocal (`w_b = w / b`). Specs say which
one they mean: `bottleneck_multiplier` or `bottleneck_ratio`, never both.

Width multiplier (MobileNet): an anynet body with `width_multiplier` m scales every stage width to
`make_divisible(w * m, width_divisor)`, torchvision's rule: round to the nearest multiple d of the
divisor, `max(d, int(v + d / 2) // d * d)`, plus d if that fell below 0.9 v. Stem and head widths
are never scaled: a spec states them.

Validation happens in two steps with one error format (`file:field.path: what is wrong`):
structure and ranges here (pydantic), then block-specific checks by the registered block classes
(`archc.blocks`), which live beside the modules they describe.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from archc.errors import SpecError

PositiveInt = Annotated[int, Field(ge=1)]
Activation = Literal["relu", "relu6", "hardswish"]


def make_divisible(value: float, divisor: int) -> int:
    """torchvision's `_make_divisible`: nearest multiple of `divisor` (at least `divisor`), one
    multiple more if rounding lost over 10% of `value`."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class _Strict(BaseModel):
    """Unknown keys are errors; types are not coerced (a string is not a number)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class InputSpec(_Strict):
    channels: PositiveInt = 3  # input channels (3 for RGB)
    size: Annotated[int, Field(ge=8, le=4096)] = 224  # square input side, pixels


class StemSpec(_Strict):
    # simple: 3x3 conv + BN + act (pycls SimpleStem); simple_pool: simple + 3x3 max-pool stride 2
    # (ShuffleNet); resnet: 7x7 conv + BN + act + 3x3 max-pool stride 2;
    # none: no stem, the first stage reads the input (RepVGG's stem is its first block)
    type: Literal["simple", "simple_pool", "resnet", "none"] = "simple"
    # output channels, default 32 (RegNet: always 32); not allowed with none
    width: PositiveInt | None = None
    stride: Annotated[int, Field(ge=1, le=4)] = 2  # stride of the stem conv (1: CIFAR-size input)
    activation: Activation = "relu"  # activation after the stem's BN

    @model_validator(mode="after")
    def _nothing_without_stem(self):
        if self.type == "none":
            given = [name for name, field in type(self).model_fields.items()
                     if name != "type" and getattr(self, name) != field.default]
            if given:
                raise ValueError(f"a stem of type none has no {given[0]}")
        return self

    @property
    def channels(self) -> int:
        return 32 if self.width is None else self.width


class HeadSpec(_Strict):
    type: Literal["classifier"] = "classifier"  # [1x1 conv BN act], avg pool, flatten, Linear
    # output channels of a 1x1 conv + BN + act before the pool (MobileNetV2 1280); None: no conv
    width: PositiveInt | None = None
    activation: Activation = "relu"  # activation of that conv (needs width)
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0  # dropout before the classifier

    @field_validator("activation")
    @classmethod
    def _activation_needs_conv(cls, activation: str, info: ValidationInfo) -> str:
        if activation != "relu" and info.data.get("width") is None:
            raise ValueError("the head has an activation only after its 1x1 conv: give width")
        return activation


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
    block: str = "res_bottleneck"  # a registered block type (`archc blocks` lists them)
    depth: PositiveInt  # number of blocks
    width: PositiveInt  # output channels of every block in the stage
    stride: Annotated[int, Field(ge=1, le=8)] = 2  # stride of the stage's first block
    group_width: PositiveInt | None = None  # channels per group of the grouped conv; None: dense
    groups: PositiveInt | None = None  # number of groups instead (ResNeXt's cardinality)
    branches: Annotated[int, Field(ge=1, le=16)] | None = None  # mobileone: k conv branches (1)
    activation: Activation = "relu"  # the block's non-linearity
    # inverted_residual: expansion t (hidden = round(t * w_in)); reducenet: branch1 width factor
    expansion: Annotated[float, Field(gt=0.0, le=64.0)] = 1.0
    se_base: Literal["input", "inner"] = "input"  # SE width from the block input or SE's input
    se_divisor: PositiveInt = 1  # SE width: make_divisible(se_ratio * base, se_divisor); 1: round
    se_gate: Literal["sigmoid", "hardsigmoid"] = "sigmoid"  # SE gate
    dense_first: bool = False  # shufflenet_v1: the strided first unit has a dense first 1x1 conv
    phase: Literal["train", "reduced"] = "train"  # reducenet: train (scaler 1) or reduced (0)

    @field_validator("groups")
    @classmethod
    def _one_group_form(cls, groups: int | None, info: ValidationInfo) -> int | None:
        if groups is not None and info.data.get("group_width") is not None:
            raise ValueError("give group_width (channels per group) or groups, not both")
        return groups

    @field_validator("se_base", "se_divisor", "se_gate")
    @classmethod
    def _se_options_need_se(cls, value: Any, info: ValidationInfo) -> Any:
        if value != cls.model_fields[info.field_name].default and not info.data.get("se_ratio"):
            raise ValueError(f"{info.field_name} needs squeeze-excitation: set se_ratio > 0")
        return value


class AnyNetBody(_Strict):
    type: Literal["anynet"]
    stages: Annotated[list[StageSpec], Field(min_length=1)]  # the explicit stage list
    # MobileNet's alpha: stage width w -> make_divisible(w * alpha, width_divisor); None: as given
    width_multiplier: Annotated[float, Field(gt=0.0, le=16.0)] | None = None
    width_divisor: PositiveInt = 8  # rounding quantum of multiplied widths (needs the multiplier)

    @field_validator("width_divisor")
    @classmethod
    def _divisor_needs_multiplier(cls, divisor: int, info: ValidationInfo) -> int:
        if divisor != 8 and info.data.get("width_multiplier") is None:
            raise ValueError("width_divisor rounds multiplied widths: give width_multiplier")
        return divisor


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


Body = Annotated[AnyNetBody | RegNetBody, Field(discriminator="type")]


class Spec(_Strict):
    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")]  # model name
    input: InputSpec = InputSpec()
    num_classes: PositiveInt = 1000  # classifier outputs
    stem: StemSpec = StemSpec()
    body: Body
    head: HeadSpec = HeadSpec()

    def stages(self) -> list[StageSpec]:
        """The explicit stage list (a regnet body is lowered by `archc.regnet`; an anynet width
        multiplier is applied)."""
        if isinstance(self.body, AnyNetBody):
            alpha, divisor = self.body.width_multiplier, self.body.width_divisor
            if alpha is None:
                return list(self.body.stages)
            return [stage.model_copy(update={"width": make_divisible(stage.width * alpha, divisor)})
                    for stage in self.body.stages]
        from archc.regnet import regnet_stages

        return regnet_stages(self.body)

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
        annotation = getattr(field, "annotation", None)
        model = (
            annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel)
            else None
        )
    return model


def _describe(error: dict) -> str:
    kind, loc = error["type"], error["loc"]
    if kind == "extra_forbidden":
        model = _model_at(loc)
        message = f"unknown key {loc[-1]!r}"
        if model is not None:
            close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
            if close:
                message += f" (did you mean {close[0]!r}?)"
            else:
                message += f"; valid keys: {', '.join(model.model_fields)}"
        return message
    if kind == "missing":
        return "required field is missing"
    if kind == "union_tag_invalid":
        return f"unknown body type {error['ctx']['tag']!r}; valid types: anynet, regnet"
    if kind == "union_tag_not_found":
        return "body needs a 'type' (anynet or regnet)"
    if kind in ("model_type", "dict_type"):
        return "should be a mapping"
    if kind == "value_error":
        return error["msg"].removeprefix("Value error, ")
    value = error.get("input")
    message = error["msg"]
    if not isinstance(value, (dict, list)):
        message += f" (got {value!r})"
    return message


def spec_from_mapping(data: Any, source: str = "<spec>") -> Spec:
    """Validate a mapping as a spec; raise `SpecError` naming `source` and the field path."""
    if not isinstance(data, Mapping):
        raise SpecError(f"a spec must be a mapping, got {type(data).__name__}", "<root>", source)
    try:
        spec = Spec.model_validate(dict(data))
    except ValidationError as exc:
        # an unknown key explains a "missing" one beside it (a misspelling): report it first
        errors = sorted(exc.errors(), key=lambda error: error["type"] != "extra_forbidden")
        first = errors[0]
        path = _field_path(first["loc"])
        if first["type"] == "union_tag_invalid":
            path += ".type"
        raise SpecError(_describe(first), path, source) from None
    try:
        _check_semantics(spec)
    except SpecError as exc:
        raise exc.with_source(source) from None
    return spec


def _check_semantics(spec: Spec) -> None:
    """Checks that need more than one field: RegNet stage count, block-specific rules."""
    from archc.blocks import check_stage

    if isinstance(spec.body, RegNetBody):
        check_stage(spec.body.block, None, "body.block")
        stages = spec.stages()
        if spec.body.num_stages is not None and len(stages) != spec.body.num_stages:
            raise SpecError(
                f"these (depth, w0, wa, wm, q) give {len(stages)} stages "
                f"(widths {[s.width for s in stages]}), {spec.body.num_stages} requested",
                "body",
            )
        return
    width = spec.input.channels if spec.stem.type == "none" else spec.stem.channels
    for index, stage in enumerate(spec.stages()):
        check_stage(stage.block, stage, f"body.stages[{index}]", width)
        width = stage.width


def load_spec(source: str | Path | Mapping[str, Any]) -> Spec:
    """Load a spec from a YAML/JSON file path or a mapping. Raises `SpecError`."""
    if isinstance(source, Mapping):
        return spec_from_mapping(source)
    path = Path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError("no such file", "", str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"cannot read: {exc}", "", str(path)) from None
    return spec_from_mapping(_parse(text, path), str(path))


def _parse(text: str, path: Path) -> Any:
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text, object_pairs_hook=_unique_keys)
        except json.JSONDecodeError as exc:
            raise SpecError(f"invalid JSON: {exc.msg}", f"line {exc.lineno}", str(path)) from None
        except _DuplicateKey as exc:
            raise SpecError(f"invalid JSON: duplicate key {exc.args[0]!r}", "", str(path)) from None
    import yaml

    try:
        return yaml.load(text, Loader=_unique_key_loader())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(f"invalid YAML: {problem}", where, str(path)) from None


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _unique_key_loader():
    """yaml.SafeLoader that rejects duplicate keys (plain safe_load keeps the last silently)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}", key_node.start_mark
                    )
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the spec language (`archc schema`)."""
    from archc.blocks import BLOCKS

    schema = Spec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "archc spec"
    stage = schema["$defs"]["StageSpec"]["properties"]["block"]
    stage["enum"] = sorted(BLOCKS)
    return schema
