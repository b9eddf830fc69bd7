"""Loading a spec: read the file, parse it safely, validate the schema, then the cross-field checks.

1. Parse: JSON (`.json`) or YAML through `yaml.SafeLoader` (no Python objects), both rejecting
   duplicate keys, which plain loaders resolve silently by keeping the last.
2. Schema (`archc.frontend.spec.validate_schema`): structure, types and ranges.
3. Cross-field checks: a RegNet body must give the stage count it asks for; every stage must be
   buildable by its registered block when entered with the previous stage's width
   (`archc.frontend.blocks.registry.check_stage`, which refuses a stage's `bn` on a block
   without BatchNorm); `activation_lambda` is given exactly when a VanillaNet part reads it,
   `drop_path_rate` needs a block with a residual branch, and the model's `bn` a BatchNorm.

Every failure is one `SpecError`: `file:field.path: what is wrong`. Steps 1 and 2 need no torch;
`archc.frontend.blocks` (which does) is imported only for step 3, so a malformed file is reported at
once.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from archc.errors import SpecError
from archc.frontend.reference import resolve
from archc.frontend.spec import AnyNetBody, RegNetBody, Spec, validate_schema


def spec_from_mapping(data: Any, source: str = "<spec>") -> Spec:
    """Validate a mapping as a spec; raise `SpecError` naming `source` and the field path."""
    spec = validate_schema(data, source)
    try:
        _check_semantics(spec)
    except SpecError as exc:
        raise exc.with_source(source) from None
    return spec


def _check_semantics(spec: Spec) -> None:
    """Checks that need more than one field: RegNet stage count, block-specific rules, the
    parts that read `activation_lambda`, `drop_path_rate` and `bn`."""
    from archc.frontend.blocks.registry import BLOCKS, check_stage

    _check_lambda(spec)
    if isinstance(spec.body, RegNetBody):
        check_stage(spec.body.block, None, "body.block")
        stages = spec.stages()
        if spec.body.num_stages is not None and len(stages) != spec.body.num_stages:
            raise SpecError(
                f"these (depth, w0, wa, wm, q) give {len(stages)} stages "
                f"(widths {[s.width for s in stages]}), {spec.body.num_stages} requested",
                "body",
            )
        _check_batch_norm(spec)
        return
    stem = spec.built_stem()
    if stem.type == "repvit" and stem.channels % 2:
        raise SpecError(f"the repvit stem halves its width first: width {stem.channels} is odd",
                        "stem.width")
    width = spec.input.channels if stem.type == "none" else stem.channels
    for index, stage in enumerate(spec.stages()):
        check_stage(stage.block, stage, f"body.stages[{index}]", width)
        width = stage.width
    if spec.body.drop_path_rate and not any(
            BLOCKS[stage.block].stochastic_depth for stage in spec.body.stages):
        residual = sorted(name for name, cls in BLOCKS.items() if cls.stochastic_depth)
        raise SpecError(f"no block of this body has a residual branch to drop (blocks with "
                        f"stochastic depth: {', '.join(residual)})", "body.drop_path_rate")
    _check_batch_norm(spec)


def _check_lambda(spec: Spec) -> None:
    """`activation_lambda` is given exactly when a vanillanet stem, block or head reads it."""
    body = spec.body
    blocks = ([(f"body.stages[{i}]", s.block) for i, s in enumerate(body.stages)]
              if isinstance(body, AnyNetBody) else [("body.block", body.block)])
    readers = [path for path, used in (
        ("stem", spec.stem.type == "vanillanet"),
        ("head", spec.head.type == "vanillanet"),
        *((path, block == "vanillanet") for path, block in blocks),
    ) if used]
    if readers and spec.activation_lambda is None:
        raise SpecError(f"{readers[0]} has VanillaNet's deep-training activation: give "
                        "activation_lambda (0: ReLU, 1: linear)", "activation_lambda")
    if not readers and spec.activation_lambda is not None:
        raise SpecError("no vanillanet stem, block or head reads it", "activation_lambda")


def _check_batch_norm(spec: Spec) -> None:
    """The model's `bn` needs a stem, block or head with BatchNorm to set."""
    from archc.frontend.blocks.registry import BLOCKS, HEADS, STEMS

    if spec.bn is None:
        return
    body = spec.body
    blocks = ([stage.block for stage in body.stages] if isinstance(body, AnyNetBody)
              else [body.block])
    if not (STEMS[spec.stem.type].has_batch_norm or HEADS[spec.head.type].has_batch_norm(spec.head)
            or any(BLOCKS[block].has_batch_norm for block in blocks)):
        raise SpecError("no stem, block or head of this network has BatchNorm to set", "bn")


def load_spec(source: str | Path | Mapping[str, Any]) -> Spec:
    """Load a spec from a YAML/JSON file path, a shipped spec's name (`regnetx_600mf`) or a
    mapping. Raises `SpecError`."""
    if isinstance(source, Mapping):
        return spec_from_mapping(source)
    path = resolve(source, "specs")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError("no such file", "", str(path)) from None
    except UnicodeDecodeError:
        raise SpecError("not a spec: a spec is a YAML (.yaml, .yml) or JSON (.json) text file, "
                        "or the name of a shipped spec (`archc models`)", "", str(path)) from None
    except OSError as exc:
        raise SpecError(f"cannot read: {exc.strerror or exc}", "", str(path)) from None
    return spec_from_mapping(parse_text(text, path), str(path))


def parse_text(text: str, path: Path) -> Any:
    """The mapping in a JSON (by extension) or YAML document; `SpecError` with the line."""
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
    """The JSON Schema of the spec language (`archc schema`), registered block names included."""
    from archc.frontend.blocks.registry import BLOCKS

    schema = Spec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "archc spec"
    stage = schema["$defs"]["StageSpec"]["properties"]["block"]
    stage["enum"] = sorted(BLOCKS)
    return schema
