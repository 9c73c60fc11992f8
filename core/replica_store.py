"""The `workers` and `replicas` tables: which workers are alive, and the replicas they run.

A worker's row is its heartbeat: the reconciler forgets a worker whose row went stale and
fails the replicas it held, so that placement (on any worker) replaces them. A replica's
row is its slot: placement claims one under a per-service advisory lock, so the workers
of a cluster never start more replicas of a service than it wants.

Live replicas are those `starting`, `ready` or `draining`; `stopped` and `failed` are final.
"""

from __future__ import annotations

from typing import TypeAlias

import asyncpg

from core.ids import new_id
from core.services import ReplicaStatus

# A pool, or a connection when the caller holds a transaction.
Db: TypeAlias = asyncpg.Pool | asyncpg.Connection

# -- workers ---------------------------------------------------------------------------------


async def register_worker(
    db: Db, worker_id: str, *, host: str, runtime: str, capacity: int
) -> None:
    """Insert the worker's row, or (a heartbeat) bring its `heartbeat_at` up to now.

    An upsert: after an outage longer than the lease the reconciler has forgotten the
    worker, which then registers again instead of running on unseen."""
    await db.execute(
        """INSERT INTO workers (id, host, runtime, capacity) VALUES ($1, $2, $3, $4)
           ON CONFLICT (id) DO UPDATE SET heartbeat_at = now()""",
        worker_id,
        host,
        runtime,
        capacity,
    )


async def remove_worker(db: Db, worker_id: str) -> None:
    await db.execute("DELETE FROM workers WHERE id = $1", worker_id)


async def forget_workers(
    db: Db, worker_ids: list[str], *, silent_for_s: float
) -> list[asyncpg.Record]:
    """Delete those of `worker_ids` that have not heartbeated for `silent_for_s`; returns
    their (id, host)."""
    return await db.fetch(
        """DELETE FROM workers WHERE id = ANY($1::text[])
             AND heartbeat_at < now() - make_interval(secs => $2)
           RETURNING id, host""",
        worker_ids,
        silent_for_s,
    )


async def forget_silent_workers(db: Db, *, silent_for_s: float) -> list[asyncpg.Record]:
    """Delete every worker that has not heartbeated for `silent_for_s`; returns their (id, host)."""
    return await db.fetch(
        """DELETE FROM workers WHERE heartbeat_at < now() - make_interval(secs => $1)
           RETURNING id, host""",
        silent_for_s,
    )


async def count_live_workers(db: Db, *, heartbeat_within_s: float) -> int:
    return await db.fetchval(
        "SELECT count(*) FROM workers WHERE heartbeat_at > now() - make_interval(secs => $1)",
        heartbeat_within_s,
    )


# -- replica slots (placement) ---------------------------------------------------------------


async def placement_view(db: Db) -> list[asyncpg.Record]:
    """Every service with what placement weighs: its status, generation and runtime, how
    long it has been idle, its in-progress executions and its live replicas of the current
    generation (`live`)."""
    return await db.fetch(
        """SELECT s.id, s.project_id, s.status, s.generation, s.runtime, s.desired_replicas,
                  extract(epoch FROM now() - s.last_activity_at) AS idle_for_s,
                  (SELECT count(*) FROM executions e
                    WHERE e.service_id = s.id AND e.status = 'in-progress') AS in_progress,
                  (SELECT count(*) FROM replicas r WHERE r.service_id = s.id
                    AND r.generation = s.generation AND r.status IN ('starting', 'ready'))
                    AS live
           FROM services s"""
    )


async def live_replica_ids(db: Db) -> set[str]:
    """The ids of every live replica, on any worker."""
    rows = await db.fetch(
        "SELECT id FROM replicas WHERE status IN ('starting', 'ready', 'draining')"
    )
    return {r["id"] for r in rows}


async def count_ready(db: Db, service_id: str, *, generation: int) -> int:
    return await db.fetchval(
        """SELECT count(*) FROM replicas WHERE service_id = $1 AND generation = $2
           AND status = 'ready'""",
        service_id,
        generation,
    )


async def _live_under_lock(conn: asyncpg.Connection, service_id: str, generation: int) -> int:
    """The service's starting or ready replicas of `generation`, counted under the service's
    advisory lock (held to the transaction's end), so that workers placing it at the same
    time count one after another and never overshoot."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", service_id)
    return await conn.fetchval(
        """SELECT count(*) FROM replicas WHERE service_id = $1 AND generation = $2
           AND status IN ('starting', 'ready')""",
        service_id,
        generation,
    )


async def claim_slot(
    pool: asyncpg.Pool,
    service_id: str,
    *,
    generation: int,
    desired: int,
    worker_id: str,
    host: str,
) -> str | None:
    """A new `starting` replica of the service for this worker, if the service has fewer
    than `desired` starting or ready; its id, or None."""
    async with pool.acquire() as conn, conn.transaction():
        if await _live_under_lock(conn, service_id, generation) >= desired:
            return None
        replica_id = new_id()
        await conn.execute(
            """INSERT INTO replicas (id, service_id, worker_id, host, generation, status)
               VALUES ($1, $2, $3, $4, $5, 'starting')""",
            replica_id,
            service_id,
            worker_id,
            host,
            generation,
        )
        return replica_id


async def release_slot(
    pool: asyncpg.Pool, service_id: str, *, generation: int, desired: int, worker_id: str
) -> str | None:
    """Mark one of this worker's ready replicas draining if the service has more than
    `desired` starting or ready (the least busy, newest first); its id, or None."""
    async with pool.acquire() as conn, conn.transaction():
        if await _live_under_lock(conn, service_id, generation) <= desired:
            return None
        return await conn.fetchval(
            """UPDATE replicas SET status = 'draining', updated_at = now()
               WHERE id = (SELECT id FROM replicas WHERE service_id = $1 AND worker_id = $2
                           AND generation = $3 AND status = 'ready'
                           ORDER BY running, started_at DESC LIMIT 1)
               RETURNING id""",
            service_id,
            worker_id,
            generation,
        )


# -- replica status --------------------------------------------------------------------------


async def set_status(
    db: Db,
    replica_id: str,
    *,
    status: str,
    message: str | None,
    cold_start_ms: int | None,
    running: int,
) -> None:
    """Record a replica's new status; `stopped_at` is set when it is final."""
    await db.execute(
        """UPDATE replicas SET status = $2, message = $3, updated_at = now(),
               cold_start_ms = coalesce($4, cold_start_ms), running = $5,
               stopped_at = CASE WHEN $2 IN ('stopped', 'failed') THEN now() END
           WHERE id = $1""",
        replica_id,
        status,
        message,
        cold_start_ms,
        running,
    )


async def fail_before_start(db: Db, replica_id: str, *, message: str) -> None:
    """A claimed replica whose service could not even be prepared fails at once."""
    await db.execute(
        "UPDATE replicas SET status = 'failed', message = $2, stopped_at = now() WHERE id = $1",
        replica_id,
        message,
    )


async def failed_starts(db: Db, service_id: str) -> int:
    """Failed starts in a row of the service's current generation, across workers: failed
    replicas that never got ready, since the last one that did."""
    return await db.fetchval(
        """SELECT count(*) FROM replicas r JOIN services s ON s.id = r.service_id
           WHERE r.service_id = $1 AND r.generation = s.generation AND r.status = 'failed'
             AND r.cold_start_ms IS NULL
             AND r.started_at > coalesce(
                 (SELECT max(started_at) FROM replicas
                  WHERE service_id = $1 AND generation = s.generation
                    AND cold_start_ms IS NOT NULL), '-infinity')""",
        service_id,
    )


async def fail_replicas_of_workers(db: Db, worker_ids: list[str]) -> None:
    """The live replicas of workers that stopped heartbeating fail."""
    await db.execute(
        """UPDATE replicas SET status = 'failed', message = 'its worker stopped heartbeating',
               stopped_at = now(), updated_at = now()
           WHERE worker_id = ANY($1::text[]) AND status IN ('starting', 'ready', 'draining')""",
        worker_ids,
    )


async def fail_replicas_without_worker(db: Db, *, unchanged_for_s: float) -> None:
    """Live replicas whose worker row is gone (deleted without a heartbeat gap) fail, once
    unchanged for `unchanged_for_s`, so they no longer count as live."""
    await db.execute(
        """UPDATE replicas SET status = 'failed', message = 'its worker is gone',
               stopped_at = now(), updated_at = now()
           WHERE status IN ('starting', 'ready', 'draining')
             AND updated_at < now() - make_interval(secs => $1)
             AND NOT EXISTS (SELECT 1 FROM workers w WHERE w.id = replicas.worker_id)""",
        unchanged_for_s,
    )


# -- reading ---------------------------------------------------------------------------------


async def live_replicas(db: Db, service_id: str) -> list[ReplicaStatus]:
    """The service's live replicas, oldest first."""
    rows = await db.fetch(
        """SELECT * FROM replicas WHERE service_id = $1 AND status IN ('starting', 'ready', 'draining')
           ORDER BY started_at""",
        service_id,
    )
    return [ReplicaStatus.model_validate(dict(r)) for r in rows]


async def last_failed_replica(db: Db, service_id: str, *, generation: int) -> ReplicaStatus | None:
    """The latest replica of `generation` that failed, if any."""
    row = await db.fetchrow(
        """SELECT * FROM replicas WHERE service_id = $1 AND status = 'failed'
           AND generation = $2 ORDER BY started_at DESC LIMIT 1""",
        service_id,
        generation,
    )
    return ReplicaStatus.model_validate(dict(row)) if row else None


async def count_by_status(db: Db, *, stopped_within_s: float) -> list[asyncpg.Record]:
    """(service_id, status, n): live replicas, and those that stopped or failed within
    `stopped_within_s`."""
    return await db.fetch(
        """SELECT service_id, status, count(*) AS n FROM replicas
           WHERE status IN ('starting', 'ready', 'draining')
              OR stopped_at > now() - make_interval(secs => $1)
           GROUP BY service_id, status""",
        stopped_within_s,
    )
