"""Retention removes only log lines and events older than the retention period."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from core import events
from scheduler.retention import run_retention
from tests.engine_helpers import running_worker, wait_for_status


async def test_retention_removes_only_old(api, service, settings, pool, redis):
    async with running_worker(settings, pool, redis, runtime="process", worker_id="w"):
        status, execution = await api.post(
            "/api/v1/executions",
            {"service": service["id"], "function": "echo", "input": {"text": "hi"}},
        )
        await wait_for_status(api, execution["id"])
    recent = await pool.fetchval(
        "SELECT count(*) FROM execution_logs WHERE execution_id = $1", execution["id"]
    )
    assert recent >= 1
    old = datetime.now(UTC) - timedelta(days=30)
    await pool.executemany(
        "INSERT INTO execution_logs (execution_id, seq, at, stream, text) VALUES ($1,$2,$3,$4,$5)",
        [(execution["id"], 1000 + i, old, "stdout", f"old {i}") for i in range(12)],
    )
    old_ms = int((time.time() - 30 * 86400) * 1000)
    await redis.delete(events.EVENTS_STREAM)  # old ids go before any newer one
    for i in range(5):
        await redis.xadd(events.EVENTS_STREAM, {"type": "x.old"}, id=f"{old_ms}-{i}")
    before = await redis.xlen(events.EVENTS_STREAM)
    await events.publish(redis, "x.new", service["project"], "x", "1")

    report = await run_retention(pool, redis, 14, batch=5)  # several batches
    assert report.log_lines == 12
    assert report.events == 5
    left = await pool.fetchval(
        "SELECT count(*) FROM execution_logs WHERE execution_id = $1", execution["id"]
    )
    assert left == recent
    assert await redis.xlen(events.EVENTS_STREAM) == before - 5 + 1
    assert (await run_retention(pool, redis, 14)).log_lines == 0
