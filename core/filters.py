"""JSON filters over an event's `data`: a small, MongoDB-like query language.

A filter is an object. Each key is either a dotted path into the data (`"item.size"`,
`"tags.0"`) whose value is a literal (meaning `$eq`) or an object of operators, or one of
the logical operators `$and`, `$or` (a list of filters) and `$not` (a filter). Operators
on a path: `$eq $ne $gt $gte $lt $lte $in $nin $exists $regex $not`. A missing path
matches only `$exists: false`, `$ne`, `$nin` and a `$not` whose inner test fails.
Comparisons between different types (a number and a string) are false, never errors.
`{}` matches everything.
"""

from __future__ import annotations

import re
from typing import Any

from core.errors import Invalid

_MISSING = object()
_COMPARISONS = {
    "$gt": lambda a, b: a > b,
    "$gte": lambda a, b: a >= b,
    "$lt": lambda a, b: a < b,
    "$lte": lambda a, b: a <= b,
}
FIELD_OPERATORS = {"$eq", "$ne", "$in", "$nin", "$exists", "$regex", "$not", *_COMPARISONS}
LOGICAL_OPERATORS = {"$and", "$or", "$not"}


def validate_filter(spec: Any, field: str = "spec.filter") -> None:
    """Raise `Invalid` naming the offending part (`spec.filter.size.$foo`) of a bad filter."""
    if not isinstance(spec, dict):
        raise Invalid.field(field, "a filter is an object")
    for key, value in spec.items():
        where = f"{field}.{key}"
        if key.startswith("$"):
            if key not in LOGICAL_OPERATORS:
                raise Invalid.field(
                    where, f"unknown operator; use one of {_names(LOGICAL_OPERATORS)} here"
                )
            if key == "$not":
                validate_filter(value, where)
                continue
            if not isinstance(value, list) or not value:
                raise Invalid.field(where, "expects a non-empty list of filters")
            for index, item in enumerate(value):
                validate_filter(item, f"{where}[{index}]")
        elif _is_operator_object(value):
            _validate_operators(value, where)
        elif isinstance(value, dict) and any(str(k).startswith("$") for k in value):
            raise Invalid.field(where, "mixes operators and plain keys")


def _validate_operators(operators: dict[str, Any], field: str) -> None:
    for name, argument in operators.items():
        where = f"{field}.{name}"
        if name not in FIELD_OPERATORS:
            raise Invalid.field(where, f"unknown operator; use one of {_names(FIELD_OPERATORS)}")
        if name in ("$in", "$nin") and not isinstance(argument, list):
            raise Invalid.field(where, "expects a list")
        if name == "$exists" and not isinstance(argument, bool):
            raise Invalid.field(where, "expects true or false")
        if name == "$regex":
            if not isinstance(argument, str):
                raise Invalid.field(where, "expects a regular expression string")
            try:
                re.compile(argument)
            except re.error as exc:
                raise Invalid.field(where, f"not a regular expression: {exc}") from None
        if name == "$not":
            if not _is_operator_object(argument):
                raise Invalid.field(where, "expects an object of operators")
            _validate_operators(argument, where)


def matches(spec: dict[str, Any], data: Any) -> bool:
    """Whether `data` satisfies the (validated) filter."""
    for key, value in spec.items():
        if key == "$and":
            ok = all(matches(item, data) for item in value)
        elif key == "$or":
            ok = any(matches(item, data) for item in value)
        elif key == "$not":
            ok = not matches(value, data)
        elif _is_operator_object(value):
            ok = _test(value, resolve(data, key))
        else:
            ok = _equal(resolve(data, key), value)
        if not ok:
            return False
    return True


def resolve(data: Any, path: str) -> Any:
    """The value at a dotted path (list items by index), or a marker when it is absent."""
    current = data
    for part in path.split("."):
        if isinstance(current, dict) and part in current:
            current = current[part]
        elif isinstance(current, list) and part.isdigit() and int(part) < len(current):
            current = current[int(part)]
        else:
            return _MISSING
    return current


def _test(operators: dict[str, Any], value: Any) -> bool:
    for name, argument in operators.items():
        if name == "$exists":
            ok = (value is not _MISSING) == argument
        elif name == "$not":
            ok = not _test(argument, value)
        elif value is _MISSING:
            ok = name in ("$ne", "$nin")
        elif name == "$eq":
            ok = _equal(value, argument)
        elif name == "$ne":
            ok = not _equal(value, argument)
        elif name == "$in":
            ok = any(_equal(value, item) for item in argument)
        elif name == "$nin":
            ok = not any(_equal(value, item) for item in argument)
        elif name == "$regex":
            ok = isinstance(value, str) and re.search(argument, value) is not None
        else:
            ok = _comparable(value, argument) and _COMPARISONS[name](value, argument)
        if not ok:
            return False
    return True


def _equal(value: Any, expected: Any) -> bool:
    if value is _MISSING:
        return False
    # JSON has no separate booleans-as-numbers: true must not equal 1.
    if isinstance(value, bool) != isinstance(expected, bool):
        return False
    return value == expected


def _comparable(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return False
    numbers = (int, float)
    return (isinstance(a, numbers) and isinstance(b, numbers)) or (
        isinstance(a, str) and isinstance(b, str)
    )


def _is_operator_object(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(k.startswith("$") for k in value)


def _names(operators: set[str]) -> str:
    return ", ".join(sorted(operators))
