"""The served OpenAPI document: valid 3.1, exactly the routes the server has, and the shapes
the server really sends (checked by validating live responses against it)."""

from __future__ import annotations

import re
from typing import Any

import pytest
from aiohttp import web
from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import validate
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from core.executions import ExecutionCreate
from service.console import ROUTE_PREFIX as CONSOLE_PREFIX
from tests.conftest import echo_archive

DOC_URI = "urn:ferry:openapi"
PUBLIC = {"/healthz", "/readyz", "/metrics", "/api/docs", "/api/openapi.json"}
# The page and the document that describe the API; registered next to it, not from its table.
DOCS_ENDPOINTS = {("GET", "/api/docs"), ("GET", "/api/openapi.json")}
_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


@pytest.fixture
async def document(client) -> dict[str, Any]:
    response = await client.get("/api/openapi.json")  # no token: the document is public
    assert response.status == 200
    assert response.content_type == "application/json"
    return await response.json()


def _operations(document: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (method.upper(), path): operation
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if method in _METHODS
    }


def _registered(client) -> set[tuple[str, str]]:
    app: web.Application = client.server.app
    return {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD"
        and route.resource is not None
        and not isinstance(route.resource, web.StaticResource)
        and not (route.resource.name or "").startswith(CONSOLE_PREFIX)  # pages, not the API
    }


def _pointer(*parts: str) -> str:
    return "/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


def _closed(schema: Any) -> Any:
    """A copy in which every object schema that lists its properties allows no others, so a
    field the server sends but the document omits is drift too."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: _closed(value) for key, value in schema.items()}
    if "properties" in schema and not {"additionalProperties", "unevaluatedProperties"} & set(
        schema
    ):
        closed["unevaluatedProperties"] = False
    return closed


class Contract:
    """Validates response bodies against the schema the document gives for an operation and
    status, resolving `$ref`s against the document's components."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        resource = Resource(contents=_closed(document), specification=DRAFT202012)
        self.registry = Registry().with_resource(DOC_URI, resource)

    def check(self, method: str, path: str, status: int, body: Any) -> None:
        responses = self.document["paths"][path][method.lower()]["responses"]
        assert str(status) in responses, (
            f"{method} {path} answered {status}, which the document does not list: "
            f"{sorted(responses)}; body {body}"
        )
        if status == 204:
            assert body is None
            return
        content = responses[str(status)]["content"]
        assert "application/json" in content, f"{method} {path} {status} documents {content}"
        ref = _pointer("paths", path, method.lower(), "responses", str(status), "content")
        schema = {"$ref": f"{DOC_URI}#{ref}/application~1json/schema"}
        validator = OAS31Validator(
            schema, registry=self.registry, format_checker=OAS31Validator.FORMAT_CHECKER
        )
        errors = sorted(validator.iter_errors(body), key=lambda e: list(e.absolute_path))
        assert not errors, f"{method} {path} {status} does not match the document:\n" + "\n".join(
            f"  at {list(e.absolute_path)}: {e.message}" for e in errors[:10]
        )


# --- the document itself -------------------------------------------------------------------


async def test_document_is_public_and_valid_openapi_31(document):
    assert document["openapi"].startswith("3.1")
    validate(document)  # raises with the offending place on any violation


async def test_every_route_is_documented_and_every_documented_route_exists(client, document):
    registered = _registered(client)
    documented = set(_operations(document))
    assert registered - documented == set(), "registered but not in the document"
    assert documented - registered == set(), "in the document but not registered"
    # Path parameters are declared for every {name} in the path.
    for (method, path), operation in _operations(document).items():
        declared = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
        assert declared == set(re.findall(r"{(\w+)}", path)), (method, path)


async def test_the_docs_endpoints_are_documented_too(client, document):
    assert _registered(client) & DOCS_ENDPOINTS == DOCS_ENDPOINTS
    assert DOCS_ENDPOINTS <= set(_operations(document))


async def test_operations_document_auth_as_the_server_enforces_it(client, document):
    """An operation documented as needing a token answers 401 without one, and documents the
    401; a public one answers without a token."""
    default_security = document.get("security", [])
    for (method, path), operation in _operations(document).items():
        security = operation.get("security", default_security)
        concrete = re.sub(r"{\w+}", "x", path)
        response = await client.request(method, concrete)
        await response.read()
        if security:
            assert path not in PUBLIC, f"{path} is public by API.md"
            assert "401" in operation["responses"], f"{method} {path} does not document 401"
            assert response.status == 401, (method, path, response.status)
        else:
            assert path in PUBLIC, f"{method} {path} is documented as needing no token"
            assert response.status != 401, (method, path)


async def test_every_operation_documents_what_the_shared_plumbing_answers(document):
    for (method, path), operation in _operations(document).items():
        if (method, path) in DOCS_ENDPOINTS:
            continue
        documented = set(operation["responses"])
        if operation.get("security") != []:
            assert {"401", "503"} <= documented, (method, path)
        if "{" in path:
            assert "404" in documented, (method, path)
        if any(p["in"] == "query" for p in operation["parameters"]):
            assert "422" in documented, (method, path)
        if "requestBody" in operation:
            assert {"400", "413", "415", "422"} <= documented, (method, path)


async def test_create_execution_documents_its_statuses_and_body(document):
    operation = document["paths"]["/api/v1/executions"]["post"]
    assert {"201", "200", "422", "401"} <= set(operation["responses"])
    schema = operation["requestBody"]["content"]["application/json"]["schema"]
    while "$ref" in schema:
        assert schema["$ref"].startswith("#/components/schemas/")
        schema = document["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    properties = set(schema["properties"])
    assert {"service", "function", "input", "idempotency_key", "max_attempts", "timeout_s"} <= (
        properties
    )
    assert properties == {f.alias or name for name, f in ExecutionCreate.model_fields.items()}
    assert {"service", "function"} <= set(schema.get("required", []))


async def test_swagger_ui_is_served_from_local_assets(client):
    response = await client.get("/api/docs")
    assert response.status == 200
    assert response.content_type == "text/html"
    page = await response.text()
    assert "http://" not in page and "https://" not in page, "the docs page must not use a CDN"
    assets = set(re.findall(r'(?:src|href)="([^"]+)"', page))
    assert {"/api/docs/static/swagger-ui-bundle.js", "/api/docs/static/swagger-ui.css"} <= assets
    for asset in assets:
        asset_response = await client.get(asset)
        assert asset_response.status == 200, asset
        assert len(await asset_response.read()) > 1000, asset
    assert "/api/openapi.json" in page


# --- live responses against the document ---------------------------------------------------


async def test_responses_match_the_document(api, document):
    contract = Contract(document)

    async def call(method: str, path: str, expected: int, body: Any = None, **kwargs: Any):
        concrete = path.format(**kwargs.pop("ids", {}))
        status, answer = await api.call(method, concrete, body, **kwargs)
        assert status == expected, (method, concrete, answer)
        contract.check(method, path, status, answer)
        return answer

    await call("GET", "/healthz", 200)
    await call("GET", "/readyz", 200)
    project = await call("POST", "/api/v1/projects", 201, {"name": "contract"})
    await call("GET", "/api/v1/projects", 200)
    await call("GET", "/api/v1/projects/{id}", 200, ids={"id": project["id"]})
    await call("POST", "/api/v1/projects", 409, {"name": "contract"})
    await call(
        "POST",
        "/api/v1/tokens",
        201,
        {"name": "dev", "role": "developer", "project": project["id"]},
    )
    await call("GET", "/api/v1/tokens", 200)

    status, package = await api.upload(project["id"], echo_archive())
    assert status == 201, package
    contract.check("POST", "/api/v1/packages", status, package)
    ids = {"id": package["id"]}
    await call("GET", "/api/v1/packages", 200, params={"project": project["id"]})
    await call("GET", "/api/v1/packages/{id}", 200, ids=ids)
    await call("GET", "/api/v1/packages/{id}/revisions", 200, ids=ids)

    service = await call(
        "POST",
        "/api/v1/services",
        201,
        {
            "project": project["id"],
            "name": "echo",
            "package": package["id"],
            "env": {"LOG_LEVEL": "info"},
            "secrets": {"API_KEY": "s3cr3t"},
        },
    )
    ids = {"id": service["id"]}
    await call("GET", "/api/v1/services", 200)
    await call("GET", "/api/v1/services/{id}", 200, ids=ids)
    await call("GET", "/api/v1/services/{id}/status", 200, ids=ids)
    await call("POST", "/api/v1/services/{id}/pause", 200, ids=ids)
    await call("POST", "/api/v1/services/{id}/resume", 200, ids=ids)

    run = {"service": service["id"], "function": "echo", "input": {"text": "hi"}}
    execution = await call("POST", "/api/v1/executions", 201, {**run, "idempotency_key": "k"})
    again = await call("POST", "/api/v1/executions", 200, {**run, "idempotency_key": "k"})
    assert again["id"] == execution["id"]
    invalid = await call("POST", "/api/v1/executions", 422, {**run, "input": {"text": 5}})
    assert invalid["error"]["details"][0]["field"] == "input.text"
    await call("POST", "/api/v1/executions/batch", 201, {"executions": [run, run]})
    ids = {"id": execution["id"]}
    await call("GET", "/api/v1/executions", 200, params={"service": service["id"]})
    await call("GET", "/api/v1/executions/counters", 200, params={"project": project["id"]})
    await call("GET", "/api/v1/executions/{id}", 200, ids=ids)
    await call("GET", "/api/v1/executions/{id}/wait", 200, ids=ids, params={"timeout": "0"})
    await call("GET", "/api/v1/executions/{id}/logs", 200, ids=ids)
    await call("POST", "/api/v1/executions/{id}/terminate", 202, ids=ids)
    await call("GET", "/api/v1/executions/{id}", 404, ids={"id": "missing"})

    node = {"id": "say", "type": "function", "service": "echo", "function": "echo"}
    pipeline = await call(
        "POST",
        "/api/v1/pipelines",
        201,
        {"project": project["id"], "name": "say", "nodes": [{**node, "input": {"text": "hi"}}]},
    )
    ids = {"id": pipeline["id"]}
    await call("GET", "/api/v1/pipelines", 200, params={"project": project["id"]})
    await call("GET", "/api/v1/pipelines/{id}", 200, ids=ids)
    await call("PATCH", "/api/v1/pipelines/{id}", 200, {"nodes": [node]}, ids=ids)
    await call("GET", "/api/v1/pipelines/{id}/versions/{version}", 200, ids={**ids, "version": 1})
    await call("POST", "/api/v1/pipelines/{id}/install", 200, ids=ids)
    await call("POST", "/api/v1/pipelines/{id}/uninstall", 200, ids=ids)
    await call(
        "PATCH", "/api/v1/pipelines/{id}", 422, {"nodes": [{**node, "function": "x"}]}, ids=ids
    )
    await call("DELETE", "/api/v1/services/{id}", 409, ids={"id": service["id"]})
    await call("DELETE", "/api/v1/pipelines/{id}", 204, ids=ids)

    # Errors share one documented shape.
    await call("GET", "/api/v1/projects", 401, headers={"Authorization": "Bearer nope"})
    await call("DELETE", "/api/v1/services/{id}", 204, ids={"id": service["id"]})
