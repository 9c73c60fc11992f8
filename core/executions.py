"""Executions as the API sees them: create (validated, committed, then queued), read, list.

The worker-side transitions live in `core.states`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import asyncpg
from arq.connections import ArqRedis
from pydantic import Field

from core import execution_counts, outbox, outcomes, queue
from core.auth import Principal, Role, fetch_visible
from core.errors import Invalid, InvalidTransition
from core.ids import new_id
from core.manifest import find_function, validate_inputs
from core.models import Model, Request, Timestamp, status_entry
from core.outages import UNAVAILABLE, Outage
from core.packages import load_manifest
from core.pagination import Keyset, Order, page_of
from core.states import ExecutionStatus, Reason

log = logging.getLogger(__name__)
# One per process: an outage is logged once, not once per accepted execution.
_enqueueing = Outage("queueing executions (left to the reconciler meanwhile)", log)


@dataclass(frozen=True)
class Origin:
    """Why an execution exists: asked for (`manual`), a trigger's tick or event, a rerun of
    another execution, or a node of a pipeline execution (one per upstream result and
    fan-out element: `parent`, `element`, `path`, in the pipeline's resume `round`)."""

    kind: Literal["manual", "trigger", "rerun", "pipeline"] = "manual"
    trigger_id: str | None = None
    fire_time: datetime | None = None
    event_id: str | None = None
    rerun_of: str | None = None
    pipeline_execution_id: str | None = None
    node: str | None = None
    parent: str | None = None
    element: int = 0
    path: tuple[int, ...] = ()
    round: int = 0


MANUAL = Origin()


class ExecutionCreate(Request):
    body_kind = "input"

    service: str
    function: str
    input: dict[str, Any] = Field(default_factory=dict)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=200)
    max_attempts: int | None = Field(default=None, ge=1, le=100)
    timeout_s: int | None = Field(default=None, ge=1, le=7 * 86400)


class ExecutionBatch(Request):
    body_kind = "batch"

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
    pipeline_node: str | None = None
    rerun_of: str | None
    idempotency_key: str | None
    status_log: list[StatusLogEntry]
    trigger_fire_time: Timestamp | None = None  # the cron tick it was fired for


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
        pipeline_node=row["pipeline_node"],
        rerun_of=row["rerun_of"],
        idempotency_key=row["idempotency_key"],
        status_log=row["status_log"],
        trigger_fire_time=row["trigger_fire_time"],
    )


_COLUMNS = (
    "id", "project_id", "service_id", "function", "input", "max_attempts", "timeout_s",
    "idempotency_key", "trigger_id", "trigger_fire_time", "event_id", "rerun_of",
    "pipeline_execution_id", "pipeline_node", "pipeline_parent", "pipeline_element",
    "pipeline_path", "pipeline_round", "status_log",
)  # fmt: skip
_TYPES = (
    "text", "text", "text", "text", "jsonb", "int", "int", "text", "text", "timestamptz", "text",
    "text", "text", "text", "text", "int", "text", "int", "text",
)  # fmt: skip
# One statement for any number of executions: a fan-out of thousands is one round trip.
# (pipeline_path and status_log travel as text: an array of arrays would not unnest.)
_INSERT = f"""
    INSERT INTO executions ({", ".join(_COLUMNS)})
    SELECT {", ".join(f"c{i}" for i in range(len(_COLUMNS) - 3))},
           c16::int[], c17, c18::jsonb
    FROM unnest({", ".join(f"${i + 1}::{t}[]" for i, t in enumerate(_TYPES))})
         AS t({", ".join(f"c{i}" for i in range(len(_COLUMNS)))})
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
    origin: Origin | list[Origin] = MANUAL,
    conn: asyncpg.Connection | None = None,
    events: list[outbox.OutboxEvent] | None = None,
) -> list[tuple[Execution, bool]]:
    """Validate, insert in one transaction (with their `execution.created` events in the
    outbox), commit, then publish the events and enqueue.

    Returns (execution, created) per body in order; `created` is False where an
    idempotency key (or a trigger's tick, or a pipeline's hop) matched an earlier execution.
    All-or-nothing: one invalid body rejects the batch, with each detail naming
    `executions[i].…`. `origin` is one for all bodies or one per body.

    With `conn`, the caller's transaction holds the inserts: the caller publishes `events`
    (extended here) and enqueues after its commit, with `deliver_created`.
    """
    origins = origin if isinstance(origin, list) else [origin] * len(bodies)
    if conn is None:
        written: list[outbox.OutboxEvent] = []
        async with pool.acquire() as own:
            async with own.transaction():
                results = await _insert(own, by, bodies, batch, origins, written)
            if redis is not None:
                await deliver_created(own, redis, [e for e, created in results if created], written)
        return results
    return await _insert(conn, by, bodies, batch, origins, events if events is not None else [])


async def deliver_created(
    conn: asyncpg.Connection | asyncpg.Pool,
    redis: ArqRedis,
    executions: list[Execution],
    events: list[outbox.OutboxEvent],
) -> None:
    """After the commit: publish the `execution.created` events, then queue the executions
    (so `created` precedes `in-progress` in the stream). If Redis is down, the outbox relay
    publishes and the reconciler queues them later: committed is accepted, never lost.
    The outbox rows go last: the queue does not wait for that round trip."""
    appended = await outbox.append(redis, events)
    await enqueue_created(redis, executions)
    if appended:
        await outbox.forget(conn, events)


async def enqueue_created(redis: ArqRedis, executions: list[Execution]) -> None:
    if _enqueueing.holding_off():
        return  # Redis failed a moment ago: the reconciler queues these within seconds
    by_service: dict[str, list[str]] = {}
    for execution in executions:
        by_service.setdefault(execution.service, []).append(execution.id)
    try:
        for service_id, ids in by_service.items():
            await queue.enqueue_executions(redis, service_id, ids)  # one round trip per service
    except UNAVAILABLE as exc:
        _enqueueing.lost(exc)
    else:
        _enqueueing.ok()


async def _insert(
    conn: asyncpg.Connection,
    by: Principal | None,
    bodies: list[ExecutionCreate],
    batch: bool,
    origins: list[Origin],
    events: list[outbox.OutboxEvent],
) -> list[tuple[Execution, bool]]:
    services: dict[str, asyncpg.Record] = {}
    details: list[dict[str, Any]] = []
    columns: list[list[Any]] = [[] for _ in _COLUMNS]
    for index, (body, origin) in enumerate(zip(bodies, origins, strict=True)):
        field = f"executions[{index}]." if batch else ""
        try:
            service, full_input, function_timeout_s = await _prepare(
                conn, by, body, field, services
            )
        except Invalid as exc:
            details.extend(exc.details)
            continue
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
            origin.trigger_id,
            origin.fire_time,
            origin.event_id,
            origin.rerun_of,
            origin.pipeline_execution_id,
            origin.node,
            origin.parent,
            origin.element,
            "{" + ",".join(map(str, origin.path)) + "}" if origin.node else None,
            origin.round,
            json.dumps([status_entry("created")]),
        ]
        for column, value in zip(columns, row, strict=True):
            column.append(value)
    if details:
        raise Invalid(details[0]["message"] if len(details) == 1 else "invalid executions", details)
    inserted = {r["id"]: r for r in await conn.fetch(_INSERT, *columns)}
    results: list[tuple[Execution, bool]] = []
    for index, execution_id in enumerate(columns[0]):
        found = inserted.get(execution_id)
        if found is not None:
            results.append((execution_from_row(found), True))
            continue
        # Not inserted: an idempotency key (or trigger tick) matched an existing execution.
        origin = origins[index]
        existing = await conn.fetchrow(
            """SELECT * FROM executions WHERE (project_id = $1 AND idempotency_key = $2)
                  OR (trigger_id = $3 AND (trigger_fire_time = $4 OR event_id = $5))
                  OR (pipeline_execution_id = $6 AND pipeline_node = $7 AND pipeline_round = $8
                      AND coalesce(pipeline_parent, '') = coalesce($9, '')
                      AND pipeline_element = $10)""",
            columns[1][index],
            columns[7][index],
            origin.trigger_id,
            origin.fire_time,
            origin.event_id,
            origin.pipeline_execution_id,
            origin.node,
            origin.round,
            origin.parent,
            origin.element,
        )
        if existing is None:
            raise Invalid.field("idempotency_key", "conflicts with an execution being created")
        results.append((execution_from_row(existing), False))
    events.extend(
        await outbox.add_many(
            conn,
            "execution.created",
            "execution",
            [(r["project_id"], r["id"], outbox.execution_data(r)) for r in inserted.values()],
        )
    )
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
        statuses = list(dict.fromkeys(statuses))
        if len(statuses) == 1:  # `=` lets PostgreSQL walk the (…, status, created_at, id) index
            query.where("status = {}", statuses[0])
    else:
        statuses = []
    if filters.get("created_after") is not None:
        query.where("created_at > {}", filters["created_after"])
    if filters.get("created_before") is not None:
        query.where("created_at < {}", filters["created_before"])
    if len(statuses) > 1:
        # One ordered index walk per status, merged (a Merge Append, no sort): `status =
        # ANY(…)` would walk the project's (or the table's) whole (created_at, id) order
        # when those statuses are rare.
        marks = [query.param(status) for status in statuses]
        where, _, ordered = query.tail(cursor, order, limit).partition(" ORDER BY ")
        branches = [
            f"(SELECT * FROM executions {where} AND status = {mark} ORDER BY {ordered})"
            for mark in marks
        ]
        sql = " UNION ALL ".join(branches) + f" ORDER BY {ordered}"
    else:
        sql = f"SELECT * FROM executions {query.tail(cursor, order, limit)}"
    rows = await pool.fetch(sql, *query.args)
    return page_of(rows, limit, execution_from_row)


async def counters(
    pool: asyncpg.Pool, by: Principal, *, project: str | None, service: str | None
) -> Counters:
    # Kept by the table itself (core/execution_counts.py): a few rows whatever its size.
    by_status = await execution_counts.read(
        pool, project=by.project_filter(project), service=service
    )
    counts = {status.replace("-", "_"): n for status, n in by_status.items()}
    return Counters(**counts, total=sum(counts.values()))


async def terminate(
    pool: asyncpg.Pool, redis: ArqRedis, by: Principal, execution_id: str
) -> Execution:
    row = await fetch_execution(pool, by, execution_id)
    by.require(Role.developer, row["project_id"])
    async with pool.acquire() as conn:
        recorded = await outcomes.terminate(conn, row)
        await recorded.deliver(conn, redis)
    if recorded.row is None:
        current = await fetch_execution(pool, by, execution_id)
        raise InvalidTransition(
            f"the execution is {current['status']} already: nothing to terminate"
        )
    return execution_from_row(recorded.row)


async def rerun(pool: asyncpg.Pool, redis: ArqRedis, by: Principal, execution_id: str) -> Execution:
    row = await fetch_execution(pool, by, execution_id)
    body = ExecutionCreate(service=row["service_id"], function=row["function"], input=row["input"])
    [(execution, _)] = await create_executions(
        pool, redis, by, [body], origin=Origin("rerun", rerun_of=execution_id)
    )
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
