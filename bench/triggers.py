"""Trigger benchmark: cron fire lag and scheduler CPU with many active cron triggers, and
event -> execution latency.

    python -m bench.triggers [--quick] [--triggers N] [--every-second N] [--period P]
                             [--duration S] [--schedulers N] [--keep] [--out PATH]

(a) cron: N active cron triggers (10,000; 1,000 with --quick) inserted straight into
    PostgreSQL in one INSERT ... SELECT generate_series: `--every-second` of them (default
    1% of N) with `* * * * * *`, the rest with `k/5 * * * * *`, k = i % 5 (`--period`
    changes the 5), so every second has a known number of ticks due. One scheduler process
    (`--schedulers N`: N) runs for 30 s (10 s quick);
    no worker runs (the executions stay `created`, queued in Redis). Fire lag =
    executions.created_at - trigger_fire_time for every tick of the window; fires are counted
    against the ticks expected (missing, duplicates). The scheduler's CPU (utime + stime from
    /proc/<pid>/stat) over the window, as a fraction of one core.
(b) events: an event trigger (resource `item`, action `created`, filter `size > 1000`);
    200 events POSTed one after another (~20/s) to /api/v1/events; latency =
    executions.created_at - the time the POST was sent.

Only 127.0.0.1 and unix sockets are used; every process is stopped in `finally`; every loop
is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import os
import signal
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import asyncpg
import yaml

from bench.api import Api
from bench.stack import FerryStack
from bench.stats import summary_ms

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_P99_LAG_MS = 250.0
TARGET_CPU_CORES = 0.5
SETTLE_S = 3.0  # after the window: time for late ticks of the window to be fired
CLK_TCK = os.sysconf("SC_CLK_TCK")

MANIFEST = {
    "name": "trigbench",
    "description": "no-op functions for the trigger benchmark",
    "modules": [
        {
            "name": "main",
            "entry_point": "main.py",
            "functions": [
                {"name": "noop", "inputs": [], "outputs": []},
                {"name": "on_event", "inputs": [{"name": "event", "type": "json"}], "outputs": []},
            ],
        }
    ],
}
CODE = "def noop():\n    return None\n\n\ndef on_event(event):\n    return None\n"


def package_archive() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("ferry.yaml", yaml.safe_dump(MANIFEST))
        archive.writestr("main.py", CODE)
    return buffer.getvalue()


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (not its children), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


async def setup(api: Api) -> tuple[str, str]:
    project = await api.call("POST", "/api/v1/projects", json={"name": "trigbench"})
    package = await api.call(
        "POST",
        "/api/v1/packages",
        data={"project": project["id"]},
        files={"codebase": ("code.zip", package_archive(), "application/zip")},
    )
    service = await api.call(
        "POST",
        "/api/v1/services",
        json={
            "project": project["id"],
            "name": "noop",
            "package": package["id"],
            "runtime": {"concurrency": 1, "min_replicas": 0, "max_replicas": 1},
            "max_attempts": 1,
        },
    )
    return project["id"], service["id"]


_INSERT = """
    INSERT INTO triggers (id, project_id, name, type, active, input, operation, service_id,
                          spec, next_fire_at, status)
    SELECT 'bench' || lpad(i::text, 6, '0'), $1, 'bench-' || i, 'cron', true, '{}'::jsonb,
           $2::jsonb, $3,
           jsonb_build_object(
               'cron', CASE WHEN i < $4 THEN '* * * * * *'
                            WHEN $7::int = 60 THEN (i % 60)::text || ' * * * * *'
                            ELSE (i % $7::int)::text || '/' || $7::int || ' * * * * *' END,
               'timezone', 'UTC', 'start_at', NULL, 'end_at', NULL, 'misfire', 'run-once'),
           CASE WHEN i < $4 THEN to_timestamp($5::float8)
                ELSE to_timestamp($5::float8) + make_interval(secs => ((i % $7::int) - $5::bigint % $7::int + $7::int) % $7::int)
           END,
           'ok'
    FROM generate_series(0, $6 - 1) AS i
"""


PERIODS = (1, 2, 3, 4, 5, 6, 10, 12, 15, 20, 30, 60)  # divide a minute: a uniform beat


def expected_ticks(total: int, every_second: int, period: int, start: int, end: int) -> int:
    """Ticks due in [start, end) (whole epoch seconds)."""
    per_offset = [0] * period
    for i in range(every_second, total):
        per_offset[i % period] += 1
    return sum(every_second + per_offset[s % period] for s in range(start, end))


async def cron_case(
    stack: FerryStack,
    project: str,
    service: str,
    total: int,
    every_second: int,
    period: int,
    duration: int,
) -> dict[str, Any]:
    operation = json.dumps({"type": "function", "service": service, "function": "noop"})
    conn = await asyncpg.connect(stack.dsn)
    try:
        base = math.ceil(time.time()) + 3  # the first tick: after the insert, whole second
        t0 = time.perf_counter()
        await conn.execute(_INSERT, project, operation, service, every_second, base, total, period)
        insert_s = time.perf_counter() - t0
        await asyncio.sleep(max(0.0, base - time.time()))
        pids = stack.pids("scheduler")
        cpu0, wall0 = [cpu_seconds(pid) for pid in pids], time.monotonic()
        await asyncio.sleep(max(0.0, base + duration - time.time()))
        cpu1, wall1 = [cpu_seconds(pid) for pid in pids], time.monotonic()
        await asyncio.sleep(SETTLE_S)
        stack.check_alive()
        # Stop the ticks so the event part runs on a quiet scheduler.
        await conn.execute("UPDATE triggers SET active = false WHERE id LIKE 'bench%'")
        rows = await conn.fetch(
            """SELECT extract(epoch FROM created_at - trigger_fire_time)::float8 AS lag
               FROM executions
               WHERE trigger_id LIKE 'bench%'
                 AND trigger_fire_time >= to_timestamp($1::float8)
                 AND trigger_fire_time < to_timestamp($2::float8)""",
            base,
            base + duration,
        )
        distinct = await conn.fetchval(
            """SELECT count(DISTINCT (trigger_id, trigger_fire_time)) FROM executions
               WHERE trigger_id LIKE 'bench%'
                 AND trigger_fire_time >= to_timestamp($1::float8)
                 AND trigger_fire_time < to_timestamp($2::float8)""",
            base,
            base + duration,
        )
        all_fires = await conn.fetchval(
            "SELECT count(*) FROM executions WHERE trigger_id LIKE 'bench%'"
        )
        per_second = await conn.fetch(
            """SELECT extract(epoch FROM trigger_fire_time)::bigint AS s, count(*) AS n,
                      max(extract(epoch FROM created_at - trigger_fire_time))::float8 AS max_lag
               FROM executions WHERE trigger_id LIKE 'bench%'
                 AND trigger_fire_time >= to_timestamp($1::float8)
                 AND trigger_fire_time < to_timestamp($2::float8)
               GROUP BY 1 ORDER BY 1""",
            base,
            base + duration,
        )
    finally:
        await conn.close()
    lags = [r["lag"] for r in rows]
    expected = expected_ticks(total, every_second, period, base, base + duration)
    per_scheduler = [(b - a) / (wall1 - wall0) for a, b in zip(cpu0, cpu1, strict=True)]
    cpu_cores = sum(per_scheduler)
    return {
        "triggers": total,
        "every_second": every_second,
        "others": total - every_second,
        "others_period_s": period,
        "ticks_due_per_s": round(expected / duration, 1),
        "window_s": duration,
        "insert_s": round(insert_s, 3),
        "expected_fires": expected,
        "fires": len(lags),
        "distinct_fires": distinct,
        "duplicates": len(lags) - distinct,
        "missing": expected - distinct,
        "fires_any_time": all_fires,
        "fire_lag": summary_ms(lags),
        "schedulers": len(per_scheduler),
        "scheduler_cpu_cores": round(cpu_cores, 3),
        "cpu_cores_per_scheduler": [round(c, 3) for c in per_scheduler],
        "per_second": [
            {"s": r["s"] - base, "fires": r["n"], "max_lag_ms": round(r["max_lag"] * 1000, 1)}
            for r in per_second
        ],
    }


async def drain_events_group(stack: FerryStack, timeout_s: float = 60) -> float:
    """Waits until the scheduler's event consumer has read the events stream to its end
    (the cron part published one `execution.created` per fire); returns the wait."""
    from redis.asyncio import Redis

    redis = Redis.from_url(stack.redis_url)
    start = time.monotonic()
    try:
        while time.monotonic() - start < timeout_s:
            try:
                info = await redis.xinfo_stream("ferry:events")
                groups = await redis.xinfo_groups("ferry:events")
            except Exception:
                return 0.0
            last = info["last-generated-id"]
            if all(g["last-delivered-id"] == last and g["pending"] == 0 for g in groups):
                break
            await asyncio.sleep(0.2)
    finally:
        await redis.aclose()
    return round(time.monotonic() - start, 2)


async def event_case(
    api: Api, stack: FerryStack, project: str, service: str, count: int, rate: float
) -> dict[str, Any]:
    trigger = await api.call(
        "POST",
        "/api/v1/triggers",
        json={
            "project": project,
            "name": "bench-events",
            "type": "event",
            "operation": {"type": "function", "service": service, "function": "on_event"},
            "spec": {
                "resource": "item",
                "actions": ["created"],
                "filter": {"size": {"$gt": 1000}},
                "mode": "always",
            },
        },
    )
    drained = await drain_events_group(stack)
    sent: dict[int, float] = {}
    post_s: list[float] = []
    start = time.monotonic()
    for n in range(count):
        pause = start + n / rate - time.monotonic()
        if pause > 0:
            await asyncio.sleep(pause)
        body = {
            "project": project,
            "resource": "item",
            "action": "created",
            "resource_id": f"item-{n}",
            "data": {"size": 5000, "n": n},
        }
        sent[n] = time.time()
        t0 = time.perf_counter()
        await api.call("POST", "/api/v1/events", json=body)
        post_s.append(time.perf_counter() - t0)
    conn = await asyncpg.connect(stack.dsn)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            got = await conn.fetchval(
                "SELECT count(*) FROM executions WHERE trigger_id = $1", trigger["id"]
            )
            if got >= count:
                break
            await asyncio.sleep(0.2)
        rows = await conn.fetch(
            """SELECT (input -> 'event' -> 'data' ->> 'n')::int AS n,
                      extract(epoch FROM created_at)::float8 AS created
               FROM executions WHERE trigger_id = $1""",
            trigger["id"],
        )
    finally:
        await conn.close()
    latencies = [r["created"] - sent[r["n"]] for r in rows if r["n"] in sent]
    return {
        "events": count,
        "rate_per_s": rate,
        "events_group_drain_s": drained,
        "executions": len(rows),
        "missing": count - len({r["n"] for r in rows}),
        "latency": summary_ms(latencies),
        "post_round_trip": summary_ms(post_s),
    }


def stop_worker(stack: FerryStack) -> None:
    """The triggers need no worker: stop it so it neither runs executions nor uses a core."""
    for child in list(stack.children):
        if child.role == "worker":
            child.process.send_signal(signal.SIGTERM)
            try:
                child.process.wait(30)
            except Exception:
                child.process.kill()
                child.process.wait(10)
            stack.children.remove(child)


async def run(args: argparse.Namespace, stack: FerryStack) -> dict[str, Any]:
    api = Api(stack.url, stack.token)
    try:
        project, service = await setup(api)
        cron = await cron_case(
            stack, project, service, args.triggers, args.every_second, args.period, args.duration
        )
        print(
            f"cron: {cron['fires']}/{cron['expected_fires']} fires, lag "
            f"{json.dumps(cron['fire_lag'])}, cpu {cron['scheduler_cpu_cores']}",
            flush=True,
        )
        events = await event_case(api, stack, project, service, 200, 20.0)
        print(f"events: {json.dumps(events['latency'])}", flush=True)
    finally:
        await api.http.aclose()
    return {"cron": cron, "events": events}


def print_table(report: dict[str, Any]) -> None:
    cron, events = report["cron"], report["events"]
    lag = cron["fire_lag"]
    print(
        f"\nCron: {cron['triggers']} active triggers ({cron['every_second']} every second, "
        f"{cron['others']} every {cron['others_period_s']} s) = {cron['ticks_due_per_s']} ticks/s, "
        f"{cron['window_s']} s window, {cron['schedulers']} scheduler(s)"
    )
    print(
        f"  fires {cron['fires']} of {cron['expected_fires']} expected   missing "
        f"{cron['missing']}   duplicates {cron['duplicates']}"
    )
    print(
        f"  fire lag p50 {lag.get('p50_ms')} ms   p99 {lag.get('p99_ms')} ms   max "
        f"{lag.get('max_ms')} ms   (target p99 <= {TARGET_P99_LAG_MS:g} ms)"
    )
    print(
        f"  scheduler CPU {cron['scheduler_cpu_cores']} core "
        f"{cron['cpu_cores_per_scheduler']}   (target < "
        f"{TARGET_CPU_CORES:g} at 10,000 triggers)"
    )
    lat = events["latency"]
    print(
        f"\nEvents: {events['events']} POSTs at ~{events['rate_per_s']:g}/s -> "
        f"{events['executions']} executions (missing {events['missing']})"
    )
    print(
        f"  POST sent -> execution created p50 {lat.get('p50_ms')} ms   p99 "
        f"{lat.get('p99_ms')} ms   max {lat.get('max_ms')} ms\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.triggers", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--triggers",
        type=int,
        default=None,
        help="active cron triggers (default 10000, 1000 with --quick)",
    )
    parser.add_argument(
        "--every-second",
        type=int,
        default=None,
        help="how many of them tick every second (default 1%%)",
    )
    parser.add_argument(
        "--period",
        type=int,
        default=5,
        choices=PERIODS,
        help="the other triggers tick every PERIOD s, spread over its offsets "
        "(`k/PERIOD * * * * *`; 60: `k * * * * *`); default 5",
    )
    parser.add_argument(
        "--duration",
        type=int,
        default=None,
        help="measured window in seconds (default 30, 10 with --quick)",
    )
    parser.add_argument(
        "--schedulers", type=int, default=1, help="scheduler processes sharing the triggers"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (process logs)")
    parser.add_argument("--out", type=Path, default=RESULTS / "triggers-latest.json")
    args = parser.parse_args(argv)
    args.triggers = args.triggers or (1000 if args.quick else 10_000)
    args.every_second = args.every_second if args.every_second is not None else args.triggers // 100
    args.duration = min(600, args.duration or (10 if args.quick else 30))
    if not 0 <= args.every_second <= args.triggers:
        parser.error("--every-second must be between 0 and --triggers")
    stack = FerryStack(runtime="process", keep_dir=args.keep)
    started = time.time()
    try:
        stack.start()
        for _ in range(args.schedulers - 1):
            stack.add("scheduler")
        stop_worker(stack)
        results = asyncio.run(run(args, stack))
        stack.check_alive()
    finally:
        stack.stop()
    report = {
        "benchmark": "triggers",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": round(time.time() - started, 1),
        "quick": args.quick,
        "machine": {"cores": os.cpu_count(), "load_avg": os.getloadavg()},
        "targets": {
            "fire_lag_p99_ms": TARGET_P99_LAG_MS,
            "scheduler_cpu_cores_at_10000": TARGET_CPU_CORES,
        },
        **results,
    }
    report["met"] = {
        "fire_lag_p99": report["cron"]["fire_lag"].get("p99_ms", 1e9) <= TARGET_P99_LAG_MS,
        "scheduler_cpu": report["cron"]["scheduler_cpu_cores"] < TARGET_CPU_CORES,
        "exactly_once": report["cron"]["missing"] == 0 and report["cron"]["duplicates"] == 0,
    }
    print_table(report)
    text = json.dumps(report, indent=2)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
