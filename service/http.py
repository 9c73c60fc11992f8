"""The HTTP plumbing every endpoint shares: the route record, authentication, response
rendering, and the one middleware that maps errors to the one error shape (docs/api.md,
"Errors"). Bodies and query strings are read and checked in `service.bodies`."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from aiohttp import web
from pydantic import BaseModel, TypeAdapter

from core import log_context
from core.auth import Principal, authenticate
from core.errors import (
    FerryError,
    Invalid,
    NotFound,
    TooLarge,
    Unauthorized,
    Unavailable,
)
from core.outages import UNAVAILABLE, dependency_of
from service.bodies import UNSTORABLE, parse_body, parse_query
from service.keys import DB, PRINCIPAL, PRINCIPAL_CACHE, REQUEST_ID

log = logging.getLogger("ferry.api")

Handler = Callable[..., Awaitable[Any]]


@dataclass(frozen=True)
class Route:
    """One endpoint: what it takes and returns is declared here, so the OpenAPI document is
    generated from the same models that parse and render the requests."""

    method: str
    path: str
    handler: Handler
    summary: str
    tag: str
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    response: Any = None
    status: int = 200
    auth: bool = True
    form: type[BaseModel] | None = None  # multipart body, documented only (parsed by hand)
    errors: tuple[int, ...] = ()
    extra_responses: dict[str, Any] = field(default_factory=dict)


_adapters: dict[Any, TypeAdapter[Any]] = {}


def render(result: Any, route: Route) -> web.StreamResponse:
    if isinstance(result, web.StreamResponse):
        return result
    status = route.status
    if isinstance(result, tuple):  # (body, status) where a handler chooses, e.g. 200 vs 201
        result, status = result
    if result is None:
        return web.Response(status=204 if status == 200 else status)
    if route.response is not None:
        adapter = _adapters.get(route.response)
        if adapter is None:
            adapter = _adapters[route.response] = TypeAdapter(route.response)
        if not isinstance(result, BaseModel):  # a dict of models, e.g. a page
            result = adapter.validate_python(result)
        body = adapter.dump_json(result, by_alias=True)
    elif isinstance(result, BaseModel):
        body = result.model_dump_json(by_alias=True).encode()
    else:
        body = json.dumps(result).encode()
    return web.Response(body=body, status=status, content_type="application/json")


def endpoint(route: Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        if route.auth:
            request[PRINCIPAL] = await principal_of(request)
        if any(UNSTORABLE.search(value) for value in request.match_info.values()):
            raise NotFound("not found: no id holds a NUL character or an unpaired surrogate")
        body = await parse_body(request, route.body) if route.body else None
        query = parse_query(request, route.query) if route.query else None
        return render(await route.handler(request, body=body, query=query), route)

    handle.__name__ = route.handler.__name__
    return handle


def principal(request: web.Request) -> Principal:
    return request[PRINCIPAL]  # type: ignore[return-value]


# Tokens are checked against PostgreSQL at most every few seconds per process: the hot path
# stays one transaction, and a deleted token stops working within this many seconds.
TOKEN_CACHE_S = 2.0


async def principal_of(request: web.Request) -> Principal:
    header = request.headers.get("Authorization", "")
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer":
        secret = ""
    if not secret.isascii():  # tokens are ASCII; other bytes arrive as undecodable text
        raise Unauthorized("invalid or expired token")
    cache = request.app[PRINCIPAL_CACHE]
    now = time.monotonic()
    hit = cache.get(secret)
    if hit is not None and hit[1] > now:
        return hit[0]
    found = await authenticate(request.app[DB], secret.strip())
    if len(cache) > 10_000:
        cache.clear()
    cache[secret] = (found, now + TOKEN_CACHE_S)
    return found


def error_response(error: FerryError, request_id: str) -> web.Response:
    return web.json_response(
        error.to_json(), status=error.status, headers={"X-Request-Id": request_id}
    )


_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,100}")
_HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "too_large"}


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure leaves as `{"error": {code, message, details}}`; never a traceback."""
    request_id = request.headers.get("X-Request-Id", "")
    if not _REQUEST_ID.fullmatch(request_id):  # it is echoed and logged: only plain ids
        request_id = uuid.uuid4().hex[:16]
    request[REQUEST_ID] = request_id
    log_context.request_id.set(request_id)  # for this request's task: log lines carry it
    try:
        response = await handler(request)
    except FerryError as exc:
        return error_response(exc, request_id)
    except web.HTTPRequestEntityTooLarge:
        return error_response(TooLarge("the request body is too large"), request_id)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        error = FerryError(exc.reason)
        error.status, error.code = exc.status, _HTTP_CODES.get(exc.status, "error")
        if exc.status == 404:
            error.message = f"no such endpoint: {request.method} {request.path}"
        if exc.status == 405:
            error.message = f"{request.method} is not allowed on {request.path}"
        return error_response(error, request_id)
    except UNAVAILABLE as exc:
        # Only requests that cannot be answered without the server get here: an execution
        # committed while Redis is down is accepted (201) and queued by the reconciler later.
        dependency = dependency_of(exc)
        log.warning(
            "%s unavailable", dependency, extra={"request_id": request_id, "error": str(exc)}
        )
        return error_response(
            Unavailable(f"{dependency} is unavailable; retry shortly"),
            request_id,
        )
    except asyncpg.DataError as exc:
        # Validation should have caught it; PostgreSQL's wording is not the API's to repeat.
        log.warning(
            "value refused by PostgreSQL", extra={"request_id": request_id, "error": str(exc)}
        )
        return error_response(Invalid("a value is out of range or cannot be stored"), request_id)
    except Exception:
        log.exception("unhandled error", extra={"request_id": request_id})
        return error_response(
            FerryError(f"internal error; the server log has the details (request {request_id})"),
            request_id,
        )
    response.headers.setdefault("X-Request-Id", request_id)
    return response
