"""One line per schema error: pydantic's validation errors as archc reports them (torch-free).

Both file schemas (specs, `archc.frontend.spec`; design spaces, `archc.space.design_space`) report
each error of a file as `file:field.path: what is wrong` (up to `MAX_REPORTED`), unknown keys first;
a missing field is not reported when a misspelt key beside it names it (`w_0` for `w0`). The wording
is shared; each schema supplies which model owns a location (for "did you mean" on unknown keys) and
how to word its tagged unions.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ValidationError

from archc.common.suggest import close_matches, did_you_mean

MAX_REPORTED = 10  # errors listed per file; the rest are counted


def first_error(exc: ValidationError) -> dict[str, Any]:
    """The error to report: an unknown key first, else pydantic's first."""
    return ordered_errors(exc)[0]


def ordered_errors(exc: ValidationError) -> list[dict[str, Any]]:
    """Every error once per field, unknown keys first (a misspelling explains the missing field
    beside it), else in pydantic's order."""
    seen, errors = set(), []
    for error in sorted(exc.errors(), key=lambda error: error["type"] != "extra_forbidden"):
        if error["loc"] not in seen and not _explained_by_misspelling(error, errors):
            seen.add(error["loc"])
            errors.append(error)
    return errors


def _explained_by_misspelling(error: dict[str, Any], unknown: list[dict[str, Any]]) -> bool:
    """A missing field whose name is close to an unknown key beside it (`w_0` for `w0`): the
    unknown key's "did you mean" already says it, so it is not reported twice."""
    if error["type"] != "missing":
        return False
    parent, name = error["loc"][:-1], str(error["loc"][-1])
    return any(other["type"] == "extra_forbidden" and other["loc"][:-1] == parent
               and close_matches(other["loc"][-1], [name])
               for other in unknown)


def describe(error: dict[str, Any], owner: Callable[[tuple], type[BaseModel] | None],
             union: Callable[[dict[str, Any]], str]) -> str:
    """What is wrong, in one line. `owner(loc)` is the model holding the last key of `loc`;
    `union(error)` words a tagged union's missing or unknown tag."""
    kind, loc = error["type"], error["loc"]
    if kind == "extra_forbidden":
        model = owner(loc)
        message = f"unknown key {loc[-1]!r}"
        if model is not None:
            message += (did_you_mean(loc[-1], model.model_fields)
                        or f"; valid keys: {', '.join(model.model_fields)}")
        return message
    if kind == "missing":
        return "required field is missing"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        return union(error)
    if kind in ("model_type", "dict_type"):
        return "should be a mapping"
    if kind == "value_error":
        return error["msg"].removeprefix("Value error, ")
    value = error.get("input")
    message = error["msg"]
    if not isinstance(value, (dict, list)):
        message += f" (got {value!r})"
    if kind == "float_type" and isinstance(value, str) and _DOTLESS_EXPONENT.fullmatch(value):
        message += "; YAML reads an exponent without a dot as text: write 1.0e-3, not 1e-3"
    return message


# 1e-3: a number to JSON and to YAML 1.2, text to YAML 1.1 (PyYAML), which wants 1.0e-3
_DOTLESS_EXPONENT = re.compile(r"[+-]?\d+[eE][+-]?\d+")
