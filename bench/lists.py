"""Execution-list benchmark: `GET /executions` filters and the counters at a million rows.

    python -m bench.lists [--rows N] [--runs R] [--dsn DSN] [--keep] [--out PATH]

An embedded PostgreSQL (or `--dsn`, a database it may fill) migrated to the current schema;
N executions (1,000,000 by default) inserted with one INSERT … SELECT generate_series,
foreign keys off for the insert (`session_replication_role = replica`): 4 projects, 16
services, 4 functions a service, 100 triggers firing 10 % of them, statuses as a busy
installation has them (success 80 %, failed 15 %, terminated 3 %, created 1 %,
in-progress 1 %), created over the last 30 days. Then ANALYZE.

Every filter combination the list offers (project, service, function, trigger, status —
one or two —, a created_at range; both orders; first page and a later page by cursor) runs
through `core.executions.list_executions` as an admin, and the counters per project and per
service through `core.executions.counters`. For each: the plan of the query PostgreSQL
runs (EXPLAIN ANALYZE: the index it walks, whether it sorts) and R timed runs (p50, p99,
in ms, the query in-process: no HTTP). Plans that read past the page (a Sort, or a Seq
Scan) are flagged.

Only a unix socket or the given DSN is used; the embedded server is stopped in `finally`.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg

from bench.stats import summary_ms
from core import db, execution_counts
from core.auth import Principal, Role
from core.executions import counters, list_executions

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_P99_MS = 50.0
PAGE = 50

_FILL = """
    INSERT INTO executions (id, project_id, service_id, function, status, input, max_attempts,
                            timeout_s, trigger_id, trigger_fire_time, created_at, updated_at)
    SELECT lpad(to_hex(i), 26, '0'),
           'p' || (i % 4),
           's' || (i % 16),
           'f' || ((i / 16) % 4),
           CASE WHEN i % 100 < 80 THEN 'success' WHEN i % 100 < 95 THEN 'failed'
                WHEN i % 100 < 98 THEN 'terminated' WHEN i % 100 < 99 THEN 'created'
                ELSE 'in-progress' END,
           '{}'::jsonb, 3, 600,
           CASE WHEN i % 10 = 0 THEN 't' || ((i / 10) % 100) END,
           CASE WHEN i % 10 = 0 THEN now() - make_interval(secs => $1 - i) END,
           now() - make_interval(secs => ($1 - i) * (30 * 86400.0 / $1)),
           now()
    FROM generate_series(1, $1) AS i
"""


def combinations() -> list[tuple[str, dict[str, Any]]]:
    """(label, filters) for every combination the list endpoint offers."""
    values = {
        "project": "p1",
        "service": "s5",  # a service of p1 (5 % 4 == 1)
        "function": "f2",
        "trigger": "t7",
        "status": "failed",
    }
    out: list[tuple[str, dict[str, Any]]] = []
    names = list(values)
    for size in range(len(names) + 1):
        for chosen in itertools.combinations(names, size):
            filters = {name: values[name] for name in chosen}
            out.append(("+".join(chosen) or "(none)", filters))
    out.append(("status=created,in-progress", {"status": "created,in-progress"}))
    out.append(
        ("project+status=created,in-progress", {"project": "p1", "status": "created,in-progress"})
    )
    out.append(
        (
            "project+created range",
            {"project": "p1", "created_after": "-7d", "created_before": "-6d"},
        )
    )
    out.append(("created range", {"created_after": "-7d", "created_before": "-6d"}))
    out.append(("pipeline_execution", {"pipeline_execution": "pe-none"}))
    return out


def flagged(plan: dict[str, Any]) -> list[str]:
    """Nodes that read more than the page: sorts and sequential scans."""
    found: list[str] = []
    if plan.get("Node Type") in ("Sort", "Seq Scan", "Incremental Sort"):
        found.append(f"{plan['Node Type']} ({plan.get('Actual Rows', '?')} rows)")
    for child in plan.get("Plans", []):
        found.extend(flagged(child))
    return found


def indexes_of(plan: dict[str, Any]) -> list[str]:
    names = [plan["Index Name"]] if "Index Name" in plan else []
    for child in plan.get("Plans", []):
        names.extend(indexes_of(child))
    return names


class Recorder:
    """The statements a pool's connections send, for EXPLAIN."""

    def __init__(self) -> None:
        self.queries: list[tuple[str, tuple[Any, ...]]] = []

    async def init(self, conn: asyncpg.Connection) -> None:
        await db._init_connection(conn)
        conn.add_query_logger(lambda q: self.queries.append((q.query, q.args)))


def resolve(filters: dict[str, Any], now: float) -> dict[str, Any]:
    from datetime import UTC, datetime, timedelta

    out = dict(filters)
    for key in ("created_after", "created_before"):
        if key in out:
            days = int(out[key].strip("-d"))
            out[key] = datetime.fromtimestamp(now, UTC) - timedelta(days=days)
    return out


async def measure(pool: asyncpg.Pool, recorder: Recorder, label: str, call, runs: int) -> dict:
    recorder.queries.clear()
    await call()
    query, args = recorder.queries[-1]
    async with pool.acquire() as conn:
        raw = await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {query}", *args)
    plan = (json.loads(raw) if isinstance(raw, str) else raw)[0]["Plan"]
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        await call()
        times.append(time.perf_counter() - t0)
    return {
        "case": label,
        "latency": summary_ms(times),
        "indexes": indexes_of(plan),
        "reads_past_page": flagged(plan),
        "plan_top": plan["Node Type"],
    }


async def run(args: argparse.Namespace, dsn: str) -> dict[str, Any]:
    conn = await db.connect(dsn)
    try:
        await db.migrate(conn)
        have = await conn.fetchval("SELECT count(*) FROM executions")
        insert_s = 0.0
        if have != args.rows:
            if have and args.dsn:
                raise SystemExit(f"{args.dsn} holds {have} other executions: give an empty one")
            await conn.execute("TRUNCATE executions CASCADE")
            t0 = time.perf_counter()
            async with conn.transaction():
                await conn.execute("SET LOCAL session_replication_role = replica")
                await conn.execute(_FILL, args.rows)
            # Filled with triggers off (no FK checks at this size): count once, as the
            # migration does for an existing database.
            await execution_counts.recount(conn)
            insert_s = time.perf_counter() - t0
            await conn.execute("ANALYZE executions")
        indexes = [
            r["indexdef"]
            for r in await conn.fetch(
                "SELECT indexdef FROM pg_indexes WHERE tablename = 'executions' ORDER BY 1"
            )
        ]
    finally:
        await conn.close()
    print(f"{args.rows} rows ready (insert {insert_s:.1f} s)", flush=True)
    recorder = Recorder()
    pool = await asyncpg.create_pool(
        dsn, min_size=1, max_size=2, init=recorder.init, reset=db._reset_cheaply
    )
    admin = Principal("bench", Role.admin, None)
    now = time.time()
    cases: list[dict[str, Any]] = []
    try:
        for label, filters in combinations():
            resolved = resolve(filters, now)
            for order in ("-created_at", "created_at"):
                first = await list_executions(
                    pool, admin, filters=resolved, cursor=None, limit=PAGE, order=order
                )
                for page, cursor in (("first", None), ("next", first["next_cursor"])):
                    if page == "next" and cursor is None:
                        continue

                    async def call(resolved=resolved, order=order, cursor=cursor):
                        return await list_executions(
                            pool, admin, filters=resolved, cursor=cursor, limit=PAGE, order=order
                        )

                    name = f"list {label} order={order} page={page}"
                    cases.append(await measure(pool, recorder, name, call, args.runs))
                    print(_line(cases[-1]), flush=True)
        for label, project, service in (
            ("counters (all)", None, None),
            ("counters project", "p1", None),
            ("counters service", None, "s5"),
        ):

            async def count(project=project, service=service):
                return await counters(pool, admin, project=project, service=service)

            cases.append(await measure(pool, recorder, label, count, args.runs))
            print(_line(cases[-1]), flush=True)
    finally:
        await pool.close()
    return {"rows": args.rows, "insert_s": round(insert_s, 1), "indexes": indexes, "cases": cases}


def _line(case: dict[str, Any]) -> str:
    lat = case["latency"]
    past = "; ".join(case["reads_past_page"]) or "-"
    return (
        f"{case['case']:<70} p50 {lat.get('p50_ms'):>8} p99 {lat.get('p99_ms'):>8} ms  "
        f"{','.join(case['indexes']) or case['plan_top']}  past page: {past}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.lists", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=20, help="timed runs per case")
    parser.add_argument("--dsn", help="a PostgreSQL database to fill (default: an embedded one)")
    parser.add_argument("--keep", action="store_true", help="keep the embedded server's data")
    parser.add_argument("--out", type=Path, default=RESULTS / "lists-latest.json")
    args = parser.parse_args(argv)
    started = time.time()
    server = None
    tmp = Path(tempfile.mkdtemp(prefix="ferry-bench-lists-"))
    try:
        if args.dsn:
            dsn = args.dsn
        else:
            from core.embedded import EmbeddedPostgres

            server = EmbeddedPostgres(tmp / "pg")
            dsn = server.start()
        results = asyncio.run(run(args, dsn))
    finally:
        if server is not None:
            server.stop()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    slowest = sorted(results["cases"], key=lambda c: -c["latency"].get("p99_ms", 0))
    met = all(c["latency"].get("p99_ms", 1e9) <= TARGET_P99_MS for c in results["cases"])
    report = {
        "benchmark": "lists",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": round(time.time() - started, 1),
        "target_p99_ms": TARGET_P99_MS,
        **results,
        "met": met,
    }
    print(f"\n{results['rows']} executions; the five slowest by p99 (target {TARGET_P99_MS:g} ms):")
    for case in slowest[:5]:
        print("  " + _line(case))
    flagged_cases = [c for c in results["cases"] if c["reads_past_page"]]
    print(f"{len(flagged_cases)} of {len(results['cases'])} cases read past their page")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
