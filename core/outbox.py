"""The outbox: every event Ferry emits is written to PostgreSQL in the transaction that caused
it, then published to the Redis event stream.

Whoever committed the change publishes its rows at once and deletes them (`publish`), so an
event costs one XADD and one DELETE on top of the change itself. A crash or a Redis outage
between the commit and the publish leaves the rows behind; the scheduler's relay
(`relay_once`) publishes rows older than `RELAY_AFTER_S`. An event is therefore delivered
at least once: it is never lost, and it is repeated only when a process died (or Redis
failed) after its XADD and before its DELETE.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

import asyncpg
from redis.asyncio import Redis
from redis.exceptions import RedisError

from core.events import EVENTS_MAXLEN, EVENTS_STREAM
from core.models import format_time
from core.outages import UNAVAILABLE, Outage

log = logging.getLogger(__name__)

# One per process: while a server is away every committer would otherwise log each event.
_publishing = Outage("publishing events (left to the outbox relay meanwhile)", log)

RELAY_AFTER_S = 5.0  # a committer publishes within milliseconds; older rows were orphaned
RELAY_BATCH = 1000

# A data-modifying CTE that writes the event of each row of `{source}`, an execution
# transition's RETURNING: `execution_event_cte("done", "'execution.' || status")`.
_EXECUTION_EVENT_CTE = """evented AS (
    INSERT INTO outbox (type, project_id, resource, resource_id, data)
    SELECT {type_sql}, project_id, 'execution', id, jsonb_build_object(
        'service', service_id, 'function', function, 'status', status, 'reason', reason,
        'attempt', attempt, 'trigger', trigger_id,
        'pipeline_execution', pipeline_execution_id, 'node', pipeline_node)
    FROM {source} WHERE {where}
    RETURNING id, type, project_id, resource, resource_id, data, at)"""


def execution_event_cte(source: str, type_sql: str, where: str = "true") -> str:
    return _EXECUTION_EVENT_CTE.format(source=source, type_sql=type_sql, where=where)


@dataclass(frozen=True)
class OutboxEvent:
    id: int
    type: str
    project: str
    resource: str
    resource_id: str
    data: dict[str, Any]
    at: str

    @classmethod
    def from_row(cls, row: Any) -> OutboxEvent:
        """From an outbox row, or its `row_to_json` (timestamps then arrive as text)."""
        at = row["at"]
        return cls(
            id=row["id"],
            type=row["type"],
            project=row["project_id"],
            resource=row["resource"],
            resource_id=row["resource_id"],
            data=row["data"] or {},
            at=at if isinstance(at, str) else format_time(at),
        )

    def fields(self) -> dict[str, str]:
        return {
            "type": self.type,
            "at": self.at,
            "project": self.project,
            "resource": self.resource,
            "resource_id": self.resource_id,
            "data": json.dumps(self.data, default=str),
        }


def execution_data(row: Any) -> dict[str, Any]:
    """The part of an execution row its events carry (no input/output: they may be large)."""
    return {
        "service": row["service_id"],
        "function": row["function"],
        "status": row["status"],
        "reason": row["reason"],
        "attempt": row["attempt"],
        "trigger": row["trigger_id"],
        "pipeline_execution": row["pipeline_execution_id"],
        "node": row["pipeline_node"],
    }


async def add(
    conn: asyncpg.Connection | asyncpg.Pool,
    type_: str,
    project: str,
    resource: str,
    resource_id: str,
    data: dict[str, Any] | None = None,
) -> OutboxEvent:
    """Write one event; call it inside the transaction that made the change it reports."""
    row = await conn.fetchrow(
        """INSERT INTO outbox (type, project_id, resource, resource_id, data)
           VALUES ($1, $2, $3, $4, $5) RETURNING *""",
        type_,
        project,
        resource,
        resource_id,
        data or {},
    )
    return OutboxEvent.from_row(row)


async def add_many(
    conn: asyncpg.Connection,
    type_: str,
    resource: str,
    items: list[tuple[str, str, dict[str, Any]]],
) -> list[OutboxEvent]:
    """Write one event per (project, resource id, data), in one statement."""
    if not items:
        return []
    rows = await conn.fetch(
        """INSERT INTO outbox (type, project_id, resource, resource_id, data)
           SELECT $1, project, $2, resource_id, data::jsonb
           FROM unnest($3::text[], $4::text[], $5::text[]) WITH ORDINALITY
                AS t(project, resource_id, data, n)
           ORDER BY n
           RETURNING *""",
        type_,
        resource,
        [project for project, _, _ in items],
        [resource_id for _, resource_id, _ in items],
        [json.dumps(data, default=str) for _, _, data in items],
    )
    return sorted((OutboxEvent.from_row(r) for r in rows), key=lambda e: e.id)


async def publish(
    conn: asyncpg.Connection | asyncpg.Pool, redis: Redis | None, events: list[OutboxEvent]
) -> None:
    """After the commit: append the events to the stream, then delete their rows.

    A failure leaves the rows to the relay: the caller's change is committed and stands.
    """
    if await append(redis, events):
        await forget(conn, events)


async def _xadd(redis: Redis, events: list[OutboxEvent]) -> None:
    """The events onto the stream, in order, in one round trip."""
    async with redis.pipeline(transaction=False) as pipe:
        for event in events:
            pipe.xadd(
                EVENTS_STREAM,
                event.fields(),  # type: ignore[arg-type]
                maxlen=EVENTS_MAXLEN,
                approximate=True,
            )
        await pipe.execute()


async def append(redis: Redis | None, events: list[OutboxEvent]) -> bool:
    """The first half of `publish`: the events onto the stream, in one round trip. True
    when they are there (their rows are then for `forget`); False leaves them to the relay."""
    if not events or redis is None or _publishing.holding_off():
        return False  # nothing to do, or Redis failed a moment ago: the relay publishes them
    try:
        await _xadd(redis, events)
    except UNAVAILABLE as exc:
        _publishing.lost(exc)  # said once per outage, not once per event
        return False
    except RedisError as exc:
        log.warning("%d event(s) left to the outbox relay: %s", len(events), exc)
        return False
    _publishing.ok()
    return True


async def forget(conn: asyncpg.Connection | asyncpg.Pool, events: list[OutboxEvent]) -> None:
    """The second half of `publish`: the rows of events on the stream go. Should it fail,
    the relay publishes them again (events are delivered at least once)."""
    try:
        await conn.execute(
            "DELETE FROM outbox WHERE id = ANY($1::bigint[])", [e.id for e in events]
        )
    except (*UNAVAILABLE, asyncpg.PostgresError) as exc:
        log.warning("%d published event(s) left to the outbox relay: %s", len(events), exc)


class Publisher:
    """`publish` for a process that commits many transitions: several commits' events per
    round trip under load, none waiting when idle.

    `submit` returns at once (after the commit, nothing waits for the publish). One publish
    is in flight at a time; events submitted meanwhile go out together in the next one, in
    the order they came, so an idle process publishes each commit's events alone and at
    once. What fails is left to the relay, as with `publish`."""

    def __init__(self, pool: asyncpg.Pool, redis: Redis) -> None:
        self.pool = pool
        self.redis = redis
        self._pending: list[OutboxEvent] = []
        self._task: asyncio.Task[None] | None = None

    def submit(self, events: list[OutboxEvent]) -> None:
        if not events:
            return
        self._pending.extend(events)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain(), name="outbox publisher")

    async def _drain(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            await publish(self.pool, self.redis, batch)

    async def flush(self) -> None:
        """Wait until everything submitted so far was published (or left to the relay)."""
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)


async def relay_once(pool: asyncpg.Pool, redis: Redis, *, after_s: float = RELAY_AFTER_S) -> int:
    """Publish events whose committer did not (it crashed, or Redis was down); returns how many.

    The rows are deleted in the transaction that read them, committed only after the XADD
    succeeded; `SKIP LOCKED` lets several schedulers relay side by side without repeats.
    """
    async with pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(
            """DELETE FROM outbox WHERE id IN (
                   SELECT id FROM outbox WHERE at < clock_timestamp() - make_interval(secs => $1)
                   ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED)
               RETURNING *""",
            after_s,
            RELAY_BATCH,
        )
        if not rows:
            return 0
        events = sorted((OutboxEvent.from_row(r) for r in rows), key=lambda e: e.id)
        await _xadd(redis, events)  # raises: the transaction rolls back and the rows stay
    return len(events)
