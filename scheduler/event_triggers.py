"""Event triggers: every event on `ferry:events` handled once across all schedulers.

The schedulers share the Redis consumer group `ferry-triggers` on the stream: each entry
is delivered to one of them; it matches the entry against the project's active event
triggers, creates the executions in one transaction (unique on `(trigger_id, event_id)`,
and for mode `once` on `trigger_firings (trigger_id, resource_id)`), commits, enqueues,
then XACKs. A scheduler that dies between delivery and XACK leaves the entry pending;
another claims it with XAUTOCLAIM once it has been idle `CLAIM_IDLE_MS`, and the unique
indexes make the replay insert nothing twice.

The group is created at `$` (only events after it exist for it) the first time a
scheduler starts or an event trigger is created, whichever is first: events from before
Ferry had any event trigger never fire old business. From then on the group remembers
its position, so events published while every scheduler is down are handled when one
returns (as long as the stream, capped at ~100k entries, still holds them).

Loop guard: an `execution` event never fires a trigger whose function runs on the same
service as that execution; otherwise a trigger on `execution.success` of its own service
would run forever. The trigger records the refusal in `last_error`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import asyncpg
from arq.connections import ArqRedis
from redis.exceptions import ResponseError

from core import filters
from core.errors import FerryError
from core.events import EVENTS_STREAM
from core.executions import Execution, ExecutionCreate, create_executions, enqueue_created
from core.triggers import EVENT_INPUT, EVENTS_GROUP, EventSpec, ensure_events_group

log = logging.getLogger(__name__)

GROUP = EVENTS_GROUP
READ_COUNT = 100
BLOCK_MS = 200
CLAIM_IDLE_MS = 30_000
CLAIM_EVERY_S = 10.0

_MATCHING = """
    SELECT t.*, s.status AS service_status
    FROM triggers t LEFT JOIN services s ON s.id = t.service_id
    WHERE t.active AND t.type = 'event' AND t.project_id = $1 AND t.spec ->> 'resource' = $2
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_event(event_id: str, fields: dict[Any, Any]) -> dict[str, Any]:
    event = {_text(k): _text(v) for k, v in fields.items()}
    try:
        data = json.loads(event.get("data") or "{}")
    except json.JSONDecodeError:
        data = {}
    if not isinstance(data, dict):
        data = {"value": data}
    type_ = event.get("type", "")
    resource = event.get("resource", "")
    action = type_[len(resource) + 1 :] if type_.startswith(resource + ".") else type_
    return {
        "id": event_id,
        "type": type_,
        "action": action,
        "at": event.get("at"),
        "project": event.get("project", ""),
        "resource": resource,
        "resource_id": event.get("resource_id", ""),
        "data": data,
    }


class EventTriggerLoop:
    def __init__(self, pool: asyncpg.Pool, redis: ArqRedis, scheduler_id: str) -> None:
        self.pool = pool
        self.redis = redis
        self.consumer = scheduler_id

    async def run(self, stop: asyncio.Event) -> None:
        await ensure_events_group(self.redis)
        # Our own unacknowledged entries first (a restart under the same id), then others'.
        await self.read_and_handle("0")
        next_claim = 0.0
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            try:
                if loop.time() >= next_claim:
                    await self.claim_abandoned()
                    next_claim = loop.time() + CLAIM_EVERY_S
                await self.read_and_handle(">", block_ms=BLOCK_MS)
            except ResponseError as exc:
                if "NOGROUP" in str(exc):  # the stream was deleted (Redis flushed): start over
                    await ensure_events_group(self.redis)
                    continue
                log.exception("event trigger round failed; trying again")
                await asyncio.sleep(1.0)
            except Exception:
                log.exception("event trigger round failed; trying again")
                await asyncio.sleep(1.0)

    async def read_and_handle(self, start: str, block_ms: int | None = None) -> int:
        handled = 0
        while True:
            reply = await self.redis.xreadgroup(
                GROUP, self.consumer, {EVENTS_STREAM: start}, count=READ_COUNT, block=block_ms
            )
            entries = reply[0][1] if reply else []
            handled += await self._handle_batch(entries)
            if start == ">" or not entries:
                return handled
            start = _text(entries[-1][0])  # paging through our pending list

    async def claim_abandoned(self, min_idle_ms: int = CLAIM_IDLE_MS) -> int:
        """Take over entries delivered to schedulers that died before acknowledging them."""
        claimed, cursor = 0, "0-0"
        while True:
            reply = await self.redis.xautoclaim(
                EVENTS_STREAM, GROUP, self.consumer, min_idle_ms, cursor, count=READ_COUNT
            )
            cursor, entries = _text(reply[0]), reply[1]
            await self._handle_batch(entries)
            claimed += len(entries)
            if cursor == "0-0":
                return claimed

    async def _handle_batch(self, entries: list[Any]) -> int:
        """Handle a batch read from the stream. Most events (every execution's status changes)
        match no trigger: one query finds which (project, resource) pairs have any, the rest
        are acknowledged together without a transaction each."""
        events = [(_text(entry_id), fields) for entry_id, fields in entries]
        parsed = {entry_id: parse_event(entry_id, fields) for entry_id, fields in events if fields}
        projects = list({event["project"] for event in parsed.values() if event["project"]})
        watched: set[tuple[str, str]] = set()
        if projects:
            rows = await self.pool.fetch(
                """SELECT DISTINCT project_id, spec ->> 'resource' AS resource FROM triggers
                   WHERE active AND type = 'event' AND project_id = ANY($1::text[])""",
                projects,
            )
            watched = {(r["project_id"], r["resource"]) for r in rows}
        skipped: list[str] = []
        handled = 0
        for entry_id, fields in events:
            event = parsed.get(entry_id)
            # Trimmed from the stream meanwhile (no fields), or nothing listens: just ack.
            if event is None or (event["project"], event["resource"]) not in watched:
                skipped.append(entry_id)
                continue
            await self.handle(entry_id, fields)
            handled += 1
        if skipped:
            await self.redis.xack(EVENTS_STREAM, GROUP, *skipped)
        return handled + len(skipped)

    async def handle(self, event_id: str, fields: dict[Any, Any]) -> list[Execution]:
        event = parse_event(event_id, fields)
        created: list[Execution] = []
        if event["project"] and event["resource"]:
            async with self.pool.acquire() as conn, conn.transaction():
                for row in await conn.fetch(_MATCHING, event["project"], event["resource"]):
                    created.extend(await self._fire(conn, row, event))
        if created:
            await enqueue_created(self.redis, created)
        await self.redis.xack(EVENTS_STREAM, GROUP, event_id)
        return created

    async def _fire(
        self, conn: asyncpg.Connection, row: asyncpg.Record, event: dict[str, Any]
    ) -> list[Execution]:
        spec = EventSpec.model_validate(row["spec"])
        if spec.actions and event["action"] not in spec.actions:
            return []
        if not filters.matches(spec.filter, event["data"]):
            return []
        if row["service_status"] == "paused":
            await self._note(conn, row["id"], "skipped", "service paused: event skipped")
            return []
        if event["resource"] == "execution" and event["data"].get("service") == row["service_id"]:
            log.warning(
                "trigger %s refused event %s: it would run its own service again (a loop)",
                row["id"],
                event["id"],
            )
            await self._note(
                conn, row["id"], "skipped", "loop guard: an execution of the same service"
            )
            return []
        operation = row["operation"]
        body = ExecutionCreate(
            service=operation["service"],
            function=operation["function"],
            input={**row["input"], EVENT_INPUT: event},
        )
        try:
            async with conn.transaction():  # a savepoint per trigger
                if spec.mode == "once":
                    first = await conn.fetchval(
                        """INSERT INTO trigger_firings (trigger_id, resource_id, event_id)
                           VALUES ($1, $2, $3) ON CONFLICT DO NOTHING RETURNING 1""",
                        row["id"],
                        event["resource_id"],
                        event["id"],
                    )
                    if first is None:
                        return []
                results = await create_executions(
                    self.pool,
                    None,
                    None,
                    [body],
                    trigger_id=row["id"],
                    event_id=event["id"],
                    conn=conn,
                )
                if spec.mode == "once":
                    await conn.execute(
                        """UPDATE trigger_firings SET execution_id = $3
                           WHERE trigger_id = $1 AND resource_id = $2""",
                        row["id"],
                        event["resource_id"],
                        results[0][0].id,
                    )
        except FerryError as exc:
            await self._note(conn, row["id"], "error", exc.message)
            return []
        await conn.execute(
            """UPDATE triggers SET status = 'ok', last_error = NULL, last_fired_at = now()
               WHERE id = $1""",
            row["id"],
        )
        return [execution for execution, new in results if new]

    async def _note(self, conn: asyncpg.Connection, trigger_id: str, status: str, message: str):
        await conn.execute(
            "UPDATE triggers SET status = $2, last_error = $3, updated_at = now() WHERE id = $1",
            trigger_id,
            status,
            message,
        )
