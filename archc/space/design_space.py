"""Design spaces: the one schema of space files, and seeded rejection sampling from them.

A space file is YAML (or JSON) in the spec language's style: a base spec, distributions over any of
its fields, constraints and a complexity window::

    name: anynetx_c
    base:                                   # a spec; sampled fields override it
      input: {channels: 3, size: 224}
      body: {type: anynet, stages: [{depth: 1, width: 8}, ...]}
    parameters:                             # field path -> distribution (archc.space.distributions)
      body.stages[*].depth: {distribution: log_uniform, low: 1, high: 16, quantum: 1}
      body.stages[*].group_width: {distribution: power2, low: 1, high: 32, quantum: 1, shared: true}
    monotonic:                              # w_{i+1} >= w_i (block style: YAML reads a
      - body.stages[*].width                # [*] inside [...] as an alias)
    window: {flops: [360000000, 400000000]} # inclusive [min, max]; also params, acts
    adjust_groups: true                     # pycls' block compatibility for anynet stages

Field paths name spec fields with dots; `stages[i]` is one stage, `stages[*]` every stage: one
independent draw per stage, or one value for all of them with `shared: true` (AnyNetX_B's b_i = b).

Sampling, for seed s: tries come in batches of 256, batch b drawn from its own generator
`PCG64(SeedSequence(s, spawn_key=(b,)))` (versioned; no Python hash or dict order anywhere), so a
seed fixes the whole file on every machine. One try:
1. draw every parameter, in the sorted order of the paths (not the file's); a monotonic path is
   drawn non-decreasing from its law (exactly the law of i.i.d. draws conditioned on not
   decreasing: `archc.space.distributions.non_decreasing`);
2. write the values into the base; with `adjust_groups` give each anynet stage that has a group
   width pycls' `adjust_block_compatibility`, as RegNet does (the group width is clamped to the
   bottleneck width, which is rounded to a multiple of it, so the stage width may change). With
   a shared group width (`body.stages[*].group_width` drawn with `shared: true`, AnyNetX_C to E)
   the clamp would give a stage narrower than g a g of its own: such a try is rejected instead,
   so every accepted model has one g, the drawn one (the law of g becomes its drawn law
   conditioned on g <= every stage's bottleneck width); the widths are only rounded to multiples
   of g. `SamplingStats.adjusted` counts the accepted models the adjustment changed (a width or
   a group width other than drawn);
3. reject it if it fails the schema; if a RegNet body does not have the stage count it asks for
   with every stage exponent k used (pycls: stages = max(round(s_j)) + 1); if a monotonic field
   decreases in the final stages; if its analytic complexity (`archc.frontend.analytic_complexity`)
   is outside the window; or, last, if `archc.frontend.loading.spec_from_mapping` (the cross-field
   checks) refuses it. Every accepted spec has passed `spec_from_mapping`.
The sampler gives up, with the counts of each rejection reason, when `max_tries` consecutive tries
are rejected.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import re
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from archc.common.suggest import did_you_mean
from archc.errors import SpaceError, SpecError
from archc.frontend.regnet import adjust_block_compatibility, generate_widths
from archc.frontend.schema_errors import describe, first_error
from archc.frontend.spec import AnyNetBody, RegNetBody, Spec, StageSpec, validate_schema
from archc.space import distributions

Number = int | float
NAME_PATTERN = r"^[A-Za-z0-9_.\-]+$"
COMPLEXITY = ("flops", "params", "acts")
TRIES_PER_BATCH = 256  # tries drawn per generator; part of what a seed means: never change it


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class _Scalar(_Strict):
    low: Number  # smallest value (inclusive)
    high: Number  # largest value (inclusive)
    quantum: Number  # values are multiples of it; an int quantum gives int values
    shared: bool = False  # a stages[*] path: one value for every stage

    def draw(self, rng: np.random.Generator, size) -> np.ndarray:
        return distributions.DRAW[self.kind](rng, self.low, self.high, self.quantum, size)

    def law(self) -> tuple[np.ndarray, np.ndarray]:
        return distributions.law(self.kind, self.low, self.high, self.quantum)

    @property
    def kind(self) -> str:
        return "power2" if self.distribution == "power2_uniform" else self.distribution


class Uniform(_Scalar):
    distribution: Literal["uniform"]


class LogUniform(_Scalar):
    distribution: Literal["log_uniform"]


class Power2(_Scalar):
    distribution: Literal["power2", "power2_uniform"]  # power2_uniform: pycls' name


class Power2OrLogUniform(_Scalar):
    distribution: Literal["power2_or_log_uniform"]


class Choice(_Strict):
    distribution: Literal["choice"]
    values: Annotated[list[Any], Field(min_length=1)]  # equally likely
    shared: bool = False  # a stages[*] path: one value for every stage

    def draw(self, rng: np.random.Generator, size) -> np.ndarray:
        options = np.empty(len(self.values), dtype=object)
        for index, value in enumerate(self.values):
            options[index] = value
        return options[rng.integers(len(self.values), size=size)]

    def law(self) -> tuple[np.ndarray, np.ndarray]:
        values = np.array(sorted(self.values))
        return values, np.full(len(values), 1 / len(values))


Distribution = Annotated[
    Uniform | LogUniform | Power2 | Power2OrLogUniform | Choice, Field(discriminator="distribution")
]
DISTRIBUTION_NAMES = ("uniform", "log_uniform", "power2", "power2_or_log_uniform", "choice")


Bounds = Annotated[list[Number], Field(min_length=2, max_length=2)]


class Window(_Strict):
    flops: Bounds | None = None  # [min, max] multiply-adds, inclusive
    params: Bounds | None = None  # [min, max] parameters
    acts: Bounds | None = None  # [min, max] activations

    @model_validator(mode="after")
    def _ordered(self):
        for name in COMPLEXITY:
            bounds = getattr(self, name)
            if bounds is not None and bounds[0] > bounds[1]:
                raise ValueError(f"{name}: min {bounds[0]} exceeds max {bounds[1]}")
        return self


class SpaceSpec(_Strict):
    name: Annotated[str, Field(min_length=1, pattern=NAME_PATTERN)]  # names the samples
    base: dict[str, Any]  # a spec mapping (its name is replaced by the sample's)
    parameters: Annotated[dict[str, Distribution], Field(min_length=1)]  # field path -> law
    monotonic: list[str] = []  # stages[*] fields that must not decrease from stage to stage
    window: Window = Window()  # complexity limits at the spec's input size
    adjust_groups: bool = False  # pycls block compatibility of anynet stages (module docstring)
    max_tries: Annotated[int, Field(ge=1)] = 20_000  # consecutive rejections before giving up


# ---------------------------------------------------------------------------------------------
# Field paths


@dataclass(frozen=True)
class FieldPath:
    """A parsed field path: `parts` of (name, index) with index None, an int or '*'."""

    text: str
    parts: tuple[tuple[str, int | str | None], ...]

    @property
    def per_stage(self) -> bool:
        return any(index == "*" for _, index in self.parts)

    @property
    def leaf(self) -> str:
        return self.parts[-1][0]


_PART = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?:\[(\*|\d+)\])?$")
_NESTED = {"input": "InputSpec", "stem": "StemSpec", "head": "HeadSpec"}


def parse_path(text: str, base: Mapping[str, Any]) -> FieldPath:
    """Parse `text` and check it names a scalar spec field that the base can hold; ValueError
    says what is wrong."""
    from archc.frontend import spec as schema

    parts: list[tuple[str, int | str | None]] = []
    for raw in text.split("."):
        match = _PART.match(raw)
        if match is None:
            raise ValueError(f"{raw!r} is not a field name (like width, stages[0] or stages[*])")
        name, index = match.group(1), match.group(2)
        parts.append((name, None if index is None else "*" if index == "*" else int(index)))
    model: type[BaseModel] | None = Spec
    node: Any = base
    for position, (name, index) in enumerate(parts):
        if model is None:
            raise ValueError(f"{'.'.join(p for p, _ in parts[:position])} has no fields")
        if name not in model.model_fields:
            hint = did_you_mean(name, model.model_fields)
            raise ValueError(f"{model.__name__} has no field {name!r}{hint}")
        node = node.get(name) if isinstance(node, Mapping) else None
        if model is Spec and name == "body":
            body_type = node.get("type") if isinstance(node, Mapping) else None
            model = {"anynet": AnyNetBody, "regnet": RegNetBody}.get(body_type)
            if model is None:
                raise ValueError("the base needs a body with a type (anynet or regnet)")
        elif model is AnyNetBody and name == "stages":
            stages = node if isinstance(node, list) else []
            if index is None:
                raise ValueError("name one stage, stages[i], or every stage, stages[*]")
            if index != "*" and index >= len(stages):
                raise ValueError(f"stage {index} does not exist: the base has {len(stages)} stages")
            model = StageSpec
            node = stages[0 if index == "*" else index] if stages else None
        elif index is not None:
            raise ValueError(f"{name} is not a list")
        elif model is Spec and name in _NESTED:
            model = getattr(schema, _NESTED[name])
        else:
            model = None
    if model is not None:
        raise ValueError(f"{text} is a section, not a field: name one of its fields")
    return FieldPath(text, tuple(parts))


def _targets(path: FieldPath, mapping: dict[str, Any]) -> list[tuple[dict[str, Any], str]]:
    """(container, key) pairs of every place `path` names in `mapping`, creating sections."""
    containers: list[Any] = [mapping]
    for name, index in path.parts[:-1]:
        following = []
        for container in containers:
            child = container.setdefault(name, [] if index is not None else {})
            if index == "*":
                following.extend(child)
            elif index is not None:
                following.append(child[index])
            else:
                following.append(child)
        containers = following
    return [(container, path.leaf) for container in containers]


# ---------------------------------------------------------------------------------------------
# Loading


def load_space(source: str | Path, overrides: list[tuple[str, Any]] = ()) -> Space:
    """Read, parse (safe YAML / JSON, duplicate keys rejected) and validate a space file, with
    optional `(dotted.key, value)` overrides of its mapping (`--set`). Raises `SpaceError`."""
    from archc.frontend.loading import parse_text
    from archc.frontend.reference import resolve

    path = resolve(source, "spaces", SpaceError)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpaceError("no such file", "", str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpaceError(f"cannot read: {exc}", "", str(path)) from None
    try:
        data = parse_text(text, path)
    except SpecError as exc:
        raise SpaceError(exc.message, exc.path, str(path)) from None
    if isinstance(data, dict):
        for key, value in overrides:
            try:
                _override(data, key, value)
            except ValueError as exc:
                raise SpaceError(f"--set {key}: {exc}", "", str(path)) from None
    return space_from_mapping(data, str(path))


_KEY = re.compile(r"\[([^\]]+)\]|([^.\[\]]+)")


def _override(data: dict[str, Any], key: str, value: Any) -> None:
    """Set `key` (the error messages' path syntax: `base.input.size`,
    `parameters[body.depth].high`, `base.body.stages[0].width`) to `value`."""
    parts = [bracket or plain for bracket, plain in _KEY.findall(key)]
    if not parts:
        raise ValueError("not a key")
    node: Any = data
    for position, part in enumerate(parts):
        last = position == len(parts) - 1
        if isinstance(node, list):
            if not (part.isdigit() and int(part) < len(node)):
                raise ValueError(f"no item {part} in a list of {len(node)}")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise ValueError(f"{parts[position - 1]} holds no keys")


def space_from_mapping(data: Any, source: str = "<space>") -> Space:
    """Validate a mapping as a space; raise `SpaceError` naming `source` and the field path."""
    if not isinstance(data, Mapping):
        raise SpaceError(f"a space must be a mapping, got {type(data).__name__}", "<root>", source)
    try:
        schema = SpaceSpec.model_validate(dict(data))
    except ValidationError as exc:
        first = first_error(exc)
        raise SpaceError(describe(first, _owner, _distribution_union), _field_path(first),
                         source) from None
    return Space(schema, source)


def _field_path(error: dict) -> str:
    loc, parts = error["loc"], []
    for position, item in enumerate(loc):
        if position > 0 and loc[position - 1] == "parameters" or isinstance(item, int):
            parts.append(f"[{item}]")
        elif position > 1 and loc[position - 2] == "parameters" and item in DISTRIBUTION_TAGS:
            continue  # pydantic's discriminator tag
        else:
            parts.append(("." if parts else "") + str(item))
    path = "".join(parts) or "<root>"
    if error["type"] in ("union_tag_invalid", "union_tag_not_found"):
        path += ".distribution"
    return path


DISTRIBUTION_TAGS = (*DISTRIBUTION_NAMES, "power2_uniform")
_MODELS = {"window": Window, "uniform": Uniform, "log_uniform": LogUniform, "power2": Power2,
           "power2_uniform": Power2, "power2_or_log_uniform": Power2OrLogUniform, "choice": Choice}


def _owner(loc: tuple) -> type[BaseModel] | None:
    return SpaceSpec if len(loc) == 1 else _MODELS.get(loc[-2])


def _distribution_union(error: dict) -> str:
    if error["type"] == "union_tag_not_found":
        return f"give a distribution: {', '.join(DISTRIBUTION_NAMES)}"
    tag = str(error["ctx"]["tag"])
    return (f"unknown distribution {tag!r}{did_you_mean(tag, DISTRIBUTION_TAGS)}; valid: "
            f"{', '.join(DISTRIBUTION_NAMES)}")


# ---------------------------------------------------------------------------------------------
# Sampling


@dataclass
class Sample:
    """One accepted model: its id, spec mapping, exact complexity and the drawn parameters."""

    id: str
    index: int
    spec: dict[str, Any]
    complexity: dict[str, int]
    parameters: dict[str, Any]

    def record(self, space: str, seed: int) -> dict[str, Any]:
        return {"id": self.id, "space": space, "seed": seed, "index": self.index,
                "spec": self.spec, "complexity": self.complexity, "parameters": self.parameters}


SHARED_GROUP_REASON = "shared group width above a stage's bottleneck width"


@dataclass
class SamplingStats:
    tries: int = 0
    accepted: int = 0
    rejected: Counter = field(default_factory=Counter)  # reason -> count
    adjusting: bool = False  # whether the space adjusts group widths (`adjust_groups`)
    adjusted: int = 0  # accepted models whose widths or group widths the adjustment changed

    @property
    def acceptance(self) -> float:
        return self.accepted / self.tries if self.tries else 0.0

    def summary(self) -> str:
        reasons = ", ".join(f"{reason} {count:,}" for reason, count in self.rejected.most_common())
        text = (f"accepted {self.accepted:,} of {self.tries:,} tries "
                f"(acceptance rate {100 * self.acceptance:.2f}%)")
        if self.adjusting:
            text += (f"; the group adjustment changed {self.adjusted:,} of the "
                     f"{self.accepted:,} accepted")
        return f"{text}; rejected: {reasons}" if reasons else text


class Space:
    """A validated space: parsed parameter paths and the sampler."""

    def __init__(self, schema: SpaceSpec, source: str = "<space>"):
        self.schema, self.source = schema, source
        self.paths: dict[str, FieldPath] = {}
        for text in sorted(schema.parameters):
            self.paths[text] = self._parse(text, f"parameters[{text}]")
            law = schema.parameters[text]
            if isinstance(law, _Scalar):
                problem = distributions.range_problem(law.kind, law.low, law.high, law.quantum)
                if problem is not None:
                    raise SpaceError(problem[1], f"parameters[{text}].{problem[0]}", source)
            if law.shared and not self.paths[text].per_stage:
                raise SpaceError("shared applies to stages[*] paths", f"parameters[{text}].shared",
                                 source)
        self.stage_count = len(schema.base.get("body", {}).get("stages", []))
        try:
            self._base_json = json.dumps(schema.base)
        except (TypeError, ValueError) as exc:
            raise SpaceError(f"the base must hold JSON values only: {exc}", "base",
                             source) from None
        self._writes = [(text, path, path.per_stage and not schema.parameters[text].shared)
                        for text, path in self.paths.items()]
        self.monotonic = [self._parse(text, f"monotonic[{i}]")
                          for i, text in enumerate(schema.monotonic)]
        self.monotonic_paths = set(schema.monotonic)
        group_law = schema.parameters.get("body.stages[*].group_width")
        self.shared_group_width = group_law is not None and group_law.shared
        for i, text in enumerate(schema.monotonic):
            law = schema.parameters.get(text)
            if law is None or law.shared or not self.paths[text].per_stage:
                raise SpaceError("monotonic names an unshared stages[*] parameter",
                                 f"monotonic[{i}]", source)
            if isinstance(law, Choice) and not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in law.values):
                raise SpaceError("a monotonic choice needs numbers", f"monotonic[{i}]", source)
        self._check_base()

    @property
    def name(self) -> str:
        return self.schema.name

    def _parse(self, text: str, where: str) -> FieldPath:
        try:
            return parse_path(text, self.schema.base)
        except ValueError as exc:
            raise SpaceError(str(exc), where, self.source) from None

    def _extremes(self, text: str) -> list[Any]:
        law = self.schema.parameters[text]
        return list(law.values) if isinstance(law, Choice) else [law.low, law.high]

    def _check_base(self) -> None:
        """The base with every parameter at its first extreme must pass the schema, and so must
        each extreme (low, high, every choice) of each parameter on it. A combination of values
        may still be rejected while sampling (cross-field checks, constraints, the window)."""
        first = {}
        for text, path in self.paths.items():
            value = self._extremes(text)[0]
            unshared = path.per_stage and not self.schema.parameters[text].shared
            first[text] = [value] * self.stage_count if unshared else value
        probe = self.candidate(first)
        try:
            validate_schema(probe, "<base>")
        except SpecError as exc:
            if not any(self._names(exc.path, text) for text in self.paths):
                raise SpaceError(exc.message, f"base.{exc.path}", self.source) from None
        for text, path in self.paths.items():
            for value in self._extremes(text):
                mapping = copy.deepcopy(probe)
                for container, key in _targets(path, mapping):
                    container[key] = value
                try:
                    validate_schema(mapping, "<base>")
                except SpecError as exc:
                    if self._names(exc.path, text):
                        raise SpaceError(f"value {value!r}: {exc.message}", f"parameters[{text}]",
                                         self.source) from None

    @staticmethod
    def _names(error_path: str, text: str) -> bool:
        """Whether a spec error at `error_path` is about the field(s) `text` names."""
        pattern = re.escape(text).replace(r"\[\*\]", r"\[\d+\]")
        return re.fullmatch(pattern, error_path) is not None

    def draw(self, rng: np.random.Generator, batch: int) -> list[dict[str, Any]]:
        """The parameter values of `batch` tries: per path a value, or a list of one value per
        stage for unshared stages[*] paths (non-decreasing ones for monotonic paths)."""
        columns = {}
        for text, path in self.paths.items():
            law = self.schema.parameters[text]
            if text in self.monotonic_paths:
                values, probabilities = law.law()
                indices = distributions.non_decreasing(rng, probabilities, batch, self.stage_count)
                columns[text] = values[indices].tolist()
            elif path.per_stage and not law.shared:
                columns[text] = law.draw(rng, (batch, self.stage_count)).tolist()
            else:
                columns[text] = law.draw(rng, batch).tolist()
        return [{text: column[row] for text, column in columns.items()} for row in range(batch)]

    def candidate(self, values: dict[str, Any]) -> dict[str, Any]:
        """The base with `values` written into it."""
        mapping = json.loads(self._base_json)
        mapping["name"] = self.name
        for text, path, unshared in self._writes:
            for position, (container, key) in enumerate(_targets(path, mapping)):
                container[key] = values[text][position] if unshared else values[text]
        return mapping

    def samples(self, n: int, seed: int, stats: SamplingStats | None = None) -> Iterator[Sample]:
        """Yield `n` accepted samples (module docstring); `stats` counts tries and rejections."""
        from archc.frontend.loading import spec_from_mapping

        stats = stats if stats is not None else SamplingStats()
        stats.adjusting = self.schema.adjust_groups
        misses = 0
        for batch in itertools.count() if n > 0 else ():
            rng = np.random.Generator(
                np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(batch,))))
            for values in self.draw(rng, TRIES_PER_BATCH):
                if misses >= self.schema.max_tries:
                    raise SpaceError(
                        f"nothing can be sampled: {misses:,} tries in a row were rejected "
                        f"({stats.summary()})", "window", self.source)
                stats.tries += 1
                misses += 1
                reason, adjusted = self._regnet_stage_count_refuses(values), False
                if reason is None:
                    mapping = self.candidate(values)
                    spec, complexity, reason, adjusted = self._check(mapping)
                if reason is None:
                    try:
                        spec = spec_from_mapping(mapping, "<sample>")
                    except SpecError as exc:
                        reason = f"invalid spec ({exc.path})"
                if reason is not None:
                    stats.rejected[reason] += 1
                    continue
                index = stats.accepted
                sample_id = f"{self.name}_{index:04d}"
                stats.accepted += 1
                stats.adjusted += adjusted
                misses = 0
                spec_dict = spec.model_copy(update={"name": sample_id}).to_dict()
                yield Sample(sample_id, index, spec_dict, complexity, values)
                if stats.accepted == n:
                    return

    def _regnet_stage_count_refuses(self, values: dict[str, Any]) -> str | None:
        """The reason `_check` would give for a RegNet body whose stage count is surely wrong,
        from the drawn numbers alone (no mapping, no validation: most RegNet tries end here);
        None when unsure or when the numbers are not yet validated ones."""
        body = self.schema.base.get("body", {})
        if body.get("type") != "regnet":
            return None
        fields = {name: values.get(f"body.{name}", body.get(name))
                  for name in ("depth", "w0", "wa", "wm", "num_stages")}
        if "body.num_stages" not in values and "num_stages" not in body:
            fields["num_stages"] = RegNetBody.model_fields["num_stages"].default
        numbers = [fields[name] for name in ("depth", "w0", "wa", "wm")]
        count = fields["num_stages"]
        if not (all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers)
                and isinstance(count, int) and fields["depth"] >= 1 and fields["w0"] > 0
                and fields["wa"] >= 0 and fields["wm"] > 1):
            return None
        if _last_exponent_is(RegNetBody.model_construct(**fields), count) is False:
            return f"regnet: not {count} stages, one per exponent k"
        return None

    def _check(self, mapping: dict[str, Any]
               ) -> tuple[Spec | None, dict[str, int], str | None, bool]:
        """(spec, complexity, None, whether the group adjustment changed `mapping`) or
        (_, _, the reason for rejecting `mapping`, _), cheapest and most selective checks first;
        the cross-field checks of `spec_from_mapping` run last."""
        from archc.frontend.analytic_complexity import spec_complexity

        adjusted = False
        try:
            if self.schema.adjust_groups:
                adjusted, reason = _adjust_groups(mapping, self.shared_group_width)
                if reason is not None:
                    return None, {}, reason, adjusted
            spec = validate_schema(mapping, "<sample>")
        except SpecError as exc:
            return None, {}, f"invalid spec ({exc.path})", adjusted
        body = spec.body
        stages = None
        if isinstance(body, RegNetBody):
            reason = f"regnet: not {body.num_stages or 'max(k) + 1'} stages, one per exponent k"
            sure = _last_exponent_is(body, body.num_stages) if body.num_stages else None
            if sure is False:
                return None, {}, reason, adjusted
            if sure is None:  # near a rounding boundary, or any stage count allowed: exactly
                generated = generate_widths(body.depth, body.w0, body.wa, body.wm, body.q)
                if generated.max_stages != len(generated.widths):
                    return None, {}, reason, adjusted
            stages = spec.stages()
            if body.num_stages is not None and len(stages) != body.num_stages:
                return None, {}, reason, adjusted
        stages = spec.stages() if stages is None else stages
        for path in self.monotonic:
            values = [getattr(stage, path.leaf) for stage in stages]
            if any(later < earlier for earlier, later in zip(values, values[1:])):
                return None, {}, f"monotonic {path.text}", adjusted
        complexity = dict(zip(COMPLEXITY, spec_complexity(spec, stages)))
        for name in COMPLEXITY:
            bounds = getattr(self.schema.window, name)
            if bounds is not None and not bounds[0] <= complexity[name] <= bounds[1]:
                return None, {}, f"{name} outside [{bounds[0]:g}, {bounds[1]:g}]", adjusted
        return spec, complexity, None, adjusted

def _last_exponent_is(body: RegNetBody, count: int) -> bool | None:
    """Whether the last block's exponent round(s), s = ln(u_{d-1} / w0) / ln(wm)
    (`archc.frontend.regnet`, step 1), is count - 1: the largest k, so with `count` stages every
    exponent is used. None within 1e-9 of a rounding boundary, where only the exact generator
    decides. This spares the generator for most tries."""
    last = math.log((body.w0 + body.wa * (body.depth - 1)) / body.w0) / math.log(body.wm)
    low, high = count - 1.5, count - 0.5
    if abs(last - low) <= 1e-9 or abs(last - high) <= 1e-9:
        return None
    return low < last < high


def _adjust_groups(mapping: dict[str, Any], shared: bool) -> tuple[bool, str | None]:
    """pycls' `adjust_block_compatibility` on every anynet stage that has a group width:
    (whether it changed a width or a group width, None), or (_, the rejection reason) when the
    group width is `shared` and a stage would need a smaller one (module docstring)."""
    body = mapping.get("body", {})
    if body.get("type") != "anynet":
        return False, None
    spec = validate_schema(mapping, "<sample>")
    changed = False
    for stage_mapping, stage in zip(body["stages"], spec.body.stages):
        if stage.group_width is None:
            continue
        widths, group_widths = adjust_block_compatibility(
            [stage.width], stage.bottleneck, stage.group_width)
        if shared and group_widths[0] != stage.group_width:
            return changed, SHARED_GROUP_REASON
        changed |= (widths[0], group_widths[0]) != (stage.width, stage.group_width)
        stage_mapping["width"], stage_mapping["group_width"] = widths[0], group_widths[0]
    return changed, None
