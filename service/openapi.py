"""The OpenAPI 3.1 document, generated from the route table and the pydantic models the
handlers use, and Swagger UI served from the bundled assets (no CDN)."""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web
from pydantic import BaseModel, TypeAdapter
from swagger_ui_bundle import swagger_ui_path

from service.http import Route

REF = "#/components/schemas/{model}"
_PATH_PARAM = re.compile(r"{(\w+)}")

_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message", "details"],
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "details": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
                    },
                },
            },
        }
    },
}

_STATUS_TEXT = {
    200: "OK",
    201: "Created",
    202: "Accepted",
    204: "No Content",
    400: "Malformed request",
    401: "Missing or invalid token",
    403: "The token's role may not do this",
    404: "Not found (or not visible to this token)",
    409: "Conflict",
    413: "Too large",
    415: "The body is not of a type this endpoint takes",
    422: "Invalid: details name each offending field",
    503: "A dependency is unavailable",
}


class _Schemas:
    def __init__(self) -> None:
        self.components: dict[str, Any] = {"Error": _ERROR_SCHEMA}

    def of(self, annotation: Any, mode: str = "serialization") -> dict[str, Any]:
        schema = TypeAdapter(annotation).json_schema(ref_template=REF, mode=mode)  # type: ignore[arg-type]
        self.components.update(schema.pop("$defs", {}))
        if isinstance(annotation, type) and issubclass(annotation, BaseModel) and "title" in schema:
            name = re.sub(r"[^A-Za-z0-9._-]", "_", annotation.__name__)  # Page[X] -> Page_X_
            self.components[name] = schema
            return {"$ref": REF.format(model=name)}
        return schema


def possible_errors(route: Route) -> set[int]:
    """Every error status the route can answer: its own `errors` plus those the shared
    plumbing (`service.http`, `service.bodies`) gives any route of its shape."""
    errors = set(route.errors) | {400}
    if route.auth:
        errors |= {401, 503}  # the token is looked up in PostgreSQL
    if _PATH_PARAM.search(route.path):
        errors.add(404)
    if route.query is not None:
        errors.add(422)
        if "project" in route.query.model_fields:  # another project's list is not found
            errors.add(404)
    if route.body is not None or route.form is not None:
        errors |= {413, 415, 422}
    return errors


def build_openapi(routes: list[Route], version: str) -> dict[str, Any]:
    schemas = _Schemas()
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        operation: dict[str, Any] = {
            "operationId": route.handler.__name__
            if route.tag == "health"
            else f"{route.tag}_{route.handler.__name__}",
            "summary": route.summary,
            "tags": [route.tag],
            "parameters": [
                {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                for name in _PATH_PARAM.findall(route.path)
            ],
            "responses": {},
        }
        if not route.auth:
            operation["security"] = []
        if route.query is not None:
            query_schema = route.query.model_json_schema(ref_template=REF)
            required = set(query_schema.get("required", []))
            for name, prop in query_schema["properties"].items():
                operation["parameters"].append(
                    {"name": name, "in": "query", "required": name in required, "schema": prop}
                )
        if route.body is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": schemas.of(route.body, "validation")}},
            }
        if route.form is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {
                    "multipart/form-data": {"schema": schemas.of(route.form, "validation")}
                },
            }
        success: dict[str, Any] = {"description": _STATUS_TEXT.get(route.status, "OK")}
        if route.response is not None:
            success["content"] = {
                "application/json": {"schema": schemas.of(route.response)},
                **route.extra_responses.get("content", {}),  # e.g. a live text/event-stream
            }
        elif route.status != 204:
            success["content"] = route.extra_responses.get(
                "content", {"application/json": {"schema": {"type": "object"}}}
            )
        operation["responses"][str(route.status)] = success
        if route.path.endswith("/executions") and route.method == "POST":
            operation["responses"]["200"] = {
                "description": "The idempotency key matched an earlier execution",
                "content": success["content"],
            }
        for status in sorted(possible_errors(route)):
            operation["responses"][str(status)] = {
                "description": _STATUS_TEXT.get(status, "Error"),
                "content": {"application/json": {"schema": {"$ref": REF.format(model="Error")}}},
            }
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Ferry",
            "version": version,
            "description": "Asynchronous job orchestration for FaaS executions and pipelines.",
        },
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {
            "schemas": schemas.components,
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearerAuth": []}],
    }


_DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Ferry API</title>
<link rel="stylesheet" href="/api/docs/static/swagger-ui.css"></head>
<body><div id="ui"></div>
<script src="/api/docs/static/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({url: "/api/openapi.json", dom_id: "#ui", persistAuthorization: true});</script>
</body></html>"""


def add_openapi_routes(app: web.Application, routes: list[Route], version: str) -> None:
    document = build_openapi(routes, version)
    document["paths"]["/api/openapi.json"] = {
        "get": {
            "operationId": "docs_openapi",
            "summary": "This OpenAPI document",
            "tags": ["docs"],
            "security": [],
            "responses": {
                "200": {
                    "description": "OK",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                }
            },
        }
    }
    document["paths"]["/api/docs"] = {
        "get": {
            "operationId": "docs_page",
            "summary": "Swagger UI for this API",
            "tags": ["docs"],
            "security": [],
            "responses": {
                "200": {
                    "description": "OK",
                    "content": {"text/html": {"schema": {"type": "string"}}},
                }
            },
        }
    }

    async def openapi_json(_request: web.Request) -> web.Response:
        return web.json_response(document)

    async def docs(_request: web.Request) -> web.Response:
        return web.Response(text=_DOCS_PAGE, content_type="text/html")

    app.router.add_get("/api/openapi.json", openapi_json)
    app.router.add_get("/api/docs", docs)
    app.router.add_static("/api/docs/static", str(swagger_ui_path))
