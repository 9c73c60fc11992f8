"""Pipeline executions as the API sees them: execute, read, list, wait, terminate, resume,
logs and statistics. How a run moves on is `core.pipeline_engine`'s business."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import asyncpg
from arq.connections import ArqRedis
from pydantic import Field, model_validator

from core import pipeline_engine
from core.auth import Principal, Role, fetch_visible
from core.errors import Conflict, Invalid, InvalidTransition
from core.ids import new_id
from core.manifest import type_problems
from core.models import Model, Request, Timestamp
from core.outcomes import Recorded
from core.pagination import Keyset, Order, page_of
from core.pipeline_graph import Graph, MergeNode, NodeState
from core.states import ExecutionStatus

LIVE = ("created", "in-progress")


class PipelineExecute(Request):
    body_kind = "input"
    input: dict[str, Any] = Field(default_factory=dict)
    variables: dict[str, Any] = Field(default_factory=dict)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=200)


class PipelineResume(Request):
    from_: Literal["failed"] | None = Field(default=None, alias="from")
    nodes: list[str] | None = Field(default=None, min_length=1, max_length=200)

    @model_validator(mode="after")
    def _one_of(self) -> PipelineResume:
        if (self.from_ is None) == (self.nodes is None):
            raise ValueError('give either "from": "failed" or "nodes": [...]')
        return self


class PipelineExecutionError(Model):
    node: str
    message: str
    failed_nodes: list[str] = []


class PipelineExecution(Model):
    id: str
    project: str
    pipeline: str
    version: int
    status: ExecutionStatus
    input: dict[str, Any]
    variables: dict[str, Any]
    output: dict[str, Any] | None
    error: PipelineExecutionError | None
    nodes: list[NodeState]
    trigger: str | None
    idempotency_key: str | None
    round: int
    created_at: Timestamp
    started_at: Timestamp | None
    ended_at: Timestamp | None


class PipelineLogLine(Model):
    node: str
    execution: str
    seq: int
    at: Timestamp
    stream: str
    text: str


class DurationStats(Model):
    p50: float | None
    p99: float | None


class NodeStatistics(Model):
    node: str
    executions: dict[str, int]
    duration_ms: DurationStats


class PipelineStatistics(Model):
    pipeline: str
    since: Timestamp | None
    executions: dict[str, int]
    nodes: list[NodeStatistics]


def _counts() -> dict[str, int]:
    return {status.value: 0 for status in ExecutionStatus}


async def to_model(
    conn: asyncpg.Connection | asyncpg.Pool, row: asyncpg.Record
) -> PipelineExecution:
    graph = await pipeline_engine.load_version(conn, row["pipeline_id"], row["version"])
    states = {
        r["node"]: r
        for r in await conn.fetch(
            "SELECT * FROM pipeline_nodes WHERE pipeline_execution_id = $1", row["id"]
        )
    }
    live: dict[tuple[str, str], int] = {}
    if row["status"] in LIVE:
        for r in await conn.fetch(
            """SELECT pipeline_node, status, count(*) AS n FROM executions
               WHERE pipeline_execution_id = $1 AND status IN ('created', 'in-progress')
               GROUP BY 1, 2""",
            row["id"],
        ):
            live[(r["pipeline_node"], r["status"])] = r["n"]
    nodes = []
    for node in graph.nodes:
        state = states.get(node.id)
        counts = _counts()
        if state is not None:
            counts.update(
                {
                    "created": live.get((node.id, "created"), 0),
                    "in-progress": live.get((node.id, "in-progress"), 0),
                    "success": state["succeeded"],
                    "failed": state["failed"],
                    "terminated": state["terminated"],
                }
            )
        nodes.append(
            NodeState(
                node=node.id,
                type=node.type,
                status=state["status"] if state else "pending",
                executions=counts,
                error=state["error"] if state else None,
            )
        )
    return PipelineExecution(
        id=row["id"],
        project=row["project_id"],
        pipeline=row["pipeline_id"],
        version=row["version"],
        status=row["status"],
        input=row["input"],
        variables=row["variables"],
        output=row["output"],
        error=row["error"],
        nodes=nodes,
        trigger=row["trigger_id"],
        idempotency_key=row["idempotency_key"],
        round=row["round"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        ended_at=row["ended_at"],
    )


def resolve_variables(graph: Graph, given: dict[str, Any]) -> dict[str, Any]:
    """The run's variables: the declared defaults, overridden by `given` (type-checked)."""
    declared = {v.name: v for v in graph.variables}
    details = []
    for name, value in given.items():
        variable = declared.get(name)
        if variable is None:
            known = ", ".join(sorted(declared)) or "none"
            details.append(
                {"field": f"variables.{name}", "message": f"not declared (declared: {known})"}
            )
            continue
        problems = type_problems(variable.type, value)
        if problems:
            details.append(
                {
                    "field": f"variables.{name}",
                    "message": f"expected {variable.type}: {problems[0][1]}",
                }
            )
    if details:
        raise Invalid(details[0]["field"] + ": " + details[0]["message"], details)
    return {**{v.name: v.default for v in graph.variables if v.default is not None}, **given}


async def create_in(
    conn: asyncpg.Connection,
    pipeline: asyncpg.Record,
    body: PipelineExecute,
    *,
    trigger_id: str | None = None,
    fire_time: datetime | None = None,
    event_id: str | None = None,
) -> tuple[asyncpg.Record, bool, Recorded]:
    """Insert a pipeline execution and start it, in the caller's transaction.

    Returns (row, created, what to deliver after the commit); `created` is False when an
    idempotency key or a trigger's tick matched an earlier pipeline execution."""
    graph = await pipeline_engine.load_version(conn, pipeline["id"], pipeline["version"])
    variables = resolve_variables(graph, body.variables)
    row = await conn.fetchrow(
        """INSERT INTO pipeline_executions (id, project_id, pipeline_id, version, status, input,
               variables, idempotency_key, trigger_id, trigger_fire_time, event_id, started_at)
           VALUES ($1, $2, $3, $4, 'in-progress', $5, $6, $7, $8, $9, $10, clock_timestamp())
           ON CONFLICT DO NOTHING RETURNING *""",
        new_id(),
        pipeline["project_id"],
        pipeline["id"],
        pipeline["version"],
        body.input,
        variables,
        body.idempotency_key,
        trigger_id,
        fire_time,
        event_id,
    )
    if row is None:
        existing = await conn.fetchrow(
            """SELECT * FROM pipeline_executions
               WHERE (project_id = $1 AND idempotency_key = $2)
                  OR (trigger_id = $3 AND (trigger_fire_time = $4 OR event_id = $5))""",
            pipeline["project_id"],
            body.idempotency_key,
            trigger_id,
            fire_time,
            event_id,
        )
        if existing is None:
            raise Invalid.field(
                "idempotency_key", "conflicts with a pipeline execution being created"
            )
        return existing, False, Recorded(existing)
    recorded = Recorded(row)
    recorded.events.append(
        await pipeline_engine.pipeline_event(conn, {**dict(row), "status": "created"})  # type: ignore[arg-type]
    )
    recorded.events.append(await pipeline_engine.pipeline_event(conn, row))
    recorded.merge(await pipeline_engine.start(conn, row["id"]))
    return row, True, recorded


async def fetch_pipeline_execution(
    conn: asyncpg.Connection | asyncpg.Pool, by: Principal, pipeline_execution_id: str
) -> asyncpg.Record:
    return await fetch_visible(
        conn, by, "pipeline_executions", pipeline_execution_id, "pipeline execution"
    )


async def execute(
    pool: asyncpg.Pool,
    redis: ArqRedis | None,
    by: Principal,
    pipeline_id: str,
    body: PipelineExecute,
) -> tuple[PipelineExecution, bool]:
    async with pool.acquire() as conn:
        async with conn.transaction():
            pipeline = await fetch_visible(conn, by, "pipelines", pipeline_id, "pipeline")
            by.require(Role.developer, pipeline["project_id"])
            # Shared: a delete (FOR UPDATE) waits for this run to be recorded, and then sees it.
            pipeline = await conn.fetchrow(
                "SELECT * FROM pipelines WHERE id = $1 FOR SHARE", pipeline_id
            )
            if not pipeline["installed"]:
                raise Conflict(
                    f"pipeline {pipeline['name']} is not installed: install it first "
                    f"(POST /api/v1/pipelines/{pipeline_id}/install or `ferry pipelines install`)"
                )
            row, created, recorded = await create_in(conn, pipeline, body)
        await recorded.deliver(conn, redis)
        current = await conn.fetchrow("SELECT * FROM pipeline_executions WHERE id = $1", row["id"])
        return await to_model(conn, current), created


async def get(pool: asyncpg.Pool, by: Principal, pipeline_execution_id: str) -> PipelineExecution:
    async with pool.acquire() as conn:
        return await to_model(conn, await fetch_pipeline_execution(conn, by, pipeline_execution_id))


async def list_pipeline_executions(
    pool: asyncpg.Pool,
    by: Principal,
    *,
    project: str | None,
    pipeline: str | None,
    status: str | None,
    cursor: str | None,
    limit: int,
    order: Order,
) -> dict:
    query = Keyset()
    project = by.project_filter(project)
    if project is not None:
        query.where("project_id = {}", project)
    if pipeline is not None:
        query.where("pipeline_id = {}", pipeline)
    if status is not None:
        statuses = status.split(",")
        unknown = [s for s in statuses if s not in ExecutionStatus._value2member_map_]
        if unknown:
            allowed = ", ".join(s.value for s in ExecutionStatus)
            raise Invalid.field("status", f"unknown status {unknown[0]!r}; one of {allowed}")
        query.where("status = ANY({}::text[])", statuses)
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            f"SELECT * FROM pipeline_executions {query.tail(cursor, order, limit)}", *query.args
        )
        page = page_of(rows, limit, lambda r: r)
        page["items"] = [await to_model(conn, r) for r in page["items"]]
        return page


async def terminate(
    pool: asyncpg.Pool, redis: ArqRedis | None, by: Principal, pipeline_execution_id: str
) -> PipelineExecution:
    async with pool.acquire() as conn:
        async with conn.transaction():
            row = await fetch_pipeline_execution(conn, by, pipeline_execution_id)
            by.require(Role.developer, row["project_id"])
            recorded = await pipeline_engine.terminate(conn, pipeline_execution_id)
            if recorded is None:
                raise InvalidTransition(
                    f"the pipeline execution is {row['status']} already: nothing to terminate"
                )
        await recorded.deliver(conn, redis)
        return await to_model(conn, await fetch_pipeline_execution(conn, by, pipeline_execution_id))


async def resume(
    pool: asyncpg.Pool,
    redis: ArqRedis | None,
    by: Principal,
    pipeline_execution_id: str,
    body: PipelineResume,
) -> PipelineExecution:
    async with pool.acquire() as conn:
        async with conn.transaction():
            row = await fetch_pipeline_execution(conn, by, pipeline_execution_id)
            by.require(Role.developer, row["project_id"])
            row = await conn.fetchrow(
                "SELECT * FROM pipeline_executions WHERE id = $1 FOR UPDATE", row["id"]
            )
            if row["status"] in LIVE:
                raise InvalidTransition(
                    "the pipeline execution is still running: resume it once it has ended "
                    "(or terminate it first)"
                )
            graph = await pipeline_engine.load_version(conn, row["pipeline_id"], row["version"])
            known = {n.id for n in graph.nodes}
            if body.nodes is not None:
                unknown = [n for n in body.nodes if n not in known]
                if unknown:
                    raise Invalid.field(
                        "nodes",
                        f"no node {unknown[0]!r} in version {row['version']} of the pipeline",
                    )
            elif row["status"] == "success":
                raise InvalidTransition(
                    'nothing failed: resume {"nodes": [...]} to run nodes again'
                )
            recorded = await pipeline_engine.resume(conn, row["id"], body.nodes)
        await recorded.deliver(conn, redis)
        return await to_model(conn, await fetch_pipeline_execution(conn, by, pipeline_execution_id))


async def list_logs(
    pool: asyncpg.Pool, by: Principal, pipeline_execution_id: str, *, cursor: str | None, limit: int
) -> dict:
    """Every line of every execution of the run, in the order they were written.

    The cursor is `<microseconds since epoch>.<execution id>.<seq>` of the last line."""
    await fetch_pipeline_execution(pool, by, pipeline_execution_id)
    after_at, after_execution, after_seq = _decode_log_cursor(cursor)
    rows = await pool.fetch(
        """SELECT l.execution_id, l.seq, l.at, l.stream, l.text, e.pipeline_node,
                  (extract(epoch FROM l.at) * 1000000)::bigint AS at_us
           FROM execution_logs l JOIN executions e ON e.id = l.execution_id
           WHERE e.pipeline_execution_id = $1
             AND ((extract(epoch FROM l.at) * 1000000)::bigint, l.execution_id, l.seq) > ($2, $3, $4)
           ORDER BY 7, l.execution_id, l.seq LIMIT $5""",
        pipeline_execution_id,
        after_at,
        after_execution,
        after_seq,
        limit,
    )
    items = [
        PipelineLogLine(
            node=r["pipeline_node"],
            execution=r["execution_id"],
            seq=r["seq"],
            at=r["at"],
            stream=r["stream"],
            text=r["text"],
        )
        for r in rows
    ]
    next_cursor = (
        f"{rows[-1]['at_us']}.{rows[-1]['execution_id']}.{rows[-1]['seq']}" if rows else cursor
    )
    return {"items": items, "next_cursor": next_cursor}


def _decode_log_cursor(cursor: str | None) -> tuple[int, str, int]:
    if not cursor:
        return -1, "", 0
    try:
        at_us, execution_id, seq = cursor.split(".")
        return int(at_us), execution_id, int(seq)
    except ValueError:
        raise Invalid.field("cursor", "not a cursor this server issued") from None


async def statistics(pool: asyncpg.Pool, by: Principal, pipeline_id: str) -> PipelineStatistics:
    pipeline = await fetch_visible(pool, by, "pipelines", pipeline_id, "pipeline")
    since = pipeline["statistics_reset_at"]
    totals = _counts()
    for r in await pool.fetch(
        """SELECT status, count(*) AS n FROM pipeline_executions
           WHERE pipeline_id = $1 AND ($2::timestamptz IS NULL OR created_at >= $2)
           GROUP BY status""",
        pipeline_id,
        since,
    ):
        totals[r["status"]] = r["n"]
    rows = await pool.fetch(
        """SELECT e.pipeline_node AS node, e.status, count(*) AS n,
                  percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM e.finished_at - e.started_at) * 1000) AS p50,
                  percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM e.finished_at - e.started_at) * 1000) AS p99
           FROM executions e JOIN pipeline_executions p ON p.id = e.pipeline_execution_id
           WHERE p.pipeline_id = $1 AND ($2::timestamptz IS NULL OR p.created_at >= $2)
           GROUP BY GROUPING SETS ((e.pipeline_node, e.status), (e.pipeline_node))""",
        pipeline_id,
        since,
    )
    per_node: dict[str, dict[str, Any]] = {}
    for r in rows:
        entry = per_node.setdefault(r["node"], {"counts": _counts(), "p50": None, "p99": None})
        if r["status"] is None:  # the node's row of the grouping sets: every status
            entry["p50"], entry["p99"] = r["p50"], r["p99"]
        else:
            entry["counts"][r["status"]] = r["n"]
    graph = await pipeline_engine.load_version(pool, pipeline_id, pipeline["version"])
    names = [n.id for n in graph.nodes if not isinstance(n, MergeNode)]
    names += sorted(set(per_node) - set(names))
    return PipelineStatistics(
        pipeline=pipeline_id,
        since=since,
        executions=totals,
        nodes=[
            NodeStatistics(
                node=name,
                executions=per_node.get(name, {}).get("counts", _counts()),
                duration_ms=DurationStats(
                    p50=per_node.get(name, {}).get("p50"), p99=per_node.get(name, {}).get("p99")
                ),
            )
            for name in names
        ],
    )


async def reset_statistics(pool: asyncpg.Pool, by: Principal, pipeline_id: str) -> None:
    pipeline = await fetch_visible(pool, by, "pipelines", pipeline_id, "pipeline")
    by.require(Role.developer, pipeline["project_id"])
    await pool.execute(
        "UPDATE pipelines SET statistics_reset_at = clock_timestamp() WHERE id = $1", pipeline_id
    )
