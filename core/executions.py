"""Executions as the API sees them: create (validated, committed, then queued), read, list.

The worker-side transitions live in `core.states`.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import asyncpg
from arq.connections import ArqRedis
from pydantic import Field

from core import events, queue, states
from core.auth import Principal, Role, fetch_visible
from core.errors import FerryError, Invalid, InvalidTransition
from core.ids import new_id
from core.manifest import find_function, validate_inputs
from core.models import Model, Request, Timestamp, status_entry
from core.packages import load_manifest
from core.pagination import Keyset, Order, page_of
from core.states import ExecutionStatus, Reason

log_prefix = "executions"


class ExecutionCreate(Request):
    service: str
    function: str
    input: dict[str, Any] = Field(default_factory=dict)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=200)
    max_attempts: int | None = Field(default=None, ge=1, le=100)
    timeout_s: int | None = Field(default=None, ge=1, le=7 * 86400)


class ExecutionBatch(Request):
    executions: list[ExecutionCreate] = Field(min_length=1)


class Progress(Model):
    percent: float = 0
    message: str | None = None


class ProgressUpdate(Request):
    percent: float = Field(ge=0, le=100)
    message: str | None = None


class StatusLogEntry(Model):
    status: str
    at: str
    message: str | None = None
    attempt: int | None = None
    reason: str | None = None


class Execution(Model):
    id: str
    project: str
    service: str
    function: str
    status: ExecutionStatus
    reason: Reason | None
    input: dict[str, Any]
    output: Any
    error: dict[str, Any] | None
    progress: Progress
    attempt: int
    max_attempts: int
    timeout_s: int
    created_at: Timestamp
    started_at: Timestamp | None
    finished_at: Timestamp | None
    duration_ms: int | None
    trigger: str | None
    pipeline_execution: str | None
    rerun_of: str | None
    idempotency_key: str | None
    status_log: list[StatusLogEntry]


class LogLine(Model):
    seq: int
    at: Timestamp
    stream: str
    text: str


class Counters(Model):
    created: int = 0
    in_progress: int = Field(default=0, serialization_alias="in-progress")
    success: int = 0
    failed: int = 0
    terminated: int = 0
    total: int = 0


def execution_from_row(row: asyncpg.Record) -> Execution:
    started, finished = row["started_at"], row["finished_at"]
    duration = int((finished - started).total_seconds() * 1000) if started and finished else None
    return Execution(
        id=row["id"],
        project=row["project_id"],
        service=row["service_id"],
        function=row["function"],
        status=row["status"],
        reason=row["reason"],
        input=row["input"],
        output=row["output"],
        error=row["error"],
        progress=Progress(percent=row["progress_percent"], message=row["progress_message"]),
        attempt=row["attempt"],
        max_attempts=row["max_attempts"],
        timeout_s=row["timeout_s"],
        created_at=row["created_at"],
        started_at=started,
        finished_at=finished,
        duration_ms=duration,
        trigger=row["trigger_id"],
        pipeline_execution=row["pipeline_execution_id"],
        rerun_of=row["rerun_of"],
        idempotency_key=row["idempotency_key"],
        status_log=row["status_log"],
    )


_INSERT = """
    INSERT INTO executions (id, project_id, service_id, function, input, max_attempts, timeout_s,
                            idempotency_key, trigger_id, trigger_fire_time, event_id, rerun_of,
                            status_log)
    SELECT id, project, service, function, input, max_attempts, timeout_s, key, trigger,
           fire_time, event, rerun_of, status_log::jsonb
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::jsonb[], $6::int[],
                $7::int[], $8::text[], $9::text[], $10::timestamptz[], $11::text[],
                $12::text[], $13::text[])
         AS t(id, project, service, function, input, max_attempts, timeout_s, key, trigger,
              fire_time, event, rerun_of, status_log)
    ON CONFLICT DO NOTHING
    RETURNING *
"""


async def _prepare(
    conn: asyncpg.Connection,
    by: Principal | None,
    body: ExecutionCreate,
    field: str,
    services: dict[str, asyncpg.Record],
) -> tuple[asyncpg.Record, dict[str, Any], int | None]:
    """Check one request against its service and function: (service row, full input, the
    function's own timeout)."""
    service = services.get(body.service)
    if service is None:
        service = await conn.fetchrow(
            """SELECT id, project_id, package_id, package_revision, module, max_attempts,
                      execution_timeout_s FROM services WHERE id = $1""",
            body.service,
        )
        if service is None or (by is not None and not by.can_see(service["project_id"])):
            raise Invalid.field(f"{field}service", "no such service")
        if by is not None:
            by.require(Role.developer, service["project_id"])
        services[body.service] = service
    manifest = await load_manifest(conn, service["package_id"], service["package_revision"])
    function = find_function(manifest, service["module"], body.function, field=f"{field}function")
    full_input = validate_inputs(function, body.input, field_prefix=f"{field}input")
    return service, full_input, function.timeout_s


async def create_executions(
    pool: asyncpg.Pool,
    redis: ArqRedis | None,
    by: Principal | None,
    bodies: list[ExecutionCreate],
    *,
    batch: bool = False,
    trigger_id: str | None = None,
    fire_time: datetime | None = None,
    event_id: str | None = None,
    rerun_of: str | None = None,
    conn: asyncpg.Connection | None = None,
) -> list[tuple[Execution, bool]]:
    """Validate, insert in one transaction, commit, then enqueue.

    Returns (execution, created) per body in order; `created` is False where an
    idempotency key matched an earlier execution. All-or-nothing: one invalid body rejects
    the batch, with each detail naming `executions[i].…`.
    """
    if conn is None:
        async with pool.acquire() as own, own.transaction():
            results = await _insert(
                own, by, bodies, batch, trigger_id, fire_time, event_id, rerun_of
            )
    else:  # the caller's transaction (a trigger firing): it enqueues after its commit
        results = await _insert(conn, by, bodies, batch, trigger_id, fire_time, event_id, rerun_of)
    if redis is not None and conn is None:
        await enqueue_created(redis, [e for e, created in results if created])
    return results


async def enqueue_created(redis: ArqRedis, executions: list[Execution]) -> None:
    """Queue freshly committed executions; if Redis is down, the reconciler queues them later."""
    by_service: dict[str, list[Execution]] = {}
    for execution in executions:
        by_service.setdefault(execution.service, []).append(execution)
    try:
        for service_id, batch in by_service.items():
            # One round trip per service: the jobs and their `execution.created` events.
            await queue.enqueue_executions(
                redis,
                service_id,
                [e.id for e in batch],
                [(e.project, created_event_data(e)) for e in batch],
            )
    except (OSError, ConnectionError, TimeoutError) as exc:  # committed is accepted: not lost
        import logging

        logging.getLogger(__name__).warning("enqueue deferred to the reconciler: %s", exc)


def created_event_data(execution: Execution) -> dict[str, Any]:
    return {
        "service": execution.service,
        "function": execution.function,
        "status": execution.status.value,
        "reason": None,
        "attempt": execution.attempt,
        "trigger": execution.trigger,
    }


async def _insert(
    conn: asyncpg.Connection,
    by: Principal | None,
    bodies: list[ExecutionCreate],
    batch: bool,
    trigger_id: str | None,
    fire_time: datetime | None,
    event_id: str | None,
    rerun_of: str | None,
) -> list[tuple[Execution, bool]]:
    services: dict[str, asyncpg.Record] = {}
    details: list[dict[str, Any]] = []
    columns: list[list[Any]] = [[] for _ in range(13)]
    for index, body in enumerate(bodies):
        field = f"executions[{index}]." if batch else ""
        try:
            service, full_input, function_timeout_s = await _prepare(
                conn, by, body, field, services
            )
        except Invalid as exc:
            details.extend(exc.details)
            continue
        except FerryError:
            raise
        row = [
            new_id(),
            service["project_id"],
            service["id"],
            body.function,
            full_input,
            body.max_attempts or service["max_attempts"],
            # The request's timeout, else the function's (manifest), else the service's.
            body.timeout_s or function_timeout_s or service["execution_timeout_s"],
            body.idempotency_key,
            trigger_id,
            fire_time,
            event_id,
            rerun_of,
            json.dumps([status_entry("created")]),  # text: a list would read as a 2-D array
        ]
        for column, value in zip(columns, row, strict=True):
            column.append(value)
    if details:
        raise Invalid(details[0]["message"] if len(details) == 1 else "invalid executions", details)
    inserted = {r["id"]: r for r in await conn.fetch(_INSERT, *columns)}
    results: list[tuple[Execution, bool]] = []
    for index, execution_id in enumerate(columns[0]):
        row = inserted.get(execution_id)
        if row is not None:
            results.append((execution_from_row(row), True))
            continue
        # Not inserted: an idempotency key (or trigger tick) matched an existing execution.
        existing = await conn.fetchrow(
            """SELECT * FROM executions WHERE (project_id = $1 AND idempotency_key = $2)
                  OR (trigger_id = $3 AND (trigger_fire_time = $4 OR event_id = $5))""",
            columns[1][index],
            columns[7][index],
            trigger_id,
            fire_time,
            event_id,
        )
        if existing is None:
            raise Invalid.field("idempotency_key", "conflicts with an execution being created")
        results.append((execution_from_row(existing), False))
    return results


async def fetch_execution(
    conn: asyncpg.Connection | asyncpg.Pool, by: Principal, execution_id: str
):
    return await fetch_visible(conn, by, "executions", execution_id, "execution")


async def get_execution(pool: asyncpg.Pool, by: Principal, execution_id: str) -> Execution:
    return execution_from_row(await fetch_execution(pool, by, execution_id))


async def list_executions(
    pool: asyncpg.Pool,
    by: Principal,
    *,
    filters: dict[str, Any],
    cursor: str | None,
    limit: int,
    order: Order,
) -> dict:
    query = Keyset()
    project = by.project_filter(filters.get("project"))
    if project is not None:
        query.where("project_id = {}", project)
    for name, column in (
        ("service", "service_id"),
        ("function", "function"),
        ("trigger", "trigger_id"),
        ("pipeline_execution", "pipeline_execution_id"),
    ):
        if filters.get(name) is not None:
            query.where(f"{column} = {{}}", filters[name])
    if filters.get("status") is not None:
        statuses = filters["status"].split(",")
        unknown = [s for s in statuses if s not in ExecutionStatus._value2member_map_]
        if unknown:
            allowed = ", ".join(s.value for s in ExecutionStatus)
            raise Invalid.field("status", f"unknown status {unknown[0]!r}; one of {allowed}")
        if len(statuses) == 1:  # `=` lets PostgreSQL walk the (…, status, created_at, id) index
            query.where("status = {}", statuses[0])
        else:
            query.where("status = ANY({}::text[])", statuses)
    if filters.get("created_after") is not None:
        query.where("created_at > {}", filters["created_after"])
    if filters.get("created_before") is not None:
        query.where("created_at < {}", filters["created_before"])
    rows = await pool.fetch(
        f"SELECT * FROM executions {query.tail(cursor, order, limit)}", *query.args
    )
    return page_of(rows, limit, execution_from_row)


async def counters(
    pool: asyncpg.Pool, by: Principal, *, project: str | None, service: str | None
) -> Counters:
    query = Keyset()
    project = by.project_filter(project)
    if project is not None:
        query.where("project_id = {}", project)
    if service is not None:
        query.where("service_id = {}", service)
    where = " AND ".join(query.conditions) or "true"
    rows = await pool.fetch(
        f"SELECT status, count(*) AS n FROM executions WHERE {where} GROUP BY status", *query.args
    )
    counts = {r["status"].replace("-", "_"): r["n"] for r in rows}
    return Counters(**counts, total=sum(counts.values()))


async def terminate(
    pool: asyncpg.Pool, redis: ArqRedis, by: Principal, execution_id: str
) -> Execution:
    row = await fetch_execution(pool, by, execution_id)
    by.require(Role.developer, row["project_id"])
    updated = await states.terminate_created(pool, execution_id)
    if updated is None:
        updated = await states.request_termination(pool, execution_id)
        if updated is not None and updated["status"] == ExecutionStatus.in_progress:
            # The worker holding it hears this at once; its heartbeat would find it anyway.
            await redis.publish(events.TERMINATE_CHANNEL, execution_id)
    if updated is None:
        current = await fetch_execution(pool, by, execution_id)
        raise InvalidTransition(
            f"the execution is {current['status']} already: nothing to terminate"
        )
    if updated["status"] == ExecutionStatus.terminated:
        # Terminated here and now; a running one is reported by its worker when it stops.
        await events.publish(
            redis,
            "execution.terminated",
            updated["project_id"],
            "execution",
            execution_id,
            events.execution_event_data(updated),
        )
    return execution_from_row(updated)


async def rerun(pool: asyncpg.Pool, redis: ArqRedis, by: Principal, execution_id: str) -> Execution:
    row = await fetch_execution(pool, by, execution_id)
    body = ExecutionCreate(service=row["service_id"], function=row["function"], input=row["input"])
    [(execution, _)] = await create_executions(pool, redis, by, [body], rerun_of=execution_id)
    return execution


async def update_progress(
    pool: asyncpg.Pool, by: Principal, execution_id: str, body: ProgressUpdate
) -> Execution:
    row = await fetch_execution(pool, by, execution_id)
    by.require(Role.developer, row["project_id"])
    updated = await pool.fetchrow(
        """UPDATE executions SET progress_percent = $2, progress_message = $3,
               updated_at = clock_timestamp()
           WHERE id = $1 AND status IN ('created', 'in-progress') RETURNING *""",
        execution_id,
        body.percent,
        body.message,
    )
    if updated is None:
        raise InvalidTransition(f"the execution is {row['status']}: progress is final")
    return execution_from_row(updated)


async def list_logs(
    pool: asyncpg.Pool, by: Principal, execution_id: str, *, after_seq: int, limit: int
) -> dict:
    await fetch_execution(pool, by, execution_id)
    rows = await pool.fetch(
        """SELECT seq, at, stream, text FROM execution_logs
           WHERE execution_id = $1 AND seq > $2 ORDER BY seq LIMIT $3""",
        execution_id,
        after_seq,
        limit,
    )
    items = [LogLine.model_validate(dict(r)) for r in rows]
    next_cursor = str(items[-1].seq) if items else (str(after_seq) if after_seq else None)
    return {"items": items, "next_cursor": next_cursor}
