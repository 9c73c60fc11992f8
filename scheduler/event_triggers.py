"""Event triggers: every event on `ferry:events` handled once across all schedulers.

The schedulers share the Redis consumer group `ferry-triggers` on the stream: each entry
is delivered to one of them. A scheduler reads up to `READ_COUNT` entries at a time, matches
them against their projects' active event triggers, creates the executions and pipeline
executions of the whole batch in one transaction (unique on
`(trigger_id, event_id)`, and for mode `once` on `trigger_firings (trigger_id,
resource_id)`), commits, enqueues, then XACKs the batch. A scheduler that dies between delivery and
XACK leaves the entry pending; another claims it with XAUTOCLAIM once it has been idle
`CLAIM_IDLE_MS`, and the unique indexes make the replay insert nothing twice.

The group is created at `$` (only events after it exist for it) the first time a
scheduler starts or an event trigger is created, whichever is first: events from before
Ferry had any event trigger never fire old business. From then on the group remembers
its position, so events published while every scheduler is down are handled when one
returns (as long as the stream, capped at ~100k entries, still holds them).

Loop guard: an `execution` event never fires a trigger whose function runs on the same
service as that execution; otherwise a trigger on `execution.success` of its own service
would run forever. Likewise a pipeline's trigger ignores the `pipeline_execution` events of
that pipeline and the `execution` events of its nodes. The trigger records the refusal in
`last_error`.

Most events (every execution's status changes) match no trigger. Each scheduler keeps the
(project, resource) pairs some active event trigger listens to in memory and acknowledges
the other events without touching PostgreSQL. The trigger store sends a NOTIFY on
`TRIGGERS_CHANNEL` in the transaction of every change to an event trigger; a scheduler
LISTENs on a connection of its own and reloads the pairs before its next batch, and every
`WATCHED_REFRESH_S` in any case (a trigger removed with its project or service sends
none; a stale pair only costs a lookup). Without its LISTEN connection (lost, or a loop
driven without `run`) it reloads them for every batch. A NOTIFY reaches the scheduler when
the change commits, before the API answers, so an event sent after that answer finds the
pair, unless the scheduler's event loop was blocked for the whole time between the two.

The pipelines that matching triggers start are locked (`FOR KEY SHARE`, in id order) before
any trigger row is written: an uninstall or a delete locks the pipeline first and its
triggers after, so taking them in the other order could deadlock with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

import asyncpg
from arq.connections import ArqRedis
from redis.exceptions import ResponseError

from core import filters, pipeline_runs
from core.errors import FerryError
from core.events import EVENTS_STREAM
from core.executions import Execution, ExecutionCreate, Origin, create_executions, deliver_created
from core.outages import UNAVAILABLE, Outage
from core.outbox import OutboxEvent
from core.outcomes import Recorded
from core.trigger_operations import EVENT_INPUT
from core.triggers import EVENTS_GROUP, TRIGGERS_CHANNEL, EventSpec, ensure_events_group

log = logging.getLogger(__name__)

GROUP = EVENTS_GROUP
READ_COUNT = 100
BLOCK_MS = 200
CLAIM_IDLE_MS = 30_000
CLAIM_EVERY_S = 10.0
WATCHED_REFRESH_S = 30.0

# The active event triggers of a batch's (project, resource) pairs, in a stable order.
_MATCHING = """
    SELECT t.*, s.status AS service_status
    FROM triggers t LEFT JOIN services s ON s.id = t.service_id
    JOIN unnest($1::text[], $2::text[]) AS p (project_id, resource)
      ON t.project_id = p.project_id AND t.spec ->> 'resource' = p.resource
    WHERE t.active AND t.type = 'event'
    ORDER BY t.id
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _watched_key(fields: dict[Any, Any]) -> tuple[str, str]:
    """(project, resource) of a raw stream entry, without decoding the rest of it."""
    project = fields.get(b"project", fields.get("project", b""))
    resource = fields.get(b"resource", fields.get("resource", b""))
    return _text(project), _text(resource)


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
    def __init__(
        self,
        pool: asyncpg.Pool,
        redis: ArqRedis,
        scheduler_id: str,
        *,
        claim_idle_ms: int = CLAIM_IDLE_MS,
        claim_every_s: float = CLAIM_EVERY_S,
    ) -> None:
        self.pool = pool
        self.redis = redis
        self.consumer = scheduler_id
        # Another scheduler's entry is taken over once idle `claim_idle_ms`, checked every
        # `claim_every_s`.
        self.claim_idle_ms = claim_idle_ms
        self.claim_every_s = claim_every_s

        # (project, resource) pairs some active event trigger listens to; reloaded when
        # `_stale` (a NOTIFY came) or at `_refresh_at`.
        self._watched: set[tuple[str, str]] = set()
        self._stale = True
        self._refresh_at = 0.0
        self._listener: asyncpg.Connection | None = None

    async def run(self, stop: asyncio.Event) -> None:
        try:
            await self._run(stop)
        finally:
            await self._unlisten()

    async def _listen(self) -> None:
        """Hold a pooled connection LISTENing for trigger changes (again, if it was lost)."""
        if self._listener is not None and not self._listener.is_closed():
            return
        await self._unlisten()
        conn = await self.pool.acquire()
        try:
            await conn.add_listener(TRIGGERS_CHANNEL, self._on_change)
        except BaseException:
            await self.pool.release(conn)
            raise
        self._listener = conn
        self._stale = True  # changes before the LISTEN were not heard

    async def _unlisten(self) -> None:
        conn, self._listener = self._listener, None
        if conn is None:
            return
        try:
            if not conn.is_closed():
                await conn.remove_listener(TRIGGERS_CHANNEL, self._on_change)
        finally:
            await self.pool.release(conn)

    def _on_change(self, *_: Any) -> None:
        self._stale = True

    async def watched(self) -> set[tuple[str, str]]:
        """The (project, resource) pairs active event triggers listen to."""
        now = asyncio.get_running_loop().time()
        listening = self._listener is not None and not self._listener.is_closed()
        if self._stale or not listening or now >= self._refresh_at:
            self._stale = False  # a NOTIFY during the reload marks it stale again
            rows = await self.pool.fetch(
                """SELECT DISTINCT project_id, spec ->> 'resource' AS resource FROM triggers
                   WHERE active AND type = 'event'"""
            )
            self._watched = {(r["project_id"], r["resource"]) for r in rows}
            self._refresh_at = now + WATCHED_REFRESH_S
        return self._watched

    async def _run(self, stop: asyncio.Event) -> None:
        outage = Outage("event triggers", log)
        started = False
        next_claim = 0.0
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            try:
                if not started:
                    await ensure_events_group(self.redis)
                    await self._listen()
                    # Our own unacknowledged entries first (a restart under the same id).
                    await self.read_and_handle("0")
                    started = True
                await self._listen()
                if loop.time() >= next_claim:
                    await self.claim_abandoned()
                    next_claim = loop.time() + self.claim_every_s
                await self.read_and_handle(">", block_ms=BLOCK_MS)
                outage.ok()
            except ResponseError as exc:
                if "NOGROUP" in str(exc):  # the stream was deleted (Redis flushed): start over
                    started = False
                    continue
                log.exception("event trigger round failed; trying again")
                await asyncio.sleep(1.0)
            except UNAVAILABLE as exc:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), outage.lost(exc))
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

    async def claim_abandoned(self, min_idle_ms: int | None = None) -> int:
        """Take over entries delivered to schedulers that died before acknowledging them
        (idle at least `min_idle_ms`, by default the loop's `claim_idle_ms`)."""
        if min_idle_ms is None:
            min_idle_ms = self.claim_idle_ms
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
        """Handle a batch read from the stream, and acknowledge it with one XACK.

        Events no trigger listens to (`watched`, in memory) cost no PostgreSQL round trip;
        the others are handled together in one transaction (`handle_events`).
        """
        if not entries:
            return 0
        ids = [_text(entry_id) for entry_id, _ in entries]
        watched = await self.watched()
        listened: list[dict[str, Any]] = []
        for entry_id, (_, fields) in zip(ids, entries, strict=True):
            # Trimmed from the stream meanwhile (no fields), or nothing listens: only the
            # two fields that say so are decoded, not the event's data.
            if not fields or _watched_key(fields) not in watched:
                continue
            event = parse_event(entry_id, fields)
            if event["project"] and (event["project"], event["resource"]) in watched:
                listened.append(event)
        if listened:
            await self.handle_events(listened)
        await self.redis.xack(EVENTS_STREAM, GROUP, *ids)
        return len(ids)

    async def handle(self, event_id: str, fields: dict[Any, Any]) -> list[Execution]:
        """Handle one event and acknowledge it; returns the executions it created."""
        event = parse_event(event_id, fields)
        created = await self.handle_events([event]) if event["project"] else []
        await self.redis.xack(EVENTS_STREAM, GROUP, event_id)
        return created

    async def handle_events(self, batch: list[dict[str, Any]]) -> list[Execution]:
        """Fire the triggers the events match, in one transaction; returns the executions of
        functions created (pipeline executions are in `pipeline_executions`, by trigger and
        event id). The caller acknowledges the events after this returns.

        The triggers of every (project, resource) of the batch are read with one query, and
        the function triggers of mode `each` (the usual case) fire with one
        `create_executions` for the whole batch; mode `once` and pipeline triggers fire one by
        one, each in a savepoint of its own.
        """
        created: list[Execution] = []
        events: list[OutboxEvent] = []
        started = Recorded(None)
        pairs = sorted({(e["project"], e["resource"]) for e in batch})
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                rows = await conn.fetch(
                    _MATCHING, [p for p, _ in pairs], [resource for _, resource in pairs]
                )
                indexes: dict[tuple[str, str], _TriggerIndex] = {}
                for row in rows:
                    key = (row["project_id"], row["spec"].get("resource"))
                    indexes.setdefault(key, _TriggerIndex()).add(row)
                pipelines = await _lock_pipelines(conn, rows)
                together: list[tuple[asyncpg.Record, dict[str, Any], ExecutionCreate]] = []
                for event in batch:
                    index = indexes.get((event["project"], event["resource"]))
                    for row, spec in index.candidates(event) if index else ():
                        if not _matches(spec, event):
                            continue
                        if row["pipeline_id"] is not None:
                            if row["pipeline_id"] in pipelines:  # else deleted meanwhile
                                pipeline = pipelines[row["pipeline_id"]]
                                await self._fire_pipeline(conn, row, spec, pipeline, event, started)
                            continue
                        body = await self._execution_for(conn, row, event)
                        if body is None:
                            continue
                        if spec.mode == "once":
                            created.extend(await self._fire(conn, row, spec, event, body, events))
                        else:
                            together.append((row, event, body))
                created.extend(await self._fire_together(conn, together, events))
            await deliver_created(conn, self.redis, created, events)
            await started.deliver(conn, self.redis)
        return created

    async def _execution_for(
        self, conn: asyncpg.Connection, row: asyncpg.Record, event: dict[str, Any]
    ) -> ExecutionCreate | None:
        """What a function trigger whose spec matches the event runs; None when it may not."""
        if row["service_status"] == "paused":
            await self._note(conn, row["id"], "skipped", "service paused: event skipped")
            return None
        if event["resource"] == "execution" and event["data"].get("service") == row["service_id"]:
            log.warning(
                "trigger %s refused event %s: it would run its own service again (a loop)",
                row["id"],
                event["id"],
            )
            await self._note(
                conn, row["id"], "skipped", "loop guard: an execution of the same service"
            )
            return None
        operation = row["operation"]
        return ExecutionCreate(
            service=operation["service"],
            function=operation["function"],
            input={**row["input"], EVENT_INPUT: event},
        )

    async def _fire_together(
        self,
        conn: asyncpg.Connection,
        together: list[tuple[asyncpg.Record, dict[str, Any], ExecutionCreate]],
        events: list[OutboxEvent],
    ) -> list[Execution]:
        """Create the executions of many (trigger, event) pairs at once. A body the service
        refuses (its function gone, an input no longer valid) refuses them all: then each
        fires on its own, and only the trigger at fault is marked."""
        if not together:
            return []
        written: list[OutboxEvent] = []
        try:
            async with conn.transaction():  # a savepoint: a refusal leaves nothing behind
                results = await create_executions(
                    self.pool,
                    None,
                    None,
                    [body for _, _, body in together],
                    origin=[
                        Origin("trigger", trigger_id=row["id"], event_id=event["id"])
                        for row, event, _ in together
                    ],
                    conn=conn,
                    events=written,
                )
        except FerryError:
            created: list[Execution] = []
            for row, event, body in together:
                spec = EventSpec.model_validate(row["spec"])
                created.extend(await self._fire(conn, row, spec, event, body, events))
            return created
        events.extend(written)
        await conn.execute(
            """UPDATE triggers SET status = 'ok', last_error = NULL, last_fired_at = now()
               WHERE id = ANY($1::text[])""",
            sorted({row["id"] for row, _, _ in together}),
        )
        return [execution for execution, new in results if new]

    async def _fire(
        self,
        conn: asyncpg.Connection,
        row: asyncpg.Record,
        spec: EventSpec,
        event: dict[str, Any],
        body: ExecutionCreate,
        events: list[OutboxEvent],
    ) -> list[Execution]:
        try:
            async with conn.transaction():  # a savepoint per trigger
                if spec.mode == "once" and not await _first_firing(conn, row, event):
                    return []
                results = await create_executions(
                    self.pool,
                    None,
                    None,
                    [body],
                    origin=Origin("trigger", trigger_id=row["id"], event_id=event["id"]),
                    conn=conn,
                    events=events,
                )
                if spec.mode == "once":
                    await _record_firing(conn, row, event, results[0][0].id)
        except FerryError as exc:
            await self._note(conn, row["id"], "error", exc.message)
            return []
        await _fired(conn, row["id"])
        return [execution for execution, new in results if new]

    async def _fire_pipeline(
        self,
        conn: asyncpg.Connection,
        row: asyncpg.Record,
        spec: EventSpec,
        pipeline: asyncpg.Record,
        event: dict[str, Any],
        started: Recorded,
    ) -> None:
        """Start the pipeline of a trigger whose spec matches the event."""
        if not pipeline["installed"]:
            await self._note(conn, row["id"], "skipped", "pipeline not installed: event skipped")
            return
        if await _from_own_pipeline(conn, row["pipeline_id"], event):
            log.warning(
                "trigger %s refused event %s: it would run its own pipeline again (a loop)",
                row["id"],
                event["id"],
            )
            await self._note(
                conn, row["id"], "skipped", "loop guard: an event of the same pipeline"
            )
            return
        body = pipeline_runs.PipelineExecute(input={**row["input"], EVENT_INPUT: event})
        try:
            # A savepoint per trigger: a start node refusing the input leaves nothing behind.
            async with conn.transaction():
                if spec.mode == "once" and not await _first_firing(conn, row, event):
                    return
                run, created, recorded = await pipeline_runs.create_in(
                    conn, pipeline, body, trigger_id=row["id"], event_id=event["id"]
                )
                if spec.mode == "once":
                    await _record_firing(conn, row, event, run["id"])
        except FerryError as exc:
            await self._note(conn, row["id"], "error", f"pipeline not started: {exc.describe()}")
            return
        if created:
            started.merge(recorded)
        await _fired(conn, row["id"])

    async def _note(
        self, conn: asyncpg.Connection, trigger_id: str, status: str, message: str
    ) -> None:
        await conn.execute(
            "UPDATE triggers SET status = $2, last_error = $3, updated_at = now() WHERE id = $1",
            trigger_id,
            status,
            message,
        )


class _TriggerIndex:
    """The event triggers of one (project, resource), indexed by what their filters require.

    Checking every trigger's filter against every event costs (events times triggers)
    filter evaluations. A trigger whose filter requires a path to equal a literal
    (`{"k": 7}` or `{"k": {"$eq": 7}}`) is filed under that path and value, so an event only
    meets the triggers whose required value it carries, plus those with no such condition.
    The index only narrows: every candidate's whole filter is still checked (`_matches`).
    """

    def __init__(self) -> None:
        self._order: dict[str, int] = {}
        self._unindexed: list[tuple[asyncpg.Record, EventSpec]] = []
        self._by_value: dict[str, dict[tuple[str, Any], list[tuple[asyncpg.Record, EventSpec]]]]
        self._by_value = {}

    def add(self, row: asyncpg.Record) -> None:
        spec = EventSpec.model_validate(row["spec"])
        self._order[row["id"]] = len(self._order)
        for path, value in spec.filter.items():
            if isinstance(value, dict) and set(value) == {"$eq"}:
                value = value["$eq"]
            if path.startswith("$") or (key := _value_key(value)) is None:
                continue
            self._by_value.setdefault(path, {}).setdefault(key, []).append((row, spec))
            return
        self._unindexed.append((row, spec))

    def candidates(self, event: dict[str, Any]) -> list[tuple[asyncpg.Record, EventSpec]]:
        """The triggers that may match `event`, in trigger id order."""
        found = list(self._unindexed)
        for path, table in self._by_value.items():
            key = _value_key(filters.resolve(event["data"], path))
            if key is not None and (hits := table.get(key)):
                found.extend(hits)
        found.sort(key=lambda pair: self._order[pair[0]["id"]])
        return found


def _value_key(value: Any) -> tuple[str, Any] | None:
    """A dict key under which equal JSON scalars meet (1 and 1.0 do, true and 1 do not)."""
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int | float):
        return ("number", value)
    if isinstance(value, str):
        return ("string", value)
    if value is None:
        return ("null", None)
    return None  # objects, lists, an absent path: never filed, never looked up


def _matches(spec: EventSpec, event: dict[str, Any]) -> bool:
    if spec.actions and event["action"] not in spec.actions:
        return False
    return filters.matches(spec.filter, event["data"])


async def _lock_pipelines(
    conn: asyncpg.Connection, rows: list[asyncpg.Record]
) -> dict[str, asyncpg.Record]:
    """The pipelines the matching triggers start, locked against an uninstall or delete
    until this event's firings commit (see the module's docstring)."""
    ids = sorted({row["pipeline_id"] for row in rows if row["pipeline_id"] is not None})
    if not ids:
        return {}
    locked = await conn.fetch(
        "SELECT * FROM pipelines WHERE id = ANY($1::text[]) ORDER BY id FOR KEY SHARE", ids
    )
    return {pipeline["id"]: pipeline for pipeline in locked}


async def _from_own_pipeline(
    conn: asyncpg.Connection, pipeline_id: str, event: dict[str, Any]
) -> bool:
    """The loop guard of a pipeline's trigger: an event of one of its own pipeline
    executions, or of one of their node executions."""
    data = event["data"]
    if event["resource"] == "pipeline_execution":
        return data.get("pipeline") == pipeline_id
    if event["resource"] == "execution" and isinstance(data.get("pipeline_execution"), str):
        owner = await conn.fetchval(
            "SELECT pipeline_id FROM pipeline_executions WHERE id = $1", data["pipeline_execution"]
        )
        return owner == pipeline_id
    return False


async def _first_firing(
    conn: asyncpg.Connection, row: asyncpg.Record, event: dict[str, Any]
) -> bool:
    """Mode `once`: claim the trigger's one firing for the event's resource id."""
    first = await conn.fetchval(
        """INSERT INTO trigger_firings (trigger_id, resource_id, event_id)
           VALUES ($1, $2, $3) ON CONFLICT DO NOTHING RETURNING 1""",
        row["id"],
        event["resource_id"],
        event["id"],
    )
    return first is not None


async def _record_firing(
    conn: asyncpg.Connection, row: asyncpg.Record, event: dict[str, Any], started_id: str
) -> None:
    # `execution_id`: the execution, or for a pipeline's trigger the pipeline execution.
    await conn.execute(
        """UPDATE trigger_firings SET execution_id = $3
           WHERE trigger_id = $1 AND resource_id = $2""",
        row["id"],
        event["resource_id"],
        started_id,
    )


async def _fired(conn: asyncpg.Connection, trigger_id: str) -> None:
    await conn.execute(
        """UPDATE triggers SET status = 'ok', last_error = NULL, last_fired_at = now()
           WHERE id = $1""",
        trigger_id,
    )
