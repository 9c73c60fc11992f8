"""Who may call what: every route of the table against every kind of caller.

Each route is classified below by the least role that may use it and by whom it concerns:
one project's objects (a caller from another project gets 404, as if they did not exist),
a collection (filtered to the caller's project), or the whole installation (admin only).
A route added to `service.routes.ROUTES` without a classification here fails the test, so
its protection is decided, not inherited by accident.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
import pytest

from core.auth import Role
from service.http import Route
from service.metrics import METRICS_ROUTE
from service.openapi import possible_errors
from service.routes import ROUTES
from tests.conftest import ECHO_MANIFEST, Api, echo_archive, token_for

V1 = "/api/v1"
ALL_ROUTES = [*ROUTES, METRICS_ROUTE]
CALLERS = ("none", "bad", "other", "viewer", "developer", "owner", "admin")
_RANK = {Role.viewer: 0, Role.developer: 1, Role.owner: 2, Role.admin: 3}
_names = itertools.count()


@dataclass(frozen=True)
class Access:
    role: Role | None  # the least role allowed; None: no token needed
    scope: Literal["project", "collection", "installation"] = "project"
    # What a caller from another project gets; a service named in a body it cannot see is
    # an invalid field (422), the same answer as for one that does not exist.
    outsider: int = 404


PUBLIC = Access(None, "collection")
VIEW = Access(Role.viewer)
DEVELOP = Access(Role.developer)
OWN = Access(Role.owner)
LIST = Access(Role.viewer, "collection")


def expected_status(access: Access, caller: str) -> int | None:
    """The refusal `caller` gets, or None when it is let through."""
    if access.role is None or caller == "admin":
        return None
    if caller in ("none", "bad"):
        return 401
    if access.scope == "installation":
        return 403
    if access.scope == "project" and caller == "other":
        return access.outsider
    role = Role.owner if caller == "other" else Role(caller)
    return None if _RANK[role] >= _RANK[access.role] else 403


@dataclass
class Call:
    path: str
    json_body: Any = None
    params: dict[str, str] = field(default_factory=dict)
    archive: bytes | None = None  # a multipart upload of this codebase
    project: str | None = None  # the upload's `project` field
    stream: bool = False  # an endless response: only its status is read


@dataclass
class World:
    """Project A with one of everything, project B for the outsider, and the admin's client."""

    api: Api
    project: str
    package: str
    service: str
    execution: str
    trigger: str
    pipeline: str = ""
    pipeline_execution: str = ""

    async def fresh(self, kind: str) -> str:
        """A new object of `kind` in project A, for calls that delete or consume one."""
        n = next(_names)
        if kind == "package":
            manifest = {**ECHO_MANIFEST, "name": f"pkg{n}"}
            status, body = await self.api.upload(self.project, echo_archive(manifest))
        elif kind == "service":
            status, body = await self.api.post(
                f"{V1}/services",
                {"project": self.project, "name": f"svc{n}", "package": self.package},
            )
        elif kind == "execution":
            status, body = await self.api.post(
                f"{V1}/executions", {"service": self.service, "function": "noop"}
            )
        elif kind == "trigger":
            status, body = await self.api.post(f"{V1}/triggers", _trigger(self, f"trg{n}"))
        elif kind == "pipeline":
            status, body = await self.api.post(f"{V1}/pipelines", _pipeline(self, f"pl{n}"))
        elif kind == "pipeline_execution":  # a run of the world's pipeline, still going
            status, body = await self.api.post(
                f"{V1}/pipelines/{self.pipeline}/execute", {"input": {}}
            )
        elif kind == "ended_pipeline_execution":  # one that can be resumed
            run = await self.fresh("pipeline_execution")
            status, body = await self.api.post(f"{V1}/pipeline-executions/{run}/terminate")
            assert status == 202, body
            return run
        elif kind == "token":
            status, body = await self.api.post(
                f"{V1}/tokens", {"name": f"tok{n}", "role": "viewer", "project": self.project}
            )
        else:  # a project
            status, body = await self.api.post(f"{V1}/projects", {"name": f"proj{n}"})
        assert status == 201, body
        return body["id"]


def _trigger(world: World, name: str) -> dict[str, Any]:
    return {
        "project": world.project,
        "name": name,
        "type": "cron",
        "operation": {"type": "function", "service": world.service, "function": "noop"},
        "spec": {"cron": "0 3 * * *"},
    }


def _pipeline(world: World, name: str) -> dict[str, Any]:
    return {
        "project": world.project,
        "name": name,
        "nodes": [{"id": "only", "type": "function", "service": world.service, "function": "noop"}],
    }


Build = Callable[[World], Awaitable[Call]]


def _fill(value: Any, world: World) -> Any:
    """`value` with every "{project}", "{service}", … replaced by the world's object id."""
    if isinstance(value, str):
        return value.format(**vars(world))
    if isinstance(value, dict):
        return {key: _fill(item, world) for key, item in value.items()}
    if isinstance(value, list):
        return [_fill(item, world) for item in value]
    return value


def call(
    path: str, json_body: Any = None, params: dict[str, str] | None = None, **kwargs: Any
) -> Build:
    """A call whose path and body may name the world's objects: `{project}`, `{service}`, …"""

    async def build(world: World) -> Call:
        return Call(_fill(path, world), _fill(json_body, world), dict(params or {}), **kwargs)

    return build


def on_fresh(kind: str, path: str, json_body: Any = None) -> Build:
    async def build(world: World) -> Call:
        return Call(path.format(id=await world.fresh(kind)), json_body)

    return build


async def _new_service(world: World) -> Call:
    name = f"svc{next(_names)}"
    return Call(
        f"{V1}/services", {"project": world.project, "name": name, "package": world.package}
    )


async def _new_trigger(world: World) -> Call:
    return Call(f"{V1}/triggers", _trigger(world, f"trg{next(_names)}"))


async def _new_package(world: World) -> Call:
    manifest = {**ECHO_MANIFEST, "name": f"pkg{next(_names)}"}
    return Call(f"{V1}/packages", archive=echo_archive(manifest), project=world.project)


async def _new_revision(world: World) -> Call:
    return Call(f"{V1}/packages/{world.package}/revisions", archive=echo_archive())


async def _new_project(world: World) -> Call:
    return Call(f"{V1}/projects", {"name": f"proj{next(_names)}"})


RUN = {"service": "{service}", "function": "noop"}
RUN_ACCESS = Access(Role.developer, outsider=422)

# (method, path) -> who may call it, and a call that succeeds for an allowed caller.
MATRIX: dict[tuple[str, str], tuple[Access, Build]] = {
    ("GET", "/healthz"): (PUBLIC, call("/healthz")),
    ("GET", "/readyz"): (PUBLIC, call("/readyz")),
    ("GET", "/metrics"): (PUBLIC, call("/metrics")),
    ("GET", f"{V1}/info"): (LIST, call(f"{V1}/info")),  # any valid token
    ("POST", f"{V1}/projects"): (Access(Role.admin, "installation"), _new_project),
    ("GET", f"{V1}/projects"): (LIST, call(f"{V1}/projects")),
    ("GET", f"{V1}/projects/{{id}}"): (VIEW, call(f"{V1}/projects/{{project}}")),
    ("GET", f"{V1}/tokens/current"): (LIST, call(f"{V1}/tokens/current")),
    ("PATCH", f"{V1}/projects/{{id}}"): (
        OWN,
        call(f"{V1}/projects/{{project}}", json_body={"description": "changed"}),
    ),
    # Project members other than an admin are refused even in their own project.
    ("DELETE", f"{V1}/projects/{{id}}"): (
        Access(Role.admin),
        call(f"{V1}/projects/{{project}}"),
    ),
    ("POST", f"{V1}/tokens"): (
        OWN,
        call(f"{V1}/tokens", json_body={"name": "t", "role": "viewer", "project": "{project}"}),
    ),
    ("GET", f"{V1}/tokens"): (Access(Role.owner, "collection"), call(f"{V1}/tokens")),
    ("DELETE", f"{V1}/tokens/{{id}}"): (OWN, on_fresh("token", f"{V1}/tokens/{{id}}")),
    ("POST", f"{V1}/packages"): (DEVELOP, _new_package),
    ("GET", f"{V1}/packages"): (LIST, call(f"{V1}/packages")),
    ("GET", f"{V1}/packages/{{id}}"): (VIEW, call(f"{V1}/packages/{{package}}")),
    ("DELETE", f"{V1}/packages/{{id}}"): (OWN, on_fresh("package", f"{V1}/packages/{{id}}")),
    ("POST", f"{V1}/packages/{{id}}/revisions"): (DEVELOP, _new_revision),
    ("GET", f"{V1}/packages/{{id}}/revisions"): (
        VIEW,
        call(f"{V1}/packages/{{package}}/revisions"),
    ),
    ("GET", f"{V1}/packages/{{id}}/codebase"): (
        VIEW,
        call(f"{V1}/packages/{{package}}/codebase"),
    ),
    ("POST", f"{V1}/services"): (DEVELOP, _new_service),
    ("GET", f"{V1}/services"): (LIST, call(f"{V1}/services")),
    ("GET", f"{V1}/services/{{id}}"): (VIEW, call(f"{V1}/services/{{service}}")),
    ("PATCH", f"{V1}/services/{{id}}"): (
        DEVELOP,
        call(f"{V1}/services/{{service}}", json_body={"max_attempts": 4}),
    ),
    ("DELETE", f"{V1}/services/{{id}}"): (OWN, on_fresh("service", f"{V1}/services/{{id}}")),
    ("POST", f"{V1}/services/{{id}}/pause"): (DEVELOP, call(f"{V1}/services/{{service}}/pause")),
    ("POST", f"{V1}/services/{{id}}/resume"): (
        DEVELOP,
        call(f"{V1}/services/{{service}}/resume"),
    ),
    ("GET", f"{V1}/services/{{id}}/status"): (VIEW, call(f"{V1}/services/{{service}}/status")),
    ("GET", f"{V1}/services/{{id}}/logs"): (VIEW, call(f"{V1}/services/{{service}}/logs")),
    ("POST", f"{V1}/executions"): (RUN_ACCESS, call(f"{V1}/executions", json_body=RUN)),
    ("POST", f"{V1}/executions/batch"): (
        RUN_ACCESS,
        call(f"{V1}/executions/batch", json_body={"executions": [RUN]}),
    ),
    ("GET", f"{V1}/executions"): (LIST, call(f"{V1}/executions")),
    ("GET", f"{V1}/executions/counters"): (LIST, call(f"{V1}/executions/counters")),
    ("GET", f"{V1}/executions/{{id}}"): (VIEW, call(f"{V1}/executions/{{execution}}")),
    ("GET", f"{V1}/executions/{{id}}/wait"): (
        VIEW,
        call(f"{V1}/executions/{{execution}}/wait", params={"timeout": "0"}),
    ),
    ("POST", f"{V1}/executions/{{id}}/terminate"): (
        DEVELOP,
        on_fresh("execution", f"{V1}/executions/{{id}}/terminate"),
    ),
    ("POST", f"{V1}/executions/{{id}}/rerun"): (
        DEVELOP,
        call(f"{V1}/executions/{{execution}}/rerun"),
    ),
    ("POST", f"{V1}/executions/{{id}}/progress"): (
        DEVELOP,
        call(f"{V1}/executions/{{execution}}/progress", json_body={"percent": 10}),
    ),
    ("GET", f"{V1}/executions/{{id}}/logs"): (VIEW, call(f"{V1}/executions/{{execution}}/logs")),
    ("GET", f"{V1}/events/stream"): (LIST, call(f"{V1}/events/stream", stream=True)),
    ("POST", f"{V1}/events"): (
        DEVELOP,
        call(
            f"{V1}/events",
            json_body={
                "project": "{project}",
                "resource": "invoice",
                "action": "paid",
                "resource_id": "1",
            },
        ),
    ),
    ("POST", f"{V1}/triggers"): (DEVELOP, _new_trigger),
    ("GET", f"{V1}/triggers"): (LIST, call(f"{V1}/triggers")),
    ("GET", f"{V1}/triggers/{{id}}"): (VIEW, call(f"{V1}/triggers/{{trigger}}")),
    ("PATCH", f"{V1}/triggers/{{id}}"): (
        DEVELOP,
        call(f"{V1}/triggers/{{trigger}}", json_body={"active": True}),
    ),
    ("DELETE", f"{V1}/triggers/{{id}}"): (DEVELOP, on_fresh("trigger", f"{V1}/triggers/{{id}}")),
    ("POST", f"{V1}/triggers/{{id}}/pause"): (DEVELOP, call(f"{V1}/triggers/{{trigger}}/pause")),
    ("POST", f"{V1}/triggers/{{id}}/resume"): (
        DEVELOP,
        call(f"{V1}/triggers/{{trigger}}/resume"),
    ),
    ("GET", f"{V1}/triggers/{{id}}/next"): (VIEW, call(f"{V1}/triggers/{{trigger}}/next")),
    ("POST", f"{V1}/pipelines"): (
        DEVELOP,
        lambda world: call(f"{V1}/pipelines", _pipeline(world, f"pl{next(_names)}"))(world),
    ),
    ("GET", f"{V1}/pipelines"): (LIST, call(f"{V1}/pipelines")),
    ("GET", f"{V1}/pipelines/{{id}}"): (VIEW, call(f"{V1}/pipelines/{{pipeline}}")),
    ("GET", f"{V1}/pipelines/{{id}}/versions/{{version}}"): (
        VIEW,
        call(f"{V1}/pipelines/{{pipeline}}/versions/1"),
    ),
    ("PATCH", f"{V1}/pipelines/{{id}}"): (
        DEVELOP,
        call(f"{V1}/pipelines/{{pipeline}}", json_body={"description": "changed"}),
    ),
    ("DELETE", f"{V1}/pipelines/{{id}}"): (
        DEVELOP,
        on_fresh("pipeline", f"{V1}/pipelines/{{id}}"),
    ),
    ("POST", f"{V1}/pipelines/{{id}}/install"): (
        DEVELOP,
        call(f"{V1}/pipelines/{{pipeline}}/install"),
    ),
    ("POST", f"{V1}/pipelines/{{id}}/uninstall"): (
        DEVELOP,
        call(f"{V1}/pipelines/{{pipeline}}/uninstall"),
    ),
    ("POST", f"{V1}/pipelines/{{id}}/execute"): (
        DEVELOP,
        call(f"{V1}/pipelines/{{pipeline}}/execute", json_body={"input": {}}),
    ),
    ("GET", f"{V1}/pipelines/{{id}}/statistics"): (
        VIEW,
        call(f"{V1}/pipelines/{{pipeline}}/statistics"),
    ),
    ("POST", f"{V1}/pipelines/{{id}}/statistics/reset"): (
        DEVELOP,
        call(f"{V1}/pipelines/{{pipeline}}/statistics/reset"),
    ),
    ("GET", f"{V1}/pipeline-executions"): (LIST, call(f"{V1}/pipeline-executions")),
    ("GET", f"{V1}/pipeline-executions/{{id}}"): (
        VIEW,
        call(f"{V1}/pipeline-executions/{{pipeline_execution}}"),
    ),
    ("GET", f"{V1}/pipeline-executions/{{id}}/wait"): (
        VIEW,
        call(f"{V1}/pipeline-executions/{{pipeline_execution}}/wait", params={"timeout": "0"}),
    ),
    ("GET", f"{V1}/pipeline-executions/{{id}}/logs"): (
        VIEW,
        call(f"{V1}/pipeline-executions/{{pipeline_execution}}/logs"),
    ),
    ("POST", f"{V1}/pipeline-executions/{{id}}/terminate"): (
        DEVELOP,
        on_fresh("pipeline_execution", f"{V1}/pipeline-executions/{{id}}/terminate"),
    ),
    ("POST", f"{V1}/pipeline-executions/{{id}}/resume"): (
        DEVELOP,
        on_fresh(
            "ended_pipeline_execution",
            f"{V1}/pipeline-executions/{{id}}/resume",
            {"nodes": ["only"]},
        ),
    ),
}


def test_every_route_is_classified():
    routes = {(route.method, route.path) for route in ALL_ROUTES}
    unclassified = sorted(routes - MATRIX.keys())
    assert not unclassified, f"add these routes to MATRIX in {__name__}: {unclassified}"
    assert not MATRIX.keys() - routes, "MATRIX names routes the table no longer has"


@pytest.fixture
async def world(api, project, package, service) -> World:
    status, execution = await api.post(
        f"{V1}/executions", {"service": service["id"], "function": "noop"}
    )
    assert status == 201, execution
    world = World(api, project["id"], package["id"], service["id"], execution["id"], "")
    status, trigger = await api.post(f"{V1}/triggers", _trigger(world, "nightly"))
    assert status == 201, trigger
    world.trigger = trigger["id"]
    status, pipeline = await api.post(f"{V1}/pipelines", _pipeline(world, "flow"))
    assert status == 201, pipeline
    world.pipeline = pipeline["id"]
    status, installed = await api.post(f"{V1}/pipelines/{world.pipeline}/install")
    assert status == 200, installed
    world.pipeline_execution = await world.fresh("pipeline_execution")
    return world


@pytest.fixture
async def callers(pool, api, world, admin_token) -> dict[str, str | None]:
    status, other = await api.post(f"{V1}/projects", {"name": "beta"})
    assert status == 201, other
    return {
        "none": None,
        "bad": "fry_" + "x" * 43,
        "other": await token_for(pool, "owner", other["id"]),
        "viewer": await token_for(pool, "viewer", world.project),
        "developer": await token_for(pool, "developer", world.project),
        "owner": await token_for(pool, "owner", world.project),
        "admin": admin_token,
    }


async def _send(api: Api, method: str, request: Call, token: str | None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = None
    if request.archive is not None:
        data = aiohttp.FormData()
        if request.project is not None:
            data.add_field("project", request.project)
        data.add_field("codebase", request.archive, filename="code.zip")
    async with api.client.request(
        method,
        request.path,
        json=request.json_body,
        data=data,
        params=request.params,
        headers=headers,
    ) as response:
        if request.stream:
            return response.status, ""
        return response.status, (await response.read()).decode(errors="replace")[:500]


@pytest.mark.parametrize("route", ALL_ROUTES, ids=lambda r: f"{r.method} {r.path}")
async def test_route_refuses_whom_it_should(route: Route, world: World, callers, api):
    key = (route.method, route.path)
    if key not in MATRIX:
        pytest.fail(f"{route.method} {route.path} is not classified in MATRIX")
    access, build = MATRIX[key]
    assert route.auth == (access.role is not None), "the table and the matrix disagree"
    documented = possible_errors(route)
    destroys = route.method == "DELETE"
    for caller in CALLERS:
        refusal = expected_status(access, caller)
        if refusal is not None:
            assert refusal in documented, f"{caller}: {refusal} is not in the document"
        if destroys and refusal is None and key == ("DELETE", f"{V1}/projects/{{id}}"):
            world.project = await world.fresh("project")  # keep project A for the others
        request = await build(world)
        status, text = await _send(api, route.method, request, callers[caller])
        if refusal is None:
            assert status < 400, (caller, status, text)
        else:
            assert status == refusal, (caller, status, text)
    if access.scope == "collection" and route.query and "project" in route.query.model_fields:
        # Naming a project the caller cannot see is as good as naming none that exists.
        request = await build(world)
        request.params["project"] = world.project
        status, text = await _send(api, route.method, request, callers["other"])
        expected = 403 if expected_status(access, "other") == 403 else 404
        assert status == expected and expected in documented, (status, text)
