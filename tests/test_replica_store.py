"""The `workers` and `replicas` tables (core/replica_store.py): slots claimed under the
service's lock never overshoot, and the reconciler fails exactly the replicas whose worker
is gone."""

from __future__ import annotations

import asyncio

from core import replica_store
from scheduler.reconciler import Reconciler


async def test_concurrent_claims_never_overshoot_and_a_release_keeps_the_rest(pool, service):
    generation = await pool.fetchval("SELECT generation FROM services WHERE id = $1", service["id"])

    claimed = await asyncio.gather(
        *(
            replica_store.claim_slot(
                pool,
                service["id"],
                generation=generation,
                desired=2,
                worker_id=f"worker-{n % 3}",
                host=f"host-{n % 3}",
            )
            for n in range(6)
        )
    )

    ids = [replica_id for replica_id in claimed if replica_id is not None]
    assert len(ids) == 2
    rows = await pool.fetch(
        "SELECT id, status, worker_id, generation FROM replicas WHERE service_id = $1",
        service["id"],
    )
    assert sorted(r["id"] for r in rows) == sorted(ids)
    assert {(r["status"], r["generation"]) for r in rows} == {("starting", generation)}

    owner = {r["id"]: r["worker_id"] for r in rows}
    for replica_id in ids:
        await replica_store.set_status(
            pool, replica_id, status="ready", message=None, cold_start_ms=120, running=0
        )
    assert await replica_store.count_ready(pool, service["id"], generation=generation) == 2
    # Each worker may release only its own: one of the two ready replicas drains.
    released = [
        await replica_store.release_slot(
            pool, service["id"], generation=generation, desired=1, worker_id=worker_id
        )
        for worker_id in sorted(set(owner.values()))
    ]
    drained = [replica_id for replica_id in released if replica_id is not None]
    assert len(drained) == 1
    statuses = dict(await pool.fetch("SELECT id, status FROM replicas"))
    assert sorted(statuses.values()) == ["draining", "ready"]
    assert statuses[drained[0]] == "draining"
    assert await replica_store.live_replica_ids(pool) == set(ids)  # draining is still live


async def test_the_reconciler_fails_the_replicas_of_silent_and_vanished_workers(
    pool, redis, service
):
    await pool.execute(
        """INSERT INTO workers (id, host, runtime, capacity, heartbeat_at) VALUES
           ('w-silent', 'h1', 'process', 4, now() - interval '60 seconds'),
           ('w-alive', 'h2', 'process', 4, now())"""
    )
    replicas = {
        # id: (worker, status, seconds since the row last changed)
        "r-silent-ready": ("w-silent", "ready", 0),
        "r-silent-stopped": ("w-silent", "stopped", 0),
        "r-alive": ("w-alive", "ready", 0),
        "r-vanished-old": ("w-vanished", "ready", 60),
        "r-vanished-new": ("w-vanished", "starting", 0),
    }
    for replica_id, (worker_id, status, age_s) in replicas.items():
        await pool.execute(
            """INSERT INTO replicas (id, service_id, worker_id, host, generation, status, updated_at)
               VALUES ($1, $2, $3, 'h', 1, $4, now() - make_interval(secs => $5))""",
            replica_id,
            service["id"],
            worker_id,
            status,
            age_s,
        )

    report = await Reconciler(pool, redis).run_once()

    assert report.workers_lost == 1
    assert [r["id"] for r in await pool.fetch("SELECT id FROM workers")] == ["w-alive"]
    rows = {
        r["id"]: (r["status"], r["message"], r["stopped_at"] is not None)
        for r in await pool.fetch("SELECT id, status, message, stopped_at FROM replicas")
    }
    assert rows == {
        "r-silent-ready": ("failed", "its worker stopped heartbeating", True),
        "r-silent-stopped": ("stopped", None, False),
        "r-alive": ("ready", None, False),
        "r-vanished-old": ("failed", "its worker is gone", True),
        # Just inserted by a worker whose own row is not there (yet): left alone for now.
        "r-vanished-new": ("starting", None, False),
    }
