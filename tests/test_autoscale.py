"""Autoscaling and placement across several `ferry worker` processes: desired replicas
from the queue, `target_queue_per_replica`, no overshoot under the per-service advisory
lock, and scale-down draining that drops no execution."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from tests.engine_helpers import running_reconciler, wait_for_status
from tests.test_durability import deploy, start_nap


async def service_replicas(pool, service_id: str) -> list[dict[str, Any]]:
    rows = await pool.fetch(
        """SELECT id, worker_id, status, message, started_at, stopped_at FROM replicas
           WHERE service_id = $1 ORDER BY started_at""",
        service_id,
    )
    return [dict(r) for r in rows]


async def test_desired_replicas_from_the_queue_placed_across_workers_without_overshoot(
    api, project, settings, pool, redis, workers
):
    # 8 executions, 2 per replica: 4 replicas wanted (max 6). Each worker hosts at most 3,
    # so the 4 must span both, and both race for every slot: only the advisory lock keeps
    # them from starting more than 4.
    service = await deploy(
        api,
        project["id"],
        runtime={
            "max_replicas": 6,
            "target_queue_per_replica": 2,
            "concurrency": 1,
            "idle_timeout_s": 600,
            "memory_mb": 128,
        },
    )
    capacity = {"FERRY_WORKER_CAPACITY": "3"}
    worker_a, worker_b = workers("a", env=capacity), workers("b", env=capacity)
    await worker_a.wait_up(pool)
    await worker_b.wait_up(pool)
    async with running_reconciler(pool, redis):
        ids = [(await start_nap(api, service["id"], 1.5))["id"] for _ in range(8)]
        most_live, desired_seen = 0, set()
        deadline = time.monotonic() + 120
        pending = [asyncio.create_task(wait_for_status(api, i, 120)) for i in ids]
        while not all(t.done() for t in pending):
            status, body = await api.get(f"/api/v1/services/{service['id']}/status")
            assert status == 200, body
            desired_seen.add(body["desired_replicas"])
            live = [r for r in await service_replicas(pool, service["id"]) if not r["stopped_at"]]
            most_live = max(most_live, len(live))
            assert time.monotonic() < deadline, "the executions did not finish"
            await asyncio.sleep(0.1)
        done = [t.result() for t in pending]

    assert [d["status"] for d in done] == ["success"] * 8, [d["error"] for d in done]
    assert {d["attempt"] for d in done} == {1}
    assert 4 in desired_seen and max(desired_seen) == 4, desired_seen
    replicas = await service_replicas(pool, service["id"])
    # Never more than desired: exactly 4 rows were ever inserted (idle_timeout keeps them).
    assert len(replicas) == 4, replicas
    assert most_live == 4
    per_worker = {w.id: sum(r["worker_id"] == w.id for r in replicas) for w in (worker_a, worker_b)}
    assert all(1 <= n <= 3 for n in per_worker.values()), per_worker
    # Each replica ran something: the queue was shared between them.
    used = await pool.fetch(
        "SELECT DISTINCT replica_id FROM executions WHERE id = ANY($1::text[])", ids
    )
    assert len(used) >= 2, used


async def test_scale_down_drains_and_drops_no_execution(
    api, project, settings, pool, redis, workers
):
    # One replica per queued execution and no idle grace: replicas go as soon as the load
    # falls, while longer executions still run on the others.
    service = await deploy(
        api,
        project["id"],
        runtime={
            "max_replicas": 4,
            "target_queue_per_replica": 1,
            "concurrency": 1,
            "idle_timeout_s": 0,
            "memory_mb": 128,
        },
    )
    worker_a, worker_b = workers("a"), workers("b")
    await worker_a.wait_up(pool)
    await worker_b.wait_up(pool)
    async with running_reconciler(pool, redis):
        seconds = [4.0, 3.0, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2]
        ids = [(await start_nap(api, service["id"], s))["id"] for s in seconds]
        done = await asyncio.gather(*(wait_for_status(api, i, 120) for i in ids))

        async def all_stopped() -> list[dict] | None:
            replicas = await service_replicas(pool, service["id"])
            return replicas if all(r["stopped_at"] for r in replicas) else None

        deadline = time.monotonic() + 60
        while not (replicas := await all_stopped()):
            assert time.monotonic() < deadline, await service_replicas(pool, service["id"])
            await asyncio.sleep(0.2)

    assert [d["status"] for d in done] == ["success"] * len(ids), [d["error"] for d in done]
    assert {d["attempt"] for d in done} == {1}  # nothing cut short by a drain, nothing retried
    assert {(r["status"], r["message"]) for r in replicas} == {("stopped", "scaled down")}
    assert len(replicas) >= 2, replicas
    # Some replica was scaled down while the longest execution still ran (PostgreSQL's times).
    last_finish = max(
        await pool.fetchval(
            "SELECT max(finished_at) FROM executions WHERE id = ANY($1::text[])", ids
        ),
        replicas[0]["started_at"],
    )
    assert min(r["stopped_at"] for r in replicas) < last_finish, replicas
    attempts = await pool.fetch(
        "SELECT status FROM execution_attempts WHERE execution_id = ANY($1::text[])", ids
    )
    assert [a["status"] for a in attempts] == ["success"] * len(ids)
