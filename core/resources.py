"""Open what every Ferry process needs: a migrated PostgreSQL pool and Redis."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import asyncpg
from arq.connections import ArqRedis

from core import db, queue
from core.outages import UNAVAILABLE, Outage
from core.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Resources:
    dsn: str
    pool: asyncpg.Pool
    redis: ArqRedis


def require_urls(settings: Settings) -> tuple[str, str]:
    if not settings.database_url or not settings.redis_url:
        raise SystemExit(
            "FERRY_DATABASE_URL and FERRY_REDIS_URL must be set for this command; "
            "`ferry up` starts embedded servers when they are not"
        )
    return settings.database_url, settings.redis_url


@asynccontextmanager
async def open_resources(
    settings: Settings, *, pool_size: int = 10, migrate: bool = True
) -> AsyncIterator[Resources]:
    dsn, redis_url = require_urls(settings)
    outage = Outage("starting", log)
    while True:
        # A server that is restarting (or not up yet) is waited for, not a reason to exit:
        # under `ferry up` a process that kept exiting would stop the whole of Ferry.
        try:
            if migrate:
                conn = await db.connect(dsn)
                try:
                    await db.migrate(conn)
                finally:
                    await conn.close()
            pool = await db.connect_pool(dsn, min_size=min(2, pool_size), max_size=pool_size)
            try:
                redis = await queue.connect_redis(redis_url)
            except BaseException:
                await pool.close()
                raise
            break
        except UNAVAILABLE as exc:
            await asyncio.sleep(outage.lost(exc))
    outage.ok()
    try:
        yield Resources(dsn, pool, redis)
    finally:
        await redis.aclose()
        await pool.close()


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM: every process shuts down cleanly on either."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop
