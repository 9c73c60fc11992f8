"""Services: a package revision deployed with a runtime, served by warm replicas."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import asyncpg
from pydantic import AfterValidator, Field, field_validator
from redis.asyncio import Redis

from core import outbox
from core.auth import Principal, Role, fetch_visible
from core.errors import Conflict, Invalid, NotFound
from core.ids import new_id
from core.manifest import FunctionSpec, Manifest, find_module, validate_inputs
from core.models import Model, Request, Timestamp
from core.packages import load_manifest
from core.pagination import Keyset, Order, page_of
from core.secrets import SecretBox
from core.service_spec import NAME_PATTERN, Runtime
from core.service_spec import check_env as _check_env


def _check_env_value(value: str | None) -> str | None:
    # An environment cannot hold a NUL: such a value would only fail later, at every start.
    if value is not None and "\x00" in value:
        raise ValueError("must not contain a NUL character")
    return value


def _check_secret_value(value: str | None) -> str | None:
    _check_env_value(value)
    if value is not None and len(value) < MIN_SECRET_LENGTH:
        raise ValueError(
            f"must be at least {MIN_SECRET_LENGTH} characters: shorter values cannot be "
            "masked in logs without masking ordinary text"
        )
    return value


MIN_SECRET_LENGTH = 4  # as `core.secrets.mask_secrets`, which masks nothing shorter
# Errors on these name the entry: `secrets.API_KEY`, `env.HOME`.
EnvValue = Annotated[str, AfterValidator(_check_env_value)]
SecretValue = Annotated[str, AfterValidator(_check_secret_value)]
SecretChange = Annotated[str | None, AfterValidator(_check_secret_value)]


class ServiceCreate(Request):
    project: str
    name: str = Field(pattern=NAME_PATTERN)
    package: str
    package_revision: int | None = None  # default: the package's latest revision
    module: str | None = None  # default: the manifest's first module
    runtime: Runtime = Field(default_factory=Runtime)
    execution_timeout_s: int | None = Field(
        default=None,
        ge=1,
        le=7 * 86400,
        description="default: the server's FERRY_DEFAULT_EXECUTION_TIMEOUT_S (3600)",
    )
    max_attempts: int = Field(default=3, ge=1, le=100)
    on_reset: Literal["rerun", "failed"] = "rerun"
    env: dict[str, EnvValue] = Field(default_factory=dict)
    secrets: dict[str, SecretValue] = Field(default_factory=dict)
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
    executions_per_process: int | None = None


class ServicePatch(Request):
    name: str | None = Field(default=None, pattern=NAME_PATTERN)
    package_revision: int | None = None
    module: str | None = None
    runtime: RuntimePatch | None = None
    execution_timeout_s: int | None = Field(default=None, ge=1, le=7 * 86400)
    max_attempts: int | None = Field(default=None, ge=1, le=100)
    on_reset: Literal["rerun", "failed"] | None = None
    env: dict[str, EnvValue] | None = None
    # A secret set to null is removed; others are replaced or added.
    secrets: dict[str, SecretChange] | None = None
    init_inputs: dict[str, Any] | None = None

    _env = field_validator("env", "secrets")(_check_env)


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
    # The latest replica of the current generation that failed to start, while none is ready.
    last_failure: ReplicaStatus | None = None


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


async def _event(conn: asyncpg.Connection, action: str, row: asyncpg.Record) -> outbox.OutboxEvent:
    """The `service.<action>` event, written in the transaction that made the change."""
    return await outbox.add(
        conn,
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
    *,
    default_timeout_s: int = 3600,
) -> Service:
    """Create a service; `default_timeout_s` (the FERRY_DEFAULT_EXECUTION_TIMEOUT_S setting)
    stands in for an unset `execution_timeout_s`."""
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
                body.execution_timeout_s or default_timeout_s,
                body.max_attempts,
                body.on_reset,
                body.env,
                {name: box.encrypt(value) for name, value in body.secrets.items()},
                init_inputs,
                body.runtime.min_replicas,
            )
        except asyncpg.UniqueViolationError:
            raise Conflict(f"a service named {body.name!r} exists in this project") from None
        event = await _event(conn, "created", row)
    await outbox.publish(pool, redis, [event])
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


# What a replica runs: a change of any of these needs new replicas, so the generation moves
# and the old replicas drain. Everything else (the name, timeouts, attempts, and how many
# replicas there are) is read where it is used and leaves running replicas alone.
_ROLLING_COLUMNS = ("package_revision", "module", "env", "secrets", "init_inputs")
_ROLLING_RUNTIME = (
    "image",
    "cpu",
    "memory_mb",
    "concurrency",
    "network",
    "pids_limit",
    "executions_per_process",
)


def _rolls_over(before: asyncpg.Record, after: dict[str, Any]) -> bool:
    """True when the change alters what the service's replicas run."""
    if any(before[column] != after[column] for column in _ROLLING_COLUMNS):
        return True
    old, new = before["runtime"], after["runtime"]
    return any(old.get(key) != new.get(key) for key in _ROLLING_RUNTIME)


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
        if changes.get("runtime") is not None:
            merged = {**runtime, **{k: v for k, v in changes["runtime"].items()}}
            try:
                runtime = Runtime.model_validate(merged).model_dump()
            except ValueError as exc:
                raise _as_invalid(exc, "runtime") from None
        secrets = dict(row["secrets"])
        for name, value in (changes.get("secrets") or {}).items():
            if value is None:
                secrets.pop(name, None)
            elif name not in secrets or box.decrypt(secrets[name]) != value:
                _check_env({name: value})
                secrets[name] = box.encrypt(value)  # the same value again changes nothing
        env = changes["env"] if changes.get("env") is not None else row["env"]
        rolling = _rolls_over(
            row,
            {
                "package_revision": revision,
                "module": module,
                "env": env,
                "secrets": secrets,
                "init_inputs": init_inputs,
                "runtime": runtime,
            },
        )
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
                env,
                secrets,
                init_inputs,
                1 if rolling else 0,
            )
        except asyncpg.UniqueViolationError:
            raise Conflict(
                f"a service named {changes.get('name')!r} exists in this project"
            ) from None
        event = await _event(conn, "updated", updated)
    await outbox.publish(pool, redis, [event])
    return service_from_row(updated)


def _as_invalid(exc: Exception, prefix: str) -> Invalid:
    errors: list[dict[str, Any]] = getattr(exc, "errors", lambda: [])()
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
    async with pool.acquire() as conn, conn.transaction():
        updated = await conn.fetchrow(
            """UPDATE services SET status = $2, updated_at = now(), last_activity_at = now()
               WHERE id = $1 RETURNING *""",
            service_id,
            status,
        )
        if updated is None:
            raise NotFound("service not found")
        event = await _event(conn, "paused" if status == "paused" else "resumed", updated)
    await outbox.publish(pool, redis, [event])
    return service_from_row(updated)


async def delete_service(
    pool: asyncpg.Pool, by: Principal, service_id: str, redis: Redis | None = None
) -> None:
    row = await fetch_service(pool, by, service_id)
    by.require(Role.owner, row["project_id"])
    async with pool.acquire() as conn, conn.transaction():
        # Locked first: a pipeline being created with this service holds it FOR SHARE, so
        # either that pipeline is seen below or its own check finds the service gone.
        await conn.execute("SELECT 1 FROM services WHERE id = $1 FOR UPDATE", service_id)
        user = await conn.fetchrow(
            """SELECT p.id, p.name FROM pipeline_services s JOIN pipelines p ON p.id = s.pipeline_id
               WHERE s.service_id = $1 ORDER BY p.name LIMIT 1""",
            service_id,
        )
        if user is not None:
            raise Conflict(
                f"pipeline {user['name']!r} ({user['id']}) uses this service in one of its "
                "versions; delete the pipeline first",
                [{"field": "id", "message": f"used by pipeline {user['name']!r}"}],
            )
        deleted = await conn.fetchrow("DELETE FROM services WHERE id = $1 RETURNING *", service_id)
        event = await _event(conn, "deleted", deleted) if deleted is not None else None
    if event is not None:
        await outbox.publish(pool, redis, [event])
