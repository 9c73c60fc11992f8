"""Event consumer benchmark: one `EventTriggerLoop` (what a scheduler runs) on events.

    python -m bench.events [--events N] [--triggers T] [--rate R] [--seconds S]

An embedded PostgreSQL and Redis, migrated, one project. The consumer
(`scheduler/event_triggers.py: EventTriggerLoop`) runs on a pool whose connections count
every statement they send (asyncpg's query logger). Three phases:

1. **Unwatched**: no event trigger; N `execution.success` events (5,000 by default) appended
   to `ferry:events` in one pipeline. Figure: how long the consumer group takes to read and
   acknowledge them all (events/s), and the statements sent meanwhile.
2. **Matching, as fast as it goes**: T event triggers (100) on resource `item`, trigger k
   with the filter `{"k": k}`, all on one service (rows written straight into the tables,
   as the API would). N `item.created` events, event i with `k = i % T`, so each matches
   exactly one trigger and creates one execution. Figure: events/s until every execution
   exists and the group is drained.
3. **Matching, at a steady rate**: R events a second (2,000) for S seconds (2), appended
   every 5 ms (the events due by then, in one pipeline). Latency per event:
   `executions.created_at` (PostgreSQL's clock) minus the time just before its XADD (this
   process's clock; same host). p50/p99/max.

No worker runs: the executions stay `created`, queued in Redis. Every server is stopped in
`finally`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
from redis.asyncio import Redis

from core import db, events
from core.embedded import EmbeddedStack
from core.triggers import EVENTS_GROUP, TRIGGERS_CHANNEL
from scheduler.event_triggers import EventTriggerLoop

MANIFEST = {
    "name": "handlers",
    "modules": [
        {
            "name": "main",
            "entry_point": "main.py",
            "functions": [{"name": "on_event", "inputs": [{"name": "event", "type": "json"}]}],
        }
    ],
}


async def _seed(conn: asyncpg.Connection, triggers: int) -> None:
    """A project, a service and `triggers` event triggers, written as the API writes them."""
    await conn.execute("INSERT INTO projects (id, name) VALUES ('p1', 'p1')")
    await conn.execute(
        "INSERT INTO codebases (sha256, size, format, data) VALUES ('c', 1, 'zip', 'c')"
    )
    await conn.execute(
        "INSERT INTO packages (id, project_id, name, latest_revision) VALUES ('k1', 'p1', 'h', 1)"
    )
    await conn.execute(
        """INSERT INTO package_revisions (package_id, revision, manifest, codebase_sha256)
           VALUES ('k1', 1, $1, 'c')""",
        MANIFEST,
    )
    await conn.execute(
        """INSERT INTO services (id, project_id, name, package_id, package_revision, module,
               runtime, execution_timeout_s, max_attempts, on_reset)
           VALUES ('s1', 'p1', 'h', 'k1', 1, 'main', '{}', 60, 3, 'rerun')"""
    )
    await conn.execute(
        """INSERT INTO triggers (id, project_id, name, type, active, input, operation,
               service_id, spec)
           SELECT 't' || k, 'p1', 'on-item-' || k, 'event', false, '{}',
               '{"type": "function", "service": "s1", "function": "on_event"}', 's1',
               jsonb_build_object('resource', 'item', 'actions', '[]'::jsonb,
                   'filter', jsonb_build_object('k', k), 'mode', 'always')
           FROM generate_series(0, $1 - 1) AS k""",
        triggers,
    )


def _item(i: int, triggers: int) -> dict[str, str]:
    return {
        "type": "item.created", "project": "p1", "resource": "item", "resource_id": f"i{i}",
        "data": json.dumps({"k": i % triggers, "n": i}), "at": "2026-01-01T00:00:00Z",
    }  # fmt: skip


async def _drained(redis: Redis, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        groups = await redis.xinfo_groups(events.EVENTS_STREAM)
        group = next(g for g in groups if g["name"] in (EVENTS_GROUP, EVENTS_GROUP.encode()))
        stream = await redis.xinfo_stream(events.EVENTS_STREAM)
        if group["pending"] == 0 and group["last-delivered-id"] == stream["last-generated-id"]:
            return
        await asyncio.sleep(0.01)
    raise RuntimeError("the consumer did not drain the stream in time")


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)


async def measure(
    dsn: str, redis_url: str, count: int, triggers: int, rate: float, seconds: float
) -> dict[str, Any]:
    conn = await db.connect(dsn)
    try:
        await db.migrate(conn)
        await _seed(conn, triggers)
    finally:
        await conn.close()
    statements: list[str] = []

    async def init(conn: asyncpg.Connection) -> None:
        await db._init_connection(conn)
        conn.add_query_logger(lambda logged: statements.append(logged.query))

    pool = await asyncpg.create_pool(
        dsn, min_size=1, max_size=4, init=init, reset=db._reset_cheaply
    )
    redis = Redis.from_url(redis_url)
    consumer = EventTriggerLoop(pool, redis, "bench")  # type: ignore[arg-type]
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    try:
        await asyncio.sleep(1.0)  # the group exists and the consumer listens
        before = len(statements)
        started = time.perf_counter()
        async with redis.pipeline(transaction=False) as pipe:
            for i in range(count):
                pipe.xadd(
                    events.EVENTS_STREAM,
                    {"type": "execution.success", "project": "p1", "resource": "execution",
                     "resource_id": f"e{i}", "data": "{}", "at": "2026-01-01T00:00:00Z"},
                )  # fmt: skip
            await pipe.execute()
        await _drained(redis)
        elapsed = time.perf_counter() - started
        unwatched = {
            "events": count,
            "events_per_s": round(count / elapsed),
            "statements": len(statements) - before,
        }

        # 2. Matching, as fast as it goes.
        await pool.execute("UPDATE triggers SET active = true")
        await pool.execute(f"NOTIFY {TRIGGERS_CHANNEL}")  # as the trigger store does
        await asyncio.sleep(0.5)
        before = len(statements)
        started = time.perf_counter()
        async with redis.pipeline(transaction=False) as pipe:
            for i in range(count):
                pipe.xadd(events.EVENTS_STREAM, _item(i, triggers))
            await pipe.execute()
        await _drained(redis)
        elapsed = time.perf_counter() - started
        made = await pool.fetchval("SELECT count(*) FROM executions")
        matching = {
            "events": count,
            "executions": made,
            "events_per_s": round(count / elapsed),
            "statements_per_event": round((len(statements) - before) / count, 2),
        }

        # 3. Matching, at a steady rate.
        await pool.execute("TRUNCATE executions CASCADE")
        total = int(rate * seconds)
        sent_at: dict[str, float] = {}
        begin = time.time()
        sent = 0
        while sent < total:  # every 5 ms, the events due by then, in one pipeline
            due = min(total, int((time.time() - begin) * rate) + 1)
            async with redis.pipeline(transaction=False) as pipe:
                for i in range(sent, due):
                    pipe.xadd(events.EVENTS_STREAM, _item(i, triggers))
                now = time.time()
                await pipe.execute()
            sent_at.update((f"i{i}", now) for i in range(sent, due))
            sent = due
            await asyncio.sleep(0.005)
        send_s = time.time() - begin
        await _drained(redis)
        rows = await pool.fetch(
            """SELECT input -> 'event' ->> 'resource_id' AS rid,
                      extract(epoch FROM created_at) AS at FROM executions"""
        )
        latency = [(float(r["at"]) - sent_at[r["rid"]]) * 1000 for r in rows]
        steady = {
            "events": total,
            "executions": len(rows),
            "offered_per_s": round(total / send_s),
            "latency_ms": {
                "p50": _pct(latency, 0.5),
                "p99": _pct(latency, 0.99),
                "max": round(max(latency), 1) if latency else None,
            },
        }
        return {
            "triggers": triggers,
            "unwatched": unwatched,
            "matching": matching,
            "steady": steady,
        }
    finally:
        stop.set()
        await task
        await pool.close()
        await redis.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.events", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--triggers", type=int, default=100)
    parser.add_argument("--rate", type=float, default=2000.0)
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="ferry-bench-events-"))
    stack = EmbeddedStack(tmp)
    try:
        dsn, redis_url = stack.start(None, None)
        result = asyncio.run(
            measure(dsn, redis_url, args.events, args.triggers, args.rate, args.seconds)
        )
    finally:
        stack.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    unwatched, matching, steady = result["unwatched"], result["matching"], result["steady"]
    print(
        f"{unwatched['events']} events no trigger listens to: {unwatched['events_per_s']}/s, "
        f"{unwatched['statements']} statements to PostgreSQL"
    )
    print(
        f"{matching['events']} events each matching one of {result['triggers']} triggers: "
        f"{matching['events_per_s']}/s, {matching['executions']} executions, "
        f"{matching['statements_per_event']} statements per event (target >= 2,000/s)"
    )
    latency = steady["latency_ms"]
    print(
        f"{steady['events']} matching events at {steady['offered_per_s']}/s: event -> execution "
        f"p50 {latency['p50']} ms, p99 {latency['p99']} ms, max {latency['max']} ms "
        f"({steady['executions']} executions; target p99 <= 50 ms)"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
