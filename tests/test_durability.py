"""Durability: workers that die (`kill -9`), a Redis that loses its queues, attempts that run
out. Workers run as `ferry worker` subprocesses so they can be killed like a host dying;
the reconciler runs in this process with a short interval.

Measured figures (kill to recovered) are printed: `pytest -s tests/test_durability.py`.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from typing import Any

import yaml

from tests.conftest import make_zip
from tests.engine_helpers import running_reconciler, running_worker, wait_for_status, wait_parked
from tests.process_helpers import LEASE_S, WorkerProcess

CODE = """
import time


def nap(seconds):
    time.sleep(seconds)
    return {"slept": seconds}
"""

MANIFEST = {
    "name": "durable",
    "modules": [
        {
            "name": "main",
            "entry_point": "main.py",
            "functions": [{"name": "nap", "inputs": [{"name": "seconds", "type": "number"}]}],
        }
    ],
}


async def deploy(api, project_id: str, name: str = "durable", **fields: Any) -> dict:
    manifest = {**MANIFEST, "name": f"pkg-{name}"}
    archive = make_zip({"ferry.yaml": yaml.safe_dump(manifest), "main.py": CODE})
    status, package = await api.upload(project_id, archive)
    assert status == 201, package
    body = {
        "project": project_id,
        "name": name,
        "package": package["id"],
        "runtime": {"max_replicas": 1, "memory_mb": 128},
        **fields,
    }
    status, service = await api.post("/api/v1/services", body)
    assert status == 201, service
    return service


async def start_nap(api, service_id: str, seconds: float) -> dict:
    status, body = await api.post(
        "/api/v1/executions",
        {"service": service_id, "function": "nap", "input": {"seconds": seconds}},
    )
    assert status == 201, body
    return body


async def wait_running_on(pool, execution_id: str, worker: WorkerProcess, timeout_s=30) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        row = await pool.fetchrow(
            "SELECT status, worker_id FROM executions WHERE id = $1", execution_id
        )
        if row["status"] == "in-progress" and row["worker_id"] == worker.id:
            return
        assert row["status"] in ("created", "in-progress"), dict(row)
        assert time.monotonic() < deadline, f"not running on {worker.id}: {dict(row)}\n" + (
            worker.output()
        )
        await asyncio.sleep(0.05)


async def attempts_of(pool, execution_id: str) -> list[dict]:
    rows = await pool.fetch(
        """SELECT attempt, worker_id, status, reason, finished_at IS NOT NULL AS finished,
                  started_at, finished_at
           FROM execution_attempts WHERE execution_id = $1 ORDER BY attempt""",
        execution_id,
    )
    return [dict(r) for r in rows]


async def lease_of(pool, execution_id: str) -> datetime:
    """The lease an execution holds (read after its worker was killed: its last renewal)."""
    lease = await pool.fetchval("SELECT lease_until FROM executions WHERE id = $1", execution_id)
    assert lease is not None, f"{execution_id} holds no lease"
    return lease


# -- 7. a worker killed mid-execution -------------------------------------------------------


async def test_worker_killed_mid_execution_is_retried_elsewhere(
    api, project, settings, pool, redis, workers
):
    service = await deploy(api, project["id"])
    worker_a = workers("a")
    await worker_a.wait_up(pool)
    async with running_reconciler(pool, redis, interval_s=0.2):
        created = await start_nap(api, service["id"], 3)
        await wait_running_on(pool, created["id"], worker_a)
        await asyncio.sleep(0.5)  # well inside the 3 s function

        worker_a.kill()
        killed_at = time.monotonic()
        worker_b = workers("b")
        await worker_b.wait_up(pool)
        done = await wait_for_status(api, created["id"], 90)
        recovered_s = time.monotonic() - killed_at

    print(
        f"\n[process] kill -9 of the worker to success on another: {recovered_s:.1f} s "
        f"(lease {LEASE_S:g} s, the function takes 3 s)"
    )
    assert done["status"] == "success", (done, worker_b.output())
    assert done["attempt"] == 2
    assert done["output"] == {"slept": 3}
    attempts = await attempts_of(pool, created["id"])
    assert [(a["attempt"], a["worker_id"], a["status"], a["reason"]) for a in attempts] == [
        (1, worker_a.id, "failed", "lost"),
        (2, worker_b.id, "success", None),
    ]
    assert all(a["finished"] for a in attempts)
    statuses = [(e["status"], e.get("reason")) for e in done["status_log"]]
    assert statuses == [
        ("created", None),
        ("in-progress", None),
        ("in-progress", "lost"),  # handed back: attempt 1 lost, retrying
        ("in-progress", None),
        ("success", None),
    ]


async def test_recovery_after_kill_is_bounded_by_the_lease(
    api, project, settings, pool, redis, workers
):
    service = await deploy(api, project["id"])
    worker_a = workers("a")
    worker_b = workers("b")  # up before the kill: only the engine's reaction is measured
    await worker_a.wait_up(pool)
    await worker_b.wait_up(pool)
    async with running_reconciler(pool, redis, interval_s=0.2):
        created = await start_nap(api, service["id"], 0.5)
        # max_replicas 1: the replica (and so the execution) is on one of the two
        await wait_for_status(api, created["id"], 30)
        holder = await pool.fetchval(
            "SELECT worker_id FROM replicas WHERE service_id = $1 AND status = 'ready'",
            service["id"],
        )
        victim = worker_a if holder == worker_a.id else worker_b
        created = await start_nap(api, service["id"], 0.5)
        await wait_running_on(pool, created["id"], victim)

        victim.kill()
        killed_at = time.monotonic()
        lease_until = await lease_of(pool, created["id"])
        done = await wait_for_status(api, created["id"], 60)
        recovered_s = time.monotonic() - killed_at

    print(f"\n[process] kill -9 to success, the survivor already up: {recovered_s:.1f} s")
    assert done["status"] == "success" and done["attempt"] == 2, done
    attempts = await attempts_of(pool, created["id"])
    assert [(a["attempt"], a["worker_id"], a["reason"]) for a in attempts] == [
        (1, victim.id, "lost"),
        (2, (worker_b if victim is worker_a else worker_a).id, None),
    ]
    # What PostgreSQL stamped: handed back only once the lease had expired, then retried
    # within a few reconciler rounds (0.2 s each; the margin absorbs a loaded machine).
    handed_back, retried = attempts[0]["finished_at"], attempts[1]["started_at"]
    assert lease_until <= handed_back <= retried
    assert (retried - lease_until).total_seconds() < 5, (lease_until, handed_back, retried)


# -- 8. Redis loses its queues --------------------------------------------------------------


async def test_executions_survive_a_flushed_redis(api, project, settings, pool, redis):
    service = await deploy(api, project["id"], runtime={"max_replicas": 1, "concurrency": 4})
    ids = [(await start_nap(api, service["id"], 0.1))["id"] for _ in range(20)]
    status, body = await api.get(f"/api/v1/services/{service['id']}/status")
    assert body["queue_length"] == 20, body

    await redis.flushdb()  # every queued job is gone; PostgreSQL still has the executions
    status, body = await api.get(f"/api/v1/services/{service['id']}/status")
    assert body["queue_length"] == 0, body

    began = time.monotonic()
    async with (
        running_worker(settings, pool, redis, runtime="process"),
        running_reconciler(pool, redis, interval_s=0.2),
    ):
        done = await asyncio.gather(*(wait_for_status(api, i, 60) for i in ids))
    print(
        f"\n[process] 20 executions queued again and run after FLUSHDB: {time.monotonic() - began:.1f} s"
    )
    assert [d["status"] for d in done] == ["success"] * 20, [d["error"] for d in done]
    assert {d["attempt"] for d in done} == {1}


# -- 9. attempts run out --------------------------------------------------------------------


async def test_lost_execution_without_attempts_left_fails(
    api, project, settings, pool, redis, workers
):
    # One attempt only: losing it is final (core/states.py hand_back: `max-attempts`).
    once = await deploy(api, project["id"], name="once", max_attempts=1)
    # on_reset "failed": a lost attempt is never retried (hand_back: reason `lost`).
    no_rerun = await deploy(api, project["id"], name="no-rerun", on_reset="failed")
    worker = workers("a")
    await worker.wait_up(pool)
    async with running_reconciler(pool, redis, interval_s=0.2):
        first = await start_nap(api, once["id"], 30)
        second = await start_nap(api, no_rerun["id"], 30)
        await wait_running_on(pool, first["id"], worker)
        await wait_running_on(pool, second["id"], worker)

        worker.kill()
        killed_at = time.monotonic()
        leases = [await lease_of(pool, first["id"]), await lease_of(pool, second["id"])]
        done = await asyncio.gather(
            wait_for_status(api, first["id"], 30), wait_for_status(api, second["id"], 30)
        )
        failed_s = time.monotonic() - killed_at

    print(
        f"\n[process] kill -9 to failed (no attempt left): {failed_s:.1f} s (lease {LEASE_S:g} s)"
    )
    assert (done[0]["status"], done[0]["reason"]) == ("failed", "max-attempts"), done[0]
    assert (done[1]["status"], done[1]["reason"]) == ("failed", "lost"), done[1]
    for execution, lease_until in zip(done, leases, strict=True):
        assert execution["attempt"] == 1
        assert execution["error"]["type"] == "WorkerLost"
        assert worker.id in execution["error"]["message"]
        assert execution["finished_at"] is not None
        attempts = await attempts_of(pool, execution["id"])
        assert [(a["attempt"], a["status"], a["reason"]) for a in attempts] == [
            (1, "failed", "lost")
        ]
        # Failed only once the lease of its last renewal had expired (PostgreSQL's clock),
        # and within a few reconciler rounds after.
        finished = datetime.fromisoformat(execution["finished_at"])
        assert lease_until <= finished, (lease_until, finished)
        assert (finished - lease_until).total_seconds() < 5, (lease_until, finished)
    assert done[1]["max_attempts"] == 3  # attempts were left: on_reset alone stopped it


async def test_terminating_an_execution_waiting_for_a_retry(
    api, project, settings, pool, redis, workers
):
    service = await deploy(api, project["id"])
    worker = workers("a")
    await worker.wait_up(pool)
    async with running_reconciler(pool, redis, interval_s=0.2):
        created = await start_nap(api, service["id"], 30)
        await wait_running_on(pool, created["id"], worker)
        worker.kill()  # no other worker: once handed back, it waits for one

        deadline = time.monotonic() + 15
        while await pool.fetchval(
            "SELECT lease_until IS NOT NULL FROM executions WHERE id = $1", created["id"]
        ):
            assert time.monotonic() < deadline, "the lease was never taken back"
            await asyncio.sleep(0.1)
        waiting = (await api.get(f"/api/v1/executions/{created['id']}"))[1]
        assert (waiting["status"], waiting["attempt"]) == ("in-progress", 1), waiting

        # A long wait: only the wake-up can answer it before the test's own bound.
        waiter = asyncio.create_task(wait_for_status(api, created["id"], 120))
        await wait_parked(api, created["id"])
        assert not waiter.done()
        status, body = await api.post(f"/api/v1/executions/{created['id']}/terminate")
        assert status == 202 and body["status"] == "terminated", body
        done = await asyncio.wait_for(waiter, 30)

    assert done["status"] == "terminated"
    assert [(e["status"], e.get("reason")) for e in done["status_log"]] == [
        ("created", None),
        ("in-progress", None),
        ("in-progress", "lost"),
        ("terminated", None),
    ]


# -- 10. Redis flushed with work in progress, then handed back --------------------------------


async def test_flushall_with_work_in_progress_and_a_worker_lost(
    api, project, settings, pool, redis, workers
):
    # Two running (concurrency 2) and three queued behind them; then Redis loses
    # everything and the worker dies: the running ones are handed back into an empty Redis.
    service = await deploy(
        api, project["id"], runtime={"max_replicas": 1, "concurrency": 2, "memory_mb": 128}
    )
    worker_a = workers("a")
    await worker_a.wait_up(pool)
    async with running_reconciler(pool, redis, interval_s=0.2):
        running = [await start_nap(api, service["id"], 3) for _ in range(2)]
        for execution in running:
            await wait_running_on(pool, execution["id"], worker_a)
        queued = [await start_nap(api, service["id"], 0.1) for _ in range(3)]
        await redis.flushall()
        worker_a.kill()
        worker_b = workers("b")
        await worker_b.wait_up(pool)
        done = await asyncio.gather(*(wait_for_status(api, e["id"], 90) for e in running + queued))

    assert [d["status"] for d in done] == ["success"] * 5, (done, worker_b.output())
    for execution in done[:2]:
        attempts = await attempts_of(pool, execution["id"])
        assert [(a["attempt"], a["worker_id"], a["status"], a["reason"]) for a in attempts] == [
            (1, worker_a.id, "failed", "lost"),
            (2, worker_b.id, "success", None),
        ]
    for execution in done[2:]:
        attempts = await attempts_of(pool, execution["id"])
        assert [(a["attempt"], a["worker_id"], a["status"]) for a in attempts] == [
            (1, worker_b.id, "success")
        ]


# -- 11. the reconciler as a real scheduler, with the default lease and heartbeat -------------


async def test_a_scheduler_process_retries_a_killed_workers_execution(
    api, project, settings, pool, redis, workers
):
    service = await deploy(api, project["id"])
    defaults = {"lease_s": None, "heartbeat_s": None}  # 15 s and 3 s
    workers("scheduler", "scheduler", **defaults)
    worker_a = workers("a", **defaults)
    await worker_a.wait_up(pool)
    created = await start_nap(api, service["id"], 1)
    await wait_running_on(pool, created["id"], worker_a)
    worker_a.kill()
    lease_until = await lease_of(pool, created["id"])
    worker_b = workers("b", **defaults)
    await worker_b.wait_up(pool)
    done = await wait_for_status(api, created["id"], 120)

    assert (done["status"], done["attempt"]) == ("success", 2), (done, worker_b.output())
    attempts = await attempts_of(pool, created["id"])
    assert [(a["attempt"], a["worker_id"], a["status"], a["reason"]) for a in attempts] == [
        (1, worker_a.id, "failed", "lost"),
        (2, worker_b.id, "success", None),
    ]
    # The default lease was in force (15 s from the claim, renewed since) ...
    assert (lease_until - attempts[0]["started_at"]).total_seconds() >= 15 - 0.01
    # ... and the scheduler handed it back once it expired, within a few of its 1 s rounds.
    handed_back, retried = attempts[0]["finished_at"], attempts[1]["started_at"]
    assert lease_until <= handed_back <= retried
    assert (retried - lease_until).total_seconds() < 8, (lease_until, handed_back, retried)


def test_a_connection_broken_mid_operation_is_an_outage_not_a_bug():
    """PostgreSQL restarted under load: a pooled connection whose server went away in the
    middle of an operation fails its next query in asyncpg's state machine
    (InternalClientError, seen by the cluster suite as a 500). It is an outage: the API
    answers 503 naming PostgreSQL, and the loops back off."""
    import asyncpg

    from core.outages import UNAVAILABLE, dependency_of

    exc = asyncpg.InternalClientError(
        "cannot switch to state 15; another operation (2) is in progress"
    )
    assert isinstance(exc, UNAVAILABLE)
    assert dependency_of(exc) == "PostgreSQL"


async def test_a_worker_that_cannot_renew_leases_claims_nothing(
    api, project, settings, pool, redis
):
    """A worker whose heartbeats hang (its network was cut; calls stuck on half-open
    connections) would lose every lease it took, an attempt each: it claims nothing until
    a heartbeat succeeds again, and the execution then runs once."""
    service = await deploy(api, project["id"], "fenced")
    async with running_worker(settings, pool, redis, runtime="process") as host:
        host.heartbeat.ok_at = -1e9  # as if no heartbeat had succeeded for ages
        original = host.heartbeat.can_renew_leases
        host.heartbeat.can_renew_leases = lambda: False  # type: ignore[method-assign]
        execution = await start_nap(api, service["id"], 0)
        await asyncio.sleep(3)
        row = await pool.fetchrow(
            "SELECT status, attempt FROM executions WHERE id = $1", execution["id"]
        )
        assert (row["status"], row["attempt"]) == ("created", 0)  # no attempt burned
        host.heartbeat.can_renew_leases = original  # type: ignore[method-assign]
        done = await wait_for_status(api, execution["id"])
        assert (done["status"], done["attempt"]) == ("success", 1)
