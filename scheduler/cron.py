"""Cron triggers: fire each tick exactly once, whatever the number of schedulers.

Every scheduler runs `CronLoop`. A round claims due triggers with
`FOR UPDATE SKIP LOCKED` (another scheduler skips the ones this one holds), creates their
executions, or pipeline executions, in the same transaction (unique on
`(trigger_id, trigger_fire_time)`, so even a replayed tick inserts nothing), moves
`next_fire_at` past now, commits, then enqueues. Between rounds it sleeps until the
earliest `next_fire_at`, at most `MAX_SLEEP_S`.

A pipeline trigger also takes its pipeline row `FOR KEY SHARE SKIP LOCKED`: an install,
uninstall, change or delete of the pipeline holds it `FOR UPDATE` and then waits for the
pipeline's triggers, so waiting for it here while holding the trigger would deadlock.
A pipeline busy that way leaves its trigger due for the next round.

A round is set-based: it claims up to `CLAIM_BATCH` due triggers, creates every (trigger,
tick) of its function triggers with one `create_executions` call (each service fetched once
per round), and moves every claimed trigger on with one `UPDATE … FROM unnest(…)`. Parsed
specs are kept per trigger while its spec is unchanged, and the cron iterators per
expression (core/triggers.py).

Late is not missed: a tick that became due while this scheduler was running rounds fires,
however late a busy round claims it. A tick is *missed* only when it was due before the
scheduler's first round (`MISFIRE_GRACE_S` before it, so a start never drops a tick that is
just due), that is while no scheduler ran; a failed round (the database gone, say) starts
the count again. Missed ticks follow the misfire policy: `skip` drops them, `run-once`
fires the most recent once, `run-all` fires each (the most recent `misfire_run_all_cap`).
A scheduler counts from its own first round: where several run and one restarts, a tick
another one left late for longer than the restart is missed to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import asyncpg
from arq.connections import ArqRedis

from core import pipeline_runs
from core.errors import FerryError, Invalid
from core.executions import Execution, ExecutionCreate, Origin, create_executions, deliver_created
from core.outages import UNAVAILABLE, Outage
from core.outbox import OutboxEvent
from core.outcomes import Recorded
from core.triggers import CronSpec, next_fire_time, ticks_between

log = logging.getLogger(__name__)

MAX_SLEEP_S = 0.2
HELD_PAUSE_S = 0.02
MISFIRE_GRACE_S = 1.0
CLAIM_BATCH = 500
ROUNDS_IN_PARALLEL = 3
LATE_CAP = 3600  # most late ticks of one trigger one round fires (an hour of a 1 s trigger)

_CLAIM = """
    SELECT t.*, s.status AS service_status, clock_timestamp() AS now
    FROM triggers t LEFT JOIN services s ON s.id = t.service_id
    WHERE t.active AND t.type = 'cron' AND t.next_fire_at <= clock_timestamp()
    ORDER BY t.next_fire_at
    LIMIT $1
    FOR UPDATE OF t SKIP LOCKED
"""
# Every claimed trigger moved on in one statement.
_MOVE_ON = """
    UPDATE triggers t SET next_fire_at = m.next_fire_at, status = m.status,
           last_error = m.last_error, last_fired_at = coalesce(m.fired, t.last_fired_at),
           updated_at = now()
    FROM unnest($1::text[], $2::timestamptz[], $3::text[], $4::text[], $5::timestamptz[])
         AS m(id, next_fire_at, status, last_error, fired)
    WHERE t.id = m.id
"""
_BODY_INDEX = re.compile(r"^executions\[(\d+)\]\.")


def ticks_to_fire(
    spec: CronSpec,
    first: datetime,
    now: datetime,
    run_all_cap: int,
    missed_before: datetime | None = None,
) -> list[datetime]:
    """The due ticks (from `first`, the stored next_fire_at, up to now) that fire, oldest
    first. Ticks from `missed_before` on (default: `MISFIRE_GRACE_S` before now) are late
    at most and all fire; earlier ones were missed and follow the spec's misfire policy."""
    return due_ticks(spec, first, now, run_all_cap, missed_before)[0]


def due_ticks(
    spec: CronSpec,
    first: datetime,
    now: datetime,
    run_all_cap: int,
    missed_before: datetime | None = None,
) -> tuple[list[datetime], datetime | bool | None]:
    """`ticks_to_fire`, and the tick after now when the walk found it (else False).

    When nothing was missed (the usual round) the ticks are walked forward from `first`
    (the first tick at or after it: a stored `next_fire_at` is a tick, unless edited by
    hand), so the step past now is the trigger's next tick: one step per tick, and one."""
    if missed_before is None:
        missed_before = now - timedelta(seconds=MISFIRE_GRACE_S)
    if first >= missed_before:
        ticks: list[datetime] = []
        tick = next_fire_time(spec, first - timedelta(microseconds=1))
        while tick is not None and tick <= now and len(ticks) < LATE_CAP:
            ticks.append(tick)
            tick = next_fire_time(spec, tick)
        if tick is not None and tick <= now:  # capped: the rest are dropped
            return ticks, False
        return ticks, tick
    late = ticks_between(spec, max(first, missed_before), now, LATE_CAP)
    limit = {"skip": 0, "run-once": 1}.get(spec.misfire, run_all_cap)
    missed: list[datetime] = []
    if first < missed_before and limit > 0:
        missed = ticks_between(spec, first, missed_before - timedelta(microseconds=1), limit)
    return sorted(late + missed), False


@dataclass
class _Move:
    """How a round leaves one claimed trigger."""

    id: str
    next_fire_at: datetime | None
    status: str
    message: str | None
    fired: datetime | None


def _move(
    row: asyncpg.Record,
    spec: CronSpec,
    status: str,
    message: str | None,
    fired: list[datetime],
    following: datetime | bool | None = False,
) -> _Move:
    """`following`: the next tick after now if known, else False."""
    if following is False:
        following = next_fire_time(spec, row["now"])
    assert following is None or isinstance(following, datetime)
    if following is None and status == "ok":
        status = "finished"
    return _Move(row["id"], following, status, message, max(fired) if fired else None)


@dataclass
class _Plan:
    row: asyncpg.Record
    spec: CronSpec
    ticks: list[datetime]
    following: datetime | bool | None = False
    error: str | None = None
    fired: list[datetime] = field(default_factory=list)


class CronLoop:
    def __init__(
        self, pool: asyncpg.Pool, redis: ArqRedis | None, scheduler_id: str, run_all_cap: int
    ) -> None:
        self.pool = pool
        self.redis = redis
        self.scheduler_id = scheduler_id
        self.run_all_cap = run_all_cap
        # The database's clock at this scheduler's first round since it started (or since
        # a round failed): ticks due before it were missed, later ones are only late.
        self.running_since: datetime | None = None
        self._specs: dict[str, tuple[Any, CronSpec]] = {}  # trigger id -> (stored, parsed)
        self.last_round: dict[str, float] = {}  # the last round that claimed any: its phases

    async def run(self, stop: asyncio.Event) -> None:
        """Rounds until `stop`; while a round claims a full batch (a crowded second), up to
        `ROUNDS_IN_PARALLEL` run side by side on pooled connections, each claiming its own
        triggers (SKIP LOCKED), so one round's database time overlaps another's work."""
        crowded = asyncio.Event()
        helpers = [
            asyncio.create_task(self._help(stop, crowded)) for _ in range(ROUNDS_IN_PARALLEL - 1)
        ]
        try:
            await self._lead(stop, crowded)
        finally:
            crowded.set()  # wakes the helpers to see `stop`
            await asyncio.gather(*helpers)

    async def _help(self, stop: asyncio.Event, crowded: asyncio.Event) -> None:
        while True:
            await crowded.wait()
            if stop.is_set():
                return
            try:
                if await self.run_once() < CLAIM_BATCH:
                    crowded.clear()
            except Exception:
                log.exception("cron round failed")
                crowded.clear()

    async def _lead(self, stop: asyncio.Event, crowded: asyncio.Event) -> None:
        outage = Outage("cron triggers", log)
        while not stop.is_set():
            claimed = 0
            try:
                claimed = await self.run_once()
                if claimed >= CLAIM_BATCH:
                    crowded.set()
                else:
                    crowded.clear()
                delay = 0.0 if claimed >= CLAIM_BATCH else await self._until_next()
                if claimed == 0 and delay == 0.0:  # due, but another scheduler holds them
                    delay = HELD_PAUSE_S
                outage.ok()
            except UNAVAILABLE as exc:  # PostgreSQL: Redis being down never fails a firing
                self.running_since = None  # ticks due while it is away count as missed
                delay = outage.lost(exc)
            except Exception:
                log.exception("cron round failed; trying again")
                self.running_since = None  # ticks due while rounds fail count as missed
                delay = 1.0
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)

    async def _until_next(self) -> float:
        seconds = await self.pool.fetchval(
            """SELECT extract(epoch FROM min(next_fire_at) - clock_timestamp())::float8
               FROM triggers WHERE active AND type = 'cron' AND next_fire_at IS NOT NULL"""
        )
        if seconds is None:
            return MAX_SLEEP_S
        return min(MAX_SLEEP_S, max(0.0, seconds))

    def _spec(self, row: asyncpg.Record) -> CronSpec:
        """The trigger's parsed spec, parsed again only when its stored spec changed."""
        cached = self._specs.get(row["id"])
        if cached is not None and cached[0] == row["spec"]:
            return cached[1]
        spec = CronSpec.model_validate(row["spec"])
        if len(self._specs) >= 100_000:  # triggers long deleted: start afresh
            self._specs.clear()
        self._specs[row["id"]] = (row["spec"], spec)
        return spec

    def _ticks(
        self, row: asyncpg.Record, spec: CronSpec
    ) -> tuple[list[datetime], datetime | bool | None]:
        assert self.running_since is not None
        missed_before = min(row["now"], self.running_since) - timedelta(seconds=MISFIRE_GRACE_S)
        return due_ticks(spec, row["next_fire_at"], row["now"], self.run_all_cap, missed_before)

    async def run_once(self) -> int:
        """One round: fire what is due; returns how many triggers it claimed."""
        if self.running_since is None:
            self.running_since = await self.pool.fetchval("SELECT clock_timestamp()")
        created: list[Execution] = []
        events: list[OutboxEvent] = []
        pipelines = Recorded(None)  # what the pipeline executions started leave to deliver
        clock = time.perf_counter
        started = clock()
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                rows = await conn.fetch(_CLAIM, CLAIM_BATCH)
                claimed = clock()
                moves: list[_Move] = []
                functions = []
                for row in rows:
                    if row["pipeline_id"] is None:
                        functions.append(row)
                    else:
                        move = await self._fire_pipeline(conn, row, pipelines)
                        if move is not None:
                            moves.append(move)
                created = await self._fire_functions(conn, functions, events, moves)
                fired = clock()
                if moves:
                    await conn.execute(
                        _MOVE_ON,
                        [m.id for m in moves],
                        [m.next_fire_at for m in moves],
                        [m.status for m in moves],
                        [m.message for m in moves],
                        [m.fired for m in moves],
                    )
            committed = clock()
            if self.redis is not None:
                await deliver_created(conn, self.redis, created, events)
                await pipelines.deliver(conn, self.redis)
        if rows:
            self.last_round = {
                "claimed": len(rows),
                "created": len(created),
                "claim_ms": (claimed - started) * 1000,
                "fire_ms": (fired - claimed) * 1000,
                "move_and_commit_ms": (committed - fired) * 1000,
                "deliver_ms": (clock() - committed) * 1000,
            }
            log.debug("cron round: %s", self.last_round)
        return len(rows)

    async def _fire_functions(
        self,
        conn: asyncpg.Connection,
        rows: list[asyncpg.Record],
        events: list[OutboxEvent],
        moves: list[_Move],
    ) -> list[Execution]:
        """Every tick of every function trigger of the round, in one `create_executions`."""
        plans: list[_Plan] = []
        for row in rows:
            spec = self._spec(row)
            if row["service_status"] == "paused":
                log.info("trigger %s: service paused, tick skipped", row["id"])
                moves.append(_move(row, spec, "skipped", "service paused: tick skipped", []))
            else:
                plans.append(_Plan(row, spec, *self._ticks(row, spec)))
        created: list[Execution] = []
        pending = [plan for plan in plans if plan.ticks]
        while pending:
            bodies: list[ExecutionCreate] = []
            origins: list[Origin] = []
            owners: list[_Plan] = []
            for plan in pending:
                operation = plan.row["operation"]
                body = ExecutionCreate(
                    service=operation["service"],
                    function=operation["function"],
                    input=plan.row["input"],
                )
                for tick in plan.ticks:
                    bodies.append(body)
                    origins.append(Origin("trigger", trigger_id=plan.row["id"], fire_time=tick))
                    owners.append(plan)
            try:
                # All checks come before any insert: a refusal leaves the transaction clean.
                results = await create_executions(
                    self.pool, None, None, bodies, batch=True, origin=origins, conn=conn,
                    events=events,
                )  # fmt: skip
            except Invalid as exc:  # a service's new revision dropped the function, say
                failing = self._blame(exc, owners)
                if not failing:
                    raise
                pending = [plan for plan in pending if plan.error is None]
                continue
            except FerryError as exc:  # not one body's fault: fire them one by one
                if len(pending) == 1:
                    pending[0].error = exc.message
                    log.warning("trigger %s could not fire: %s", pending[0].row["id"], exc.message)
                    break
                for plan in pending:
                    created.extend(await self._fire_functions_alone(conn, plan, events))
                break
            for plan, (execution, new), origin in zip(owners, results, origins, strict=True):
                if new:
                    created.append(execution)
                    assert origin.fire_time is not None
                    plan.fired.append(origin.fire_time)
            break
        for plan in plans:
            if plan.error is not None:
                moves.append(_move(plan.row, plan.spec, "error", plan.error, [], plan.following))
            else:
                moves.append(_move(plan.row, plan.spec, "ok", None, plan.fired, plan.following))
        return created

    @staticmethod
    def _blame(exc: Invalid, owners: list[_Plan]) -> list[_Plan]:
        """Mark the plans whose bodies the refusal names; returns them."""
        failing: list[_Plan] = []
        for detail in exc.details:
            name = str(detail.get("field", ""))
            found = _BODY_INDEX.match(name)
            if found is None or int(found.group(1)) >= len(owners):
                continue
            plan = owners[int(found.group(1))]
            if plan.error is None:
                plan.error = f"{name[found.end() :]}: {detail.get('message', exc.message)}"
                failing.append(plan)
                log.warning("trigger %s could not fire: %s", plan.row["id"], plan.error)
        return failing

    async def _fire_functions_alone(
        self, conn: asyncpg.Connection, plan: _Plan, events: list[OutboxEvent]
    ) -> list[Execution]:
        operation = plan.row["operation"]
        body = ExecutionCreate(
            service=operation["service"], function=operation["function"], input=plan.row["input"]
        )
        created: list[Execution] = []
        try:
            for tick in plan.ticks:
                results = await create_executions(
                    self.pool, None, None, [body],
                    origin=Origin("trigger", trigger_id=plan.row["id"], fire_time=tick),
                    conn=conn, events=events,
                )  # fmt: skip
                for execution, new in results:
                    if new:
                        created.append(execution)
                        plan.fired.append(tick)
        except FerryError as exc:
            plan.error, plan.fired = exc.message, []
            log.warning("trigger %s could not fire: %s", plan.row["id"], exc.message)
            return []
        return created

    async def _fire_pipeline(
        self, conn: asyncpg.Connection, row: asyncpg.Record, recorded: Recorded
    ) -> _Move | None:
        pipeline = await conn.fetchrow(
            "SELECT * FROM pipelines WHERE id = $1 FOR KEY SHARE SKIP LOCKED", row["pipeline_id"]
        )
        if pipeline is None:  # being changed (or deleted): the next round fires the tick
            return None
        spec = self._spec(row)
        ticks, following = self._ticks(row, spec)
        status, message = "ok", None
        fired: list[datetime] = []
        if not pipeline["installed"]:
            status, message, ticks = "skipped", "pipeline not installed: tick skipped", []
            log.info("trigger %s: pipeline not installed, tick skipped", row["id"])
        body = pipeline_runs.PipelineExecute(input=row["input"])
        try:
            # A savepoint: the pipeline execution is inserted before its start nodes refuse
            # an input that no longer fits (a new version of the pipeline, say).
            async with conn.transaction():
                started = Recorded(None)
                for tick in ticks:
                    _, created, run = await pipeline_runs.create_in(
                        conn, pipeline, body, trigger_id=row["id"], fire_time=tick
                    )
                    if created:
                        started.merge(run)
                        fired.append(tick)
        except FerryError as exc:
            status, message, fired = "error", f"pipeline not started: {exc.describe()}", []
            log.warning("trigger %s: %s", row["id"], message)
        else:
            recorded.merge(started)
        return _move(row, spec, status, message, fired, following)
