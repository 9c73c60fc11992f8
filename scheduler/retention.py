"""Retention: log lines and events older than `settings.retention_days` are removed.

Log lines go in batches of `BATCH` rows, each its own short transaction, so a large backlog
never holds long locks; events are trimmed from the Redis stream with `XTRIM MINID`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import asyncpg
from redis.asyncio import Redis

from core.events import EVENTS_STREAM
from core.outages import UNAVAILABLE, Outage

log = logging.getLogger(__name__)

BATCH = 5_000
INTERVAL_S = 300.0


@dataclass
class RetentionReport:
    log_lines: int = 0
    events: int = 0


async def run_retention(
    pool: asyncpg.Pool, redis: Redis, retention_days: float, *, batch: int = BATCH
) -> RetentionReport:
    report = RetentionReport()
    while True:
        deleted = await pool.fetchval(
            """WITH gone AS (
                   DELETE FROM execution_logs WHERE ctid IN (
                       SELECT ctid FROM execution_logs
                       WHERE at < clock_timestamp() - make_interval(secs => $1) LIMIT $2)
                   RETURNING 1)
               SELECT count(*) FROM gone""",
            retention_days * 86400,
            batch,
        )
        report.log_lines += deleted
        if deleted < batch:
            break
    min_id = int((time.time() - retention_days * 86400) * 1000)
    report.events = await redis.xtrim(EVENTS_STREAM, minid=f"{max(min_id, 0)}-0", approximate=False)
    if report.log_lines or report.events:
        log.info(
            "retention: %d log lines and %d events older than %s days removed",
            report.log_lines,
            report.events,
            retention_days,
        )
    return report


async def retention_loop(
    pool: asyncpg.Pool, redis: Redis, retention_days: float, stop: asyncio.Event
) -> None:
    """Run retention every `INTERVAL_S` until `stop` is set."""
    outage = Outage("retention", log)
    while not stop.is_set():
        try:
            await run_retention(pool, redis, retention_days)
            outage.ok()
        except UNAVAILABLE as exc:
            outage.lost(exc)  # the next round, INTERVAL_S from now, tries again
        except Exception:
            log.exception("retention round failed; trying again later")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), INTERVAL_S)
