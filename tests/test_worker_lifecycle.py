"""A worker's promises over its replicas' lives: a SIGTERM hands back what it could not finish,
a replica dying under a living worker loses nothing, a PATCH that changes nothing a replica
runs restarts nothing, and a drain waits for the executions' own timeouts.

Workers run as `ferry worker` subprocesses (tests/process_helpers.py); the reconciler runs
in this process where a test needs it. Each test asserts what the engine recorded.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from arq.constants import in_progress_key_prefix

from core import queue
from tests.conftest import make_zip
from tests.engine_helpers import running_reconciler, wait_for_status
from tests.process_helpers import WorkerProcess
from tests.test_engine import _require_docker

CODE = """
import time


def nap(seconds):
    time.sleep(seconds)
    return {"slept": seconds}


def stubborn(context):
    # The first attempt runs until something stops it; a retry answers at once.
    if context["attempt"] == 1:
        time.sleep(120)
    return {"attempt": context["attempt"]}
"""

MANIFEST = {
    "name": "lifecycle",
    "modules": [
        {
            "name": "main",
            "entry_point": "main.py",
            "functions": [
                {"name": "nap", "inputs": [{"name": "seconds", "type": "number"}]},
                {"name": "stubborn"},
            ],
        }
    ],
}


async def deploy(api, project_id: str, name: str, **fields: Any) -> dict:
    archive = make_zip(
        {"ferry.yaml": yaml.safe_dump({**MANIFEST, "name": f"pkg-{name}"}), "main.py": CODE}
    )
    status, package = await api.upload(project_id, archive)
    assert status == 201, package
    runtime = {"max_replicas": 1, "memory_mb": 128, **fields.pop("runtime", {})}
    body = {"project": project_id, "name": name, "package": package["id"], "runtime": runtime}
    status, service = await api.post("/api/v1/services", {**body, **fields})
    assert status == 201, service
    return service


async def start(api, service_id: str, function: str, input: dict | None = None, **fields) -> str:
    status, body = await api.post(
        "/api/v1/executions",
        {"service": service_id, "function": function, "input": input or {}, **fields},
    )
    assert status == 201, body
    return body["id"]


async def until(check, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := await check()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.05)
    return value


async def wait_running(pool, execution_id: str, worker: WorkerProcess) -> str:
    """Waits until the execution runs on `worker`; returns its replica id."""

    async def running() -> str | None:
        row = await pool.fetchrow(
            "SELECT status, worker_id, replica_id FROM executions WHERE id = $1", execution_id
        )
        assert row["status"] in ("created", "in-progress"), (dict(row), worker.output())
        ok = row["status"] == "in-progress" and row["worker_id"] == worker.id
        return row["replica_id"] if ok else None

    return await until(running, 60, f"{execution_id} to run on {worker.id}")


async def attempts_of(pool, execution_id: str) -> list[tuple]:
    rows = await pool.fetch(
        """SELECT attempt, worker_id, status, reason, error->>'type' AS error_type
           FROM execution_attempts WHERE execution_id = $1 ORDER BY attempt""",
        execution_id,
    )
    return [tuple(r.values()) for r in rows]


async def replica_row(pool, replica_id: str) -> dict:
    row = await pool.fetchrow("SELECT * FROM replicas WHERE id = $1", replica_id)
    return dict(row)


# -- 1. SIGTERM: finish within the grace period, hand back the rest --------------------------


async def test_sigterm_finishes_in_grace_and_hands_back_the_rest(
    api, project, pool, redis, workers
):
    service = await deploy(api, project["id"], "graceful")
    worker_a = workers("a", env={"FERRY_SHUTDOWN_GRACE_S": "3"})
    await worker_a.wait_up(pool)
    short = await start(api, service["id"], "nap", {"seconds": 1})
    long = await start(api, service["id"], "stubborn")
    replica_id = await wait_running(pool, short, worker_a)
    await wait_running(pool, long, worker_a)

    worker_a.terminate()

    async def draining() -> bool:
        return (await replica_row(pool, replica_id))["status"] != "ready"

    await until(draining, 10, "the replica to drain")
    later = await start(api, service["id"], "nap", {"seconds": 0})  # not for a leaving worker
    assert await worker_a.wait_exit(30) == 0, worker_a.output()

    # Recorded by the worker itself before it left, not by the reconciler later.
    assert await attempts_of(pool, short) == [(1, worker_a.id, "success", None, None)]
    handed = await pool.fetchrow("SELECT * FROM executions WHERE id = $1", long)
    assert (handed["status"], handed["attempt"]) == ("in-progress", 1)
    assert handed["lease_until"] is None and handed["worker_id"] is None
    assert handed["status_log"][-1]["reason"] == "lost"
    assert await attempts_of(pool, long) == [(1, worker_a.id, "failed", "lost", "WorkerShutdown")]
    assert await pool.fetchval("SELECT status FROM executions WHERE id = $1", later) == "created"
    assert await pool.fetchval("SELECT attempt FROM executions WHERE id = $1", later) == 0
    replica = await replica_row(pool, replica_id)
    assert replica["status"] == "stopped", replica
    # Queued again by the leaving worker: the next one needs no reconciler to find it.
    assert await redis.zscore(queue.queue_name(service["id"]), long) is not None
    assert not await redis.exists(in_progress_key_prefix + long)

    worker_b = workers("b")
    await worker_b.wait_up(pool)
    async with running_reconciler(pool, redis, interval_s=0.2):
        done_long = await wait_for_status(api, long, 60)
        done_later = await wait_for_status(api, later, 60)
    assert (done_long["status"], done_long["output"]) == ("success", {"attempt": 2}), done_long
    assert await attempts_of(pool, long) == [
        (1, worker_a.id, "failed", "lost", "WorkerShutdown"),
        (2, worker_b.id, "success", None, None),
    ]
    assert (done_later["status"], done_later["attempt"]) == ("success", 1)
    assert await attempts_of(pool, later) == [(1, worker_b.id, "success", None, None)]
    assert (await wait_for_status(api, short, 5))["attempt"] == 1  # never run again


# -- 2. a replica dies, its worker lives -----------------------------------------------------


def _agent_pids(replica_id: str) -> list[int]:
    """Processes whose command line runs the agent of this replica (process runtime)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"agent.py") for a in argv) and any(
            a.endswith(replica_id.encode()) for a in argv
        ):
            pids.append(int(entry.name))
    return pids


def _parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def _kill_replica(runtime: str, replica_id: str) -> None:
    if runtime == "process":
        pids = _agent_pids(replica_id)
        # Its executions are forks with the same command line: the agent is their parent.
        agents = [p for p in pids if _parent_of(p) not in pids]
        assert len(agents) == 1, pids
        os.kill(agents[0], signal.SIGKILL)
        return
    import docker

    client = docker.from_env()
    try:
        client.containers.get(f"ferry-{replica_id}").kill()
    finally:
        client.close()


@pytest.fixture(params=["process", pytest.param("docker", marks=pytest.mark.docker)])
def runtime(request) -> str:
    if request.param == "docker":
        _require_docker()
    return request.param


async def test_replica_dying_under_a_living_worker(api, project, pool, redis, workers, runtime):
    rerun = await deploy(api, project["id"], "rerun")
    no_rerun = await deploy(api, project["id"], "no-rerun", on_reset="failed")
    worker = workers("a", env={"FERRY_RUNTIME": runtime})
    await worker.wait_up(pool, timeout_s=60)
    retried = await start(api, rerun["id"], "stubborn")
    failed = await start(api, no_rerun["id"], "stubborn")
    first_replica = await wait_running(pool, retried, worker)
    other_replica = await wait_running(pool, failed, worker)

    _kill_replica(runtime, first_replica)
    _kill_replica(runtime, other_replica)
    done = await wait_for_status(api, retried, 90)
    gone = await wait_for_status(api, failed, 30)

    assert worker.process is not None and worker.process.poll() is None  # the worker lives
    assert (done["status"], done["output"]) == ("success", {"attempt": 2}), done
    # Handed back at once by the worker (not after a lease expiry), then run again.
    assert [(e["status"], e.get("reason")) for e in done["status_log"]] == [
        ("created", None),
        ("in-progress", None),
        ("in-progress", "crashed"),
        ("in-progress", None),
        ("success", None),
    ]
    attempts = await attempts_of(pool, retried)
    assert attempts == [
        (1, worker.id, "failed", "crashed", "AgentLost"),
        (2, worker.id, "success", None, None),
    ]
    second_replica = await pool.fetchval("SELECT replica_id FROM executions WHERE id = $1", retried)
    assert second_replica != first_replica
    dead = await replica_row(pool, first_replica)
    assert dead["status"] == "failed" and "the agent died" in dead["message"], dead

    assert (gone["status"], gone["reason"], gone["attempt"]) == ("failed", "crashed", 1), gone
    assert gone["error"]["type"] == "AgentLost"
    assert await attempts_of(pool, failed) == [(1, worker.id, "failed", "crashed", "AgentLost")]


# -- 3. a PATCH that changes nothing a replica runs ------------------------------------------


async def test_patch_of_scaling_and_limits_keeps_replicas(api, project, pool, workers):
    service = await deploy(api, project["id"], "steady", env={"MODE": "a"})
    worker = workers("a")
    await worker.wait_up(pool)
    running = await start(api, service["id"], "nap", {"seconds": 3})
    replica_id = await wait_running(pool, running, worker)

    patches = [
        {"runtime": {"max_replicas": 3, "min_replicas": 1}},
        {"runtime": {"target_queue_per_replica": 2, "idle_timeout_s": 30}},
        {"execution_timeout_s": 600, "max_attempts": 5, "on_reset": "failed"},
        {"env": {"MODE": "a"}, "runtime": {"memory_mb": 128}},  # the values it has
    ]
    for patch in patches:
        status, body = await api.patch(f"/api/v1/services/{service['id']}", patch)
        assert status == 200, body
        assert body["generation"] == 1, (patch, body)

    done = await wait_for_status(api, running, 60)
    assert (done["status"], done["attempt"]) == ("success", 1), done
    assert await attempts_of(pool, running) == [(1, worker.id, "success", None, None)]
    replica = await replica_row(pool, replica_id)
    assert (replica["status"], replica["generation"]) == ("ready", 1), replica
    after = await wait_for_status(api, await start(api, service["id"], "nap", {"seconds": 0}))
    assert (after["status"], after["attempt"]) == ("success", 1), after
    rows = await pool.fetch(
        "SELECT status, generation FROM replicas WHERE service_id = $1", service["id"]
    )
    # More replicas may have started (min_replicas 1 .. max 3); none was stopped or replaced.
    assert {(r["status"], r["generation"]) for r in rows} <= {("starting", 1), ("ready", 1)}


# -- 4. a drain waits for the executions' own timeouts ---------------------------------------


async def test_rollover_drain_waits_for_execution_timeouts(api, project, pool, workers):
    service = await deploy(api, project["id"], "rolling", runtime={"concurrency": 2})
    worker = workers("a")
    await worker.wait_up(pool)
    finishing = await start(api, service["id"], "nap", {"seconds": 4}, timeout_s=30)
    timing_out = await start(api, service["id"], "stubborn", timeout_s=4)
    old_replica = await wait_running(pool, finishing, worker)
    await wait_running(pool, timing_out, worker)

    status, body = await api.patch(f"/api/v1/services/{service['id']}", {"env": {"V": "2"}})
    assert status == 200 and body["generation"] == 2, body

    finished = await wait_for_status(api, finishing, 60)
    assert (finished["status"], finished["attempt"]) == ("success", 1), finished
    timed_out = await wait_for_status(api, timing_out, 60)

    async def stopped() -> dict | None:
        row = await replica_row(pool, old_replica)
        return row if row["status"] == "stopped" else None

    replica = await until(stopped, 30, "the old replica to stop")
    assert replica["message"] == "rolled over to a new generation"
    # Neither was cut short by the drain: one finished, the other met its own timeout.
    assert await attempts_of(pool, finishing) == [(1, worker.id, "success", None, None)]
    assert (timed_out["status"], timed_out["reason"], timed_out["attempt"]) == (
        "failed",
        "timeout",
        1,
    )
    assert await attempts_of(pool, timing_out) == [(1, worker.id, "failed", "timeout", "Timeout")]


async def test_a_forgotten_worker_registers_again(settings, pool, redis):
    """The reconciler forgets a worker whose heartbeat stopped (an outage of PostgreSQL or
    of the worker's network longer than the lease); back, the worker registers again."""
    from tests.engine_helpers import running_worker

    async with running_worker(settings, pool, redis, runtime="process", heartbeat_s=0.2) as host:
        deadline = time.monotonic() + 30
        while not await pool.fetchval("SELECT count(*) FROM workers WHERE id = $1", host.id):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        await pool.execute("DELETE FROM workers WHERE id = $1", host.id)  # as the reconciler does
        while not await pool.fetchval("SELECT count(*) FROM workers WHERE id = $1", host.id):
            assert time.monotonic() < deadline, "the worker never registered again"
            await asyncio.sleep(0.05)
        row = await pool.fetchrow(
            "SELECT host, runtime, capacity FROM workers WHERE id = $1", host.id
        )
        assert (row["host"], row["runtime"], row["capacity"]) == (
            host.hostname,
            host.runtime.name,
            settings.worker_capacity,
        )
