"""Executions counted by project, service and status, without counting the executions table.

The table keeps its own counts (migration 0008): every insert, delete and status change
appends a change row in the same transaction, so the counts are never out of step with the
rows. `compact` folds the changes into one row per (project, service, status); the
scheduler's reconciler runs it every round. `read` sums the folded counts and the changes
not folded yet in one statement, hence in one snapshot: a compaction running meanwhile
moves rows from one side to the other atomically, and the sum stays exact.
"""

from __future__ import annotations

import asyncpg

# Compactions of several schedulers would only wait on each other's row locks: one at a time.
_COMPACT_LOCK = 0x46455252_434E5453  # an arbitrary key of Ferry's own ("FERRCNTS")


async def compact(pool: asyncpg.Pool | asyncpg.Connection) -> int:
    """Fold the pending changes into the counts; returns how many change rows were folded."""
    return await pool.fetchval(
        """WITH lock AS (SELECT pg_try_advisory_xact_lock($1) AS held),
           moved AS (
               DELETE FROM execution_count_changes WHERE (SELECT held FROM lock)
               RETURNING project_id, service_id, status, delta),
           folded AS (
               INSERT INTO execution_counts (project_id, service_id, status, n)
               SELECT project_id, service_id, status, sum(delta) FROM moved GROUP BY 1, 2, 3
               ON CONFLICT (project_id, service_id, status)
               DO UPDATE SET n = execution_counts.n + excluded.n)
           SELECT count(*) FROM moved""",
        _COMPACT_LOCK,
    )


async def read(
    pool: asyncpg.Pool | asyncpg.Connection, *, project: str | None, service: str | None
) -> dict[str, int]:
    """Executions by status in a project and/or service (everything when both are None)."""
    conditions, args = [], []
    if project is not None:
        args.append(project)
        conditions.append(f"project_id = ${len(args)}")
    if service is not None:
        args.append(service)
        conditions.append(f"service_id = ${len(args)}")
    where = " AND ".join(conditions) or "true"
    rows = await pool.fetch(
        f"""SELECT status, sum(n)::bigint AS n FROM (
                SELECT status, n FROM execution_counts WHERE {where}
                UNION ALL
                SELECT status, delta FROM execution_count_changes WHERE {where}) AS c
            GROUP BY status""",
        *args,
    )
    return {r["status"]: r["n"] for r in rows if r["n"]}


async def recount(conn: asyncpg.Connection) -> None:
    """Count the executions table from scratch (after rows were written with triggers off)."""
    async with conn.transaction():
        await conn.execute("LOCK TABLE executions IN SHARE MODE")  # no change meanwhile
        await conn.execute("TRUNCATE execution_counts, execution_count_changes")
        await conn.execute(
            """INSERT INTO execution_counts (project_id, service_id, status, n)
               SELECT project_id, service_id, status, count(*) FROM executions GROUP BY 1, 2, 3"""
        )
