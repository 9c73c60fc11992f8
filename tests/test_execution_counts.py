"""The execution counters are kept by the executions table itself: after any mix of inserts,
claims, outcomes, terminations and deletes, and whether or not the changes were folded yet,
`GET /executions/counters` equals a `count(*)` of the rows."""

from __future__ import annotations

import asyncio

from core import db, execution_counts
from tests.engine_helpers import running_worker, wait_for_status
from tests.test_migrations import connection, scratch_database


def run(svc, function="echo", **input_):
    return {"service": svc["id"], "function": function, "input": input_ or {"text": "hi"}}


async def truth(pool, **scope: str) -> dict[str, int]:
    """The counts a full scan gives: what the counters must equal."""
    conditions = " AND ".join(f"{column} = '{value}'" for column, value in scope.items()) or "true"
    rows = await pool.fetch(
        f"SELECT status, count(*) AS n FROM executions WHERE {conditions} GROUP BY status"
    )
    return {r["status"]: r["n"] for r in rows}


async def counters(api, **query: str) -> dict[str, int]:
    status, body = await api.get("/api/v1/executions/counters", params=query)
    assert status == 200, body
    assert body["total"] == sum(v for k, v in body.items() if k != "total")
    return {k: v for k, v in body.items() if k != "total" and v}


async def test_counters_follow_every_change_folded_or_not(
    api, project, service, settings, pool, redis
):
    status, other = await api.post("/api/v1/projects", {"name": "beta"})
    assert status == 201
    status, batch = await api.post(
        "/api/v1/executions/batch", {"executions": [run(service, text=str(i)) for i in range(300)]}
    )
    assert status == 201
    ids = [e["id"] for e in batch["items"]]
    assert await counters(api, service=service["id"]) == {"created": 300}
    # Not folded yet: the counts are the pending changes alone.
    assert await pool.fetchval("SELECT count(*) FROM execution_counts") == 0
    assert await execution_counts.compact(pool) >= 1
    assert await pool.fetchval("SELECT count(*) FROM execution_count_changes") == 0

    # A lease renewal or a progress update changes no count; a status change moves one.
    await pool.execute(
        "UPDATE executions SET progress_percent = 50 WHERE id = ANY($1::text[])", ids[:100]
    )
    assert await pool.fetchval("SELECT count(*) FROM execution_count_changes") == 0
    for execution_id in ids[:20]:
        await api.post(f"/api/v1/executions/{execution_id}/terminate")
    assert await counters(api, service=service["id"]) == {"created": 280, "terminated": 20}

    async with running_worker(settings, pool, redis, runtime="process"):
        ended = [await wait_for_status(api, i, timeout_s=120) for i in ids[20:60]]
        assert {e["status"] for e in ended} == {"success"}
        # Folded while the worker claims and finishes the rest, concurrently.
        for _ in range(20):
            await execution_counts.compact(pool)
            await asyncio.sleep(0.05)
            # Both read in one snapshot: the worker moves rows between two statements.
            async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
                kept = await execution_counts.read(conn, project=None, service=service["id"])
                assert kept == await truth(conn, service_id=service["id"])
        await asyncio.gather(*(wait_for_status(api, i, timeout_s=180) for i in ids[60:]))
    expected = {"success": 280, "terminated": 20}
    assert await truth(pool, service_id=service["id"]) == expected
    assert await counters(api, service=service["id"]) == expected
    assert await counters(api, project=project["id"]) == expected
    assert await counters(api, project=other["id"]) == {}
    await execution_counts.compact(pool)
    assert await counters(api) == expected

    # A deleted service's executions go with it, and so do their counts.
    await pool.execute("DELETE FROM services WHERE id = $1", service["id"])
    assert await counters(api) == {}
    await execution_counts.compact(pool)
    assert await counters(api) == {}


async def test_concurrent_changes_and_compactions_keep_the_sum(api, service, pool):
    status, batch = await api.post(
        "/api/v1/executions/batch", {"executions": [run(service, text=str(i)) for i in range(400)]}
    )
    ids = [e["id"] for e in batch["items"]]

    async def move(chunk: list[str], to: str) -> None:
        for execution_id in chunk:
            await pool.execute("UPDATE executions SET status = $2 WHERE id = $1", execution_id, to)

    async def fold_often() -> int:
        folded = 0
        for _ in range(30):
            folded += await execution_counts.compact(pool)
            await asyncio.sleep(0.01)
        return folded

    results = await asyncio.gather(
        *(move(ids[i : i + 50], "in-progress") for i in range(0, 400, 50)),
        fold_often(),
        fold_often(),  # two schedulers at once: one folds, the other finds the lock taken
    )
    assert results[-1] + results[-2] > 0
    await asyncio.gather(*(move(ids[i : i + 100], "success") for i in range(0, 300, 100)))
    expected = {"in-progress": 100, "success": 300}
    assert await truth(pool) == expected
    assert await counters(api) == expected
    await execution_counts.compact(pool)
    assert await pool.fetchval("SELECT count(*) FROM execution_count_changes") == 0
    assert await counters(api) == expected


async def test_an_existing_database_is_counted_by_the_migration(settings):
    async with scratch_database(settings) as dsn, connection(dsn) as conn:
        await db.migrate(conn, target=7)
        await conn.execute("INSERT INTO projects (id, name) VALUES ('p', 'p')")
        await conn.execute(
            "INSERT INTO codebases (sha256, size, format, data) VALUES ('abc', 3, 'zip', 'abc')"
        )
        await conn.execute(
            "INSERT INTO packages (id, project_id, name, latest_revision) VALUES ('k', 'p', 'k', 1)"
        )
        await conn.execute(
            """INSERT INTO services (id, project_id, name, package_id, package_revision, module,
                   runtime, execution_timeout_s, max_attempts, on_reset)
               VALUES ('s', 'p', 's', 'k', 1, 'main', '{}', 60, 3, 'rerun')"""
        )
        await conn.execute(
            """INSERT INTO executions (id, project_id, service_id, function, status,
                   max_attempts, timeout_s)
               SELECT 'e' || i, 'p', 's', 'f', CASE WHEN i % 3 = 0 THEN 'failed' ELSE 'success' END,
                   3, 60
               FROM generate_series(1, 30) AS i"""
        )
        await db.migrate(conn)
        assert await execution_counts.read(conn, project="p", service=None) == {
            "failed": 10,
            "success": 20,
        }
        # And a TRUNCATE leaves nothing counted.
        await conn.execute("TRUNCATE executions CASCADE")
        assert await execution_counts.read(conn, project=None, service=None) == {}
