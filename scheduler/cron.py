"""Cron triggers: fire each tick exactly once, whatever the number of schedulers.

Every scheduler runs `CronLoop`. A round claims due triggers with
`FOR UPDATE SKIP LOCKED` (another scheduler skips the ones this one holds), creates their
executions in the same transaction (unique on `(trigger_id, trigger_fire_time)`, so even a
replayed tick inserts nothing), moves `next_fire_at` past now, commits, then enqueues.
Between rounds it sleeps until the earliest `next_fire_at`, at most `MAX_SLEEP_S`.

Misfires: a tick is *missed* when it is more than `MISFIRE_GRACE_S` late (no scheduler
ran at the time). `skip` drops missed ticks, `run-once` fires the most recent missed tick
once, `run-all` fires each missed tick (the most recent `misfire_run_all_cap`). Ticks
within the grace always fire.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime, timedelta

import asyncpg
from arq.connections import ArqRedis

from core.errors import FerryError
from core.executions import Execution, ExecutionCreate, create_executions, enqueue_created
from core.triggers import CronSpec, next_fire_time, ticks_between

log = logging.getLogger(__name__)

MAX_SLEEP_S = 0.2
MISFIRE_GRACE_S = 1.0
CLAIM_BATCH = 5

_CLAIM = """
    SELECT t.*, s.status AS service_status, clock_timestamp() AS now
    FROM triggers t LEFT JOIN services s ON s.id = t.service_id
    WHERE t.active AND t.type = 'cron' AND t.next_fire_at <= clock_timestamp()
    ORDER BY t.next_fire_at
    LIMIT $1
    FOR UPDATE OF t SKIP LOCKED
"""


def ticks_to_fire(
    spec: CronSpec, first: datetime, now: datetime, run_all_cap: int
) -> list[datetime]:
    """The due ticks (from `first`, the stored next_fire_at, up to now) that fire, oldest
    first, under the spec's misfire policy."""
    due = ticks_between(spec, first, now, max(run_all_cap, 1) + 1)
    grace = timedelta(seconds=MISFIRE_GRACE_S)
    on_time = [tick for tick in due if now - tick <= grace]
    missed = [tick for tick in due if now - tick > grace]
    if spec.misfire == "skip":
        missed = []
    elif spec.misfire == "run-once":
        missed = missed[:1]
    else:
        missed = missed[:run_all_cap]
    return sorted(on_time + missed)


class CronLoop:
    def __init__(
        self, pool: asyncpg.Pool, redis: ArqRedis | None, scheduler_id: str, run_all_cap: int
    ) -> None:
        self.pool = pool
        self.redis = redis
        self.scheduler_id = scheduler_id
        self.run_all_cap = run_all_cap

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            claimed = 0
            try:
                claimed = await self.run_once()
                delay = 0.0 if claimed >= CLAIM_BATCH else await self._until_next()
            except Exception:
                log.exception("cron round failed; trying again")
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

    async def run_once(self) -> int:
        """One round: fire what is due; returns how many triggers it claimed."""
        created: list[Execution] = []
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(_CLAIM, CLAIM_BATCH)
            for row in rows:
                created.extend(await self._fire(conn, row))
        if created and self.redis is not None:
            await enqueue_created(self.redis, created)
        return len(rows)

    async def _fire(self, conn: asyncpg.Connection, row: asyncpg.Record) -> list[Execution]:
        spec = CronSpec.model_validate(row["spec"])
        now = row["now"]
        ticks = ticks_to_fire(spec, row["next_fire_at"], now, self.run_all_cap)
        following = next_fire_time(spec, now)
        status, message, created = "ok", None, []
        if row["service_status"] == "paused":
            status, message, ticks = "skipped", "service paused: tick skipped", []
            log.info("trigger %s: service paused, tick skipped", row["id"])
        operation = row["operation"]
        body = ExecutionCreate(
            service=operation["service"], function=operation["function"], input=row["input"]
        )
        try:
            # No savepoint needed: a domain error is raised while checking, before any insert.
            for tick in ticks:
                results = await create_executions(
                    self.pool, None, None, [body], trigger_id=row["id"], fire_time=tick, conn=conn
                )
                created.extend(execution for execution, new in results if new)
        except FerryError as exc:  # the service's new revision dropped the function, say
            status, message, created = "error", exc.message, []
            log.warning("trigger %s could not fire: %s", row["id"], exc.message)
        if following is None and status == "ok":
            status = "finished"
        await conn.execute(
            """UPDATE triggers SET next_fire_at = $2, status = $3, last_error = $4,
                   last_fired_at = coalesce($5, last_fired_at), updated_at = now()
               WHERE id = $1""",
            row["id"],
            following,
            status,
            message,
            max(ticks) if ticks and created else None,
        )
        return created
