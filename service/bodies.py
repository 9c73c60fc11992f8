"""Request bodies and query strings: read within a size limit by kind of body, decoded as
strict JSON, checked for what no schema catches (nesting, text PostgreSQL cannot store),
then parsed with pydantic. Every refusal names the field, or `body` when it is the whole."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ValidationError

from core.errors import BadRequest, Invalid, TooLarge, UnsupportedMediaType
from core.manifest import MAX_JSON_DEPTH
from core.settings import Settings
from service.keys import SETTINGS


def validation_details(exc: ValidationError, prefix: str = "") -> list[dict[str, Any]]:
    details = []
    for error in exc.errors(include_url=False):
        path = prefix
        for part in error["loc"]:
            if isinstance(part, int):
                path += f"[{part}]"
            else:
                path += f".{part}" if path else str(part)
        details.append({"field": path or prefix or "body", "message": error["msg"]})
    return details


def body_limit(settings: Settings, model: type[BaseModel]) -> int:
    """The most bytes a body parsed into `model` may have, by the model's `body_kind`."""
    kind = getattr(model, "body_kind", "json")
    if kind == "input":
        return settings.max_input_body_bytes
    if kind == "batch":
        return settings.max_batch_body_bytes
    return settings.max_json_body_bytes


async def read_capped(request: web.Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed `limit` bytes: from
    Content-Length before reading anything, else while it streams in."""
    message = f"the body exceeds this endpoint's limit of {limit} bytes"
    too_large = TooLarge(message, [{"field": "body", "message": message}])
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _is_json(content_type: str) -> bool:
    return content_type == "application/json" or content_type.endswith("+json")


# An input value may nest MAX_JSON_DEPTH levels below the few of the body around it.
MAX_BODY_DEPTH = MAX_JSON_DEPTH + 8

# PostgreSQL text holds neither NUL nor a lone UTF-16 surrogate (which JSON's \ud800 escapes
# can produce); refused here, by field, rather than by the database with its own words.
UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
UNSTORABLE_MESSAGE = "holds a NUL character or an unpaired surrogate, which cannot be stored"


def _json_number(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


def _json_integer(text: str) -> int:
    if len(text) > 1000:
        raise ValueError("a number has more than 1000 digits")
    return int(text)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def decode_json(raw: bytes) -> Any:
    """`raw` as JSON, or BadRequest naming the body: NaN, Infinity and numbers beyond a
    float's range or with absurdly many digits are refused like any other malformed JSON."""
    try:
        return json.loads(
            raw, parse_float=_json_number, parse_int=_json_integer, parse_constant=_no_constant
        )
    except RecursionError:
        message = "the body is nested too deeply"
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        message = f"the body is not valid JSON: {exc}"
    raise BadRequest(message, [{"field": "body", "message": message}])


def check_json_values(data: Any, max_depth: int) -> list[dict[str, Any]]:
    """Problems no schema catches, each naming its field: nesting deeper than `max_depth`,
    and keys or strings that PostgreSQL cannot store."""
    problems: list[dict[str, Any]] = []
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack and len(problems) < 10:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            if UNSTORABLE.search(value):
                problems.append({"field": path or "body", "message": UNSTORABLE_MESSAGE})
            continue
        if not isinstance(value, dict | list):
            continue
        if depth >= max_depth:
            message = f"nested deeper than {max_depth} levels"
            problems.append({"field": path or "body", "message": message})
            continue
        if isinstance(value, list):
            stack.extend((item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value))
            continue
        for key, item in value.items():
            field = f"{path}.{key}" if path else key
            if UNSTORABLE.search(key):
                field = f"{path}.{key!r}" if path else repr(key)
                problems.append({"field": field, "message": f"the key {UNSTORABLE_MESSAGE}"})
            else:
                stack.append((item, field, depth + 1))
    return problems


async def parse_body(request: web.Request, model: type[BaseModel]) -> BaseModel:
    settings = request.app[SETTINGS]
    if request.body_exists and not _is_json(request.content_type):
        given = request.headers.get("Content-Type") or "none"
        raise UnsupportedMediaType(f"send the body as application/json (Content-Type: {given})")
    raw = await read_capped(request, body_limit(settings, model))
    data = decode_json(raw) if raw.strip() else {}
    problems = check_json_values(data, MAX_BODY_DEPTH)
    if problems:
        raise Invalid(_summary(problems), problems)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        details = validation_details(exc)
        raise Invalid(_summary(details), details) from None


def parse_query(request: web.Request, model: type[BaseModel]) -> BaseModel:
    problems = [
        {"field": name, "message": UNSTORABLE_MESSAGE}
        for name, value in request.query.items()
        if UNSTORABLE.search(name) or UNSTORABLE.search(value)
    ]
    if problems:
        raise Invalid(_summary(problems), problems)
    try:
        # The settings let a query apply server-wide bounds, e.g. the list page size.
        return model.model_validate(
            dict(request.query), context={"settings": request.app.get(SETTINGS)}
        )
    except ValidationError as exc:
        details = validation_details(exc)
        raise Invalid(_summary(details), details) from None


def _summary(details: list[dict[str, Any]]) -> str:
    first = details[0]
    more = f" (and {len(details) - 1} more)" if len(details) > 1 else ""
    return f"{first['field']}: {first['message']}{more}"
