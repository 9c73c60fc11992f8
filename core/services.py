"""Services: a package revision deployed with a runtime, served by warm replicas."""

from __future__ import annotations

import re
from typing import Any, Literal

import asyncpg
from pydantic import Field, field_validator, model_validator
from redis.asyncio import Redis

from core import events
from core.auth import Principal, Role, fetch_visible
from core.errors import Conflict, Invalid, NotFound
from core.ids import new_id
from core.manifest import FunctionSpec, Manifest, find_module, validate_inputs
from core.models import Model, Request, Timestamp
from core.packages import load_manifest
from core.pagination import Keyset, Order, page_of
from core.secrets import SecretBox

NAME_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class Runtime(Request):
    image: str | None = None  # None: the default runner image (plus the package's requirements)
    cpu: float = Field(default=1.0, gt=0, le=64)
    memory_mb: int = Field(default=512, ge=32, le=262_144)
    concurrency: int = Field(default=4, ge=1, le=1000)
    min_replicas: int = Field(default=0, ge=0, le=100)
    max_replicas: int = Field(default=2, ge=0, le=100)
    target_queue_per_replica: int = Field(default=10, ge=1, le=100_000)
    idle_timeout_s: int = Field(default=300, ge=0, le=7 * 86400)
    network: bool = True
    pids_limit: int = Field(default=256, ge=16, le=65_536)

    @model_validator(mode="after")
    def _replica_bounds(self) -> Runtime:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self


def _check_env(value: dict[str, str]) -> dict[str, str]:
    for name in value:
        if not _ENV_NAME.match(name) or name.startswith("FERRY_"):
            raise ValueError(f"{name!r} is not a usable environment variable name")
    return value


class ServiceCreate(Request):
    project: str
    name: str = Field(pattern=NAME_PATTERN)
    package: str
    package_revision: int | None = None  # default: the package's latest revision
    module: str | None = None  # default: the manifest's first module
    runtime: Runtime = Field(default_factory=Runtime)
    execution_timeout_s: int = Field(default=3600, ge=1, le=7 * 86400)
    max_attempts: int = Field(default=3, ge=1, le=100)
    on_reset: Literal["rerun", "failed"] = "rerun"
    env: dict[str, str] = Field(default_factory=dict)
    secrets: dict[str, str] = Field(default_factory=dict)
    init_inputs: dict[str, Any] = Field(default_factory=dict)

    _env = field_validator("env", "secrets")(_check_env)


class RuntimePatch(Request):
    image: str | None = None
    cpu: float | None = None
    memory_mb: int | None = None
    concurrency: int | None = None
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_queue_per_replica: int | None = None
    idle_timeout_s: int | None = None
    network: bool | None = None
    pids_limit: int | None = None


class ServicePatch(Request):
    name: str | None = Field(default=None, pattern=NAME_PATTERN)
    package_revision: int | None = None
    module: str | None = None
    runtime: RuntimePatch | None = None
    execution_timeout_s: int | None = Field(default=None, ge=1, le=7 * 86400)
    max_attempts: int | None = Field(default=None, ge=1, le=100)
    on_reset: Literal["rerun", "failed"] | None = None
    env: dict[str, str] | None = None
    # A secret set to null is removed; others are replaced or added.
    secrets: dict[str, str | None] | None = None
    init_inputs: dict[str, Any] | None = None

    _env = field_validator("env")(_check_env)


class Service(Model):
    id: str
    project: str
    name: str
    package: str
    package_revision: int
    module: str
    runtime: Runtime
    execution_timeout_s: int
    max_attempts: int
    on_reset: Literal["rerun", "failed"]
    env: dict[str, str]
    secrets: list[str]  # names only: values never leave the server
    init_inputs: dict[str, Any]
    status: Literal["active", "paused"]
    generation: int
    created_at: Timestamp
    updated_at: Timestamp


class ReplicaStatus(Model):
    id: str
    host: str
    status: str
    running: int
    generation: int
    message: str | None
    started_at: Timestamp


class ServiceStatus(Model):
    queue_length: int
    in_progress: int
    desired_replicas: int
    replicas: list[ReplicaStatus]


def service_from_row(row: asyncpg.Record) -> Service:
    return Service(
        id=row["id"],
        project=row["project_id"],
        name=row["name"],
        package=row["package_id"],
        package_revision=row["package_revision"],
        module=row["module"],
        runtime=Runtime.model_validate(row["runtime"]),
        execution_timeout_s=row["execution_timeout_s"],
        max_attempts=row["max_attempts"],
        on_reset=row["on_reset"],
        env=row["env"],
        secrets=sorted(row["secrets"]),
        init_inputs=row["init_inputs"],
        status=row["status"],
        generation=row["generation"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def init_spec(manifest: Manifest, module_name: str) -> FunctionSpec:
    module = find_module(manifest, module_name)
    return FunctionSpec(name="init", inputs=module.init_inputs)


async def _resolve_revision(
    conn: asyncpg.Connection, project_id: str, package_id: str, revision: int | None
) -> tuple[int, Manifest]:
    package = await conn.fetchrow(
        "SELECT project_id, latest_revision FROM packages WHERE id = $1", package_id
    )
    if package is None or package["project_id"] != project_id:
        raise Invalid.field("package", "no such package in this project")
    revision = revision or package["latest_revision"]
    if not 1 <= revision <= package["latest_revision"]:
        raise Invalid.field(
            "package_revision", f"the package has revisions 1..{package['latest_revision']}"
        )
    return revision, await load_manifest(conn, package_id, revision)


async def _publish(redis: Redis | None, action: str, row: asyncpg.Record) -> None:
    if redis is not None:
        await events.publish(
            redis,
            f"service.{action}",
            row["project_id"],
            "service",
            row["id"],
            {"name": row["name"], "status": row["status"], "generation": row["generation"]},
        )


async def create_service(
    pool: asyncpg.Pool,
    box: SecretBox,
    by: Principal,
    body: ServiceCreate,
    redis: Redis | None = None,
) -> Service:
    by.require(Role.developer, body.project)
    async with pool.acquire() as conn, conn.transaction():
        if not await conn.fetchval("SELECT 1 FROM projects WHERE id = $1", body.project):
            raise NotFound("project not found")
        revision, manifest = await _resolve_revision(
            conn, body.project, body.package, body.package_revision
        )
        module = body.module or manifest.modules[0].name
        init_inputs = validate_inputs(
            init_spec(manifest, module), body.init_inputs, field_prefix="init_inputs"
        )
        try:
            row = await conn.fetchrow(
                """INSERT INTO services (id, project_id, name, package_id, package_revision, module,
                       runtime, execution_timeout_s, max_attempts, on_reset, env, secrets,
                       init_inputs, desired_replicas)
                   VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14) RETURNING *""",
                new_id(),
                body.project,
                body.name,
                body.package,
                revision,
                module,
                body.runtime.model_dump(),
                body.execution_timeout_s,
                body.max_attempts,
                body.on_reset,
                body.env,
                {name: box.encrypt(value) for name, value in body.secrets.items()},
                init_inputs,
                body.runtime.min_replicas,
            )
        except asyncpg.UniqueViolationError:
            raise Conflict(f"a service named {body.name!r} exists in this project") from None
    await _publish(redis, "created", row)
    return service_from_row(row)


async def fetch_service(conn: asyncpg.Connection | asyncpg.Pool, by: Principal, service_id: str):
    return await fetch_visible(conn, by, "services", service_id, "service")


async def get_service(pool: asyncpg.Pool, by: Principal, service_id: str) -> Service:
    return service_from_row(await fetch_service(pool, by, service_id))


async def list_services(
    pool: asyncpg.Pool,
    by: Principal,
    *,
    project: str | None,
    package: str | None,
    status: str | None,
    cursor: str | None,
    limit: int,
    order: Order,
) -> dict:
    query = Keyset()
    project = by.project_filter(project)
    if project is not None:
        query.where("project_id = {}", project)
    if package is not None:
        query.where("package_id = {}", package)
    if status is not None:
        if status not in ("active", "paused"):
            raise Invalid.field("status", "one of active, paused")
        query.where("status = {}", status)
    rows = await pool.fetch(
        f"SELECT * FROM services {query.tail(cursor, order, limit)}", *query.args
    )
    return page_of(rows, limit, service_from_row)


# Changing any of these needs new replicas: the generation moves and old replicas drain.
_ROLLING_FIELDS = {"package_revision", "module", "runtime", "env", "secrets", "init_inputs"}


async def update_service(
    pool: asyncpg.Pool,
    box: SecretBox,
    by: Principal,
    service_id: str,
    body: ServicePatch,
    redis: Redis | None = None,
) -> Service:
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow("SELECT * FROM services WHERE id = $1 FOR UPDATE", service_id)
        if row is None or not by.can_see(row["project_id"]):
            raise NotFound("service not found")
        by.require(Role.developer, row["project_id"])
        changes = body.model_dump(exclude_unset=True)
        revision, manifest = await _resolve_revision(
            conn,
            row["project_id"],
            row["package_id"],
            changes.get("package_revision", row["package_revision"]),
        )
        module = changes.get("module", row["module"])
        init_inputs = validate_inputs(
            init_spec(manifest, module),
            changes.get("init_inputs", row["init_inputs"]),
            field_prefix="init_inputs",
        )
        runtime = row["runtime"]
        if "runtime" in changes:
            merged = {**runtime, **{k: v for k, v in changes["runtime"].items()}}
            try:
                runtime = Runtime.model_validate(merged).model_dump()
            except ValueError as exc:
                raise _as_invalid(exc, "runtime") from None
        secrets = dict(row["secrets"])
        for name, value in (changes.get("secrets") or {}).items():
            if value is None:
                secrets.pop(name, None)
            else:
                _check_env({name: value})
                secrets[name] = box.encrypt(value)
        rolling = bool(_ROLLING_FIELDS & changes.keys())
        try:
            updated = await conn.fetchrow(
                """UPDATE services SET name = $2, package_revision = $3, module = $4, runtime = $5,
                       execution_timeout_s = $6, max_attempts = $7, on_reset = $8, env = $9,
                       secrets = $10, init_inputs = $11, generation = generation + $12::int,
                       updated_at = now()
                   WHERE id = $1 RETURNING *""",
                service_id,
                changes.get("name") or row["name"],
                revision,
                module,
                runtime,
                changes.get("execution_timeout_s") or row["execution_timeout_s"],
                changes.get("max_attempts") or row["max_attempts"],
                changes.get("on_reset") or row["on_reset"],
                changes["env"] if changes.get("env") is not None else row["env"],
                secrets,
                init_inputs,
                1 if rolling else 0,
            )
        except asyncpg.UniqueViolationError:
            raise Conflict(
                f"a service named {changes.get('name')!r} exists in this project"
            ) from None
    await _publish(redis, "updated", updated)
    return service_from_row(updated)


def _as_invalid(exc: Exception, prefix: str) -> Invalid:
    errors = getattr(exc, "errors", lambda: [])()
    details = [
        {
            "field": ".".join([prefix, *[str(p) for p in e.get("loc", ())]]),
            "message": e.get("msg", str(exc)),
        }
        for e in errors
    ] or [{"field": prefix, "message": str(exc)}]
    return Invalid(f"invalid {prefix}", details)


async def set_service_status(
    pool: asyncpg.Pool,
    by: Principal,
    service_id: str,
    status: Literal["active", "paused"],
    redis: Redis | None = None,
) -> Service:
    row = await fetch_service(pool, by, service_id)
    by.require(Role.developer, row["project_id"])
    updated = await pool.fetchrow(
        """UPDATE services SET status = $2, updated_at = now(), last_activity_at = now()
           WHERE id = $1 RETURNING *""",
        service_id,
        status,
    )
    if updated is None:
        raise NotFound("service not found")
    await _publish(redis, "paused" if status == "paused" else "resumed", updated)
    return service_from_row(updated)


async def delete_service(
    pool: asyncpg.Pool, by: Principal, service_id: str, redis: Redis | None = None
) -> None:
    row = await fetch_service(pool, by, service_id)
    by.require(Role.owner, row["project_id"])
    deleted = await pool.fetchrow("DELETE FROM services WHERE id = $1 RETURNING *", service_id)
    if deleted is not None:
        await _publish(redis, "deleted", deleted)
