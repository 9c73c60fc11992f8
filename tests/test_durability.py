"""Durability: workers that die (`kill -9`), a Redis that loses its queues, attempts that run
out. Workers run as `ferry worker` subprocesses so they can be killed like a host dying;
the reconciler runs in this process with a short interval.

Measured figures (kill to recovered) are printed: `pytest -s tests/test_durability.py`.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import make_zip
from tests.engine_helpers import running_reconciler, running_worker, wait_for_status

REPO = Path(__file__).resolve().parent.parent
LEASE_S = 3.0
HEARTBEAT_S = 0.5

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


class WorkerProcess:
    """`python -m ferry worker` in its own session, so its whole process group can be killed."""

    def __init__(self, settings, log_dir: Path, name: str) -> None:
        self.id = f"{name}-{uuid.uuid4().hex[:6]}"
        self.log_path = log_dir / f"{self.id}.log"
        self.env = {
            **os.environ,
            "FERRY_DATABASE_URL": settings.database_url,
            "FERRY_REDIS_URL": settings.redis_url,
            "FERRY_DATA_DIR": str(settings.data_dir),
            "FERRY_SECRET_KEY": settings.secret_key,
            "FERRY_RUNTIME": "process",
            "FERRY_LEASE_S": str(LEASE_S),
            "FERRY_HEARTBEAT_S": str(HEARTBEAT_S),
            "FERRY_WORKER_ID": self.id,
            "FERRY_METRICS_PORT_WORKER": "0",
            "FERRY_LOG_FORMAT": "text",
        }
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "ferry", "worker"],
                cwd=REPO,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    async def wait_up(self, pool, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while not await pool.fetchval("SELECT 1 FROM workers WHERE id = $1", self.id):
            assert self.process is not None and self.process.poll() is None, self.output()
            assert time.monotonic() < deadline, f"worker {self.id} did not come up\n{self.output()}"
            await asyncio.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL the worker's process group: the host died, nothing cleans up."""
        assert self.process is not None
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""


@pytest.fixture
def workers(settings, tmp_path):
    """Start workers with `workers("a")`; every one is stopped (or killed) at the end."""
    started: list[WorkerProcess] = []

    def start(name: str) -> WorkerProcess:
        worker = WorkerProcess(settings, tmp_path, name).start()
        started.append(worker)
        return worker

    yield start
    for worker in started:
        try:
            worker.stop()
        finally:
            if worker.process is not None and worker.process.poll() is None:
                os.killpg(worker.process.pid, signal.SIGKILL)


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
        """SELECT attempt, worker_id, status, reason, finished_at IS NOT NULL AS finished
           FROM execution_attempts WHERE execution_id = $1 ORDER BY attempt""",
        execution_id,
    )
    return [dict(r) for r in rows]


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
        done = await wait_for_status(api, created["id"], 60)
        recovered_s = time.monotonic() - killed_at

    print(f"\n[process] kill -9 to success, the survivor already up: {recovered_s:.1f} s")
    assert done["status"] == "success" and done["attempt"] == 2, done
    assert recovered_s < LEASE_S + 4


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
        done = await asyncio.gather(
            wait_for_status(api, first["id"], 30), wait_for_status(api, second["id"], 30)
        )
        failed_s = time.monotonic() - killed_at

    print(
        f"\n[process] kill -9 to failed (no attempt left): {failed_s:.1f} s (lease {LEASE_S:g} s)"
    )
    assert (done[0]["status"], done[0]["reason"]) == ("failed", "max-attempts"), done[0]
    assert (done[1]["status"], done[1]["reason"]) == ("failed", "lost"), done[1]
    for execution in done:
        assert execution["attempt"] == 1
        assert execution["error"]["type"] == "WorkerLost"
        assert worker.id in execution["error"]["message"]
        assert execution["finished_at"] is not None
        attempts = await attempts_of(pool, execution["id"])
        assert [(a["attempt"], a["status"], a["reason"]) for a in attempts] == [
            (1, "failed", "lost")
        ]
    assert done[1]["max_attempts"] == 3  # attempts were left: on_reset alone stopped it
    # The last renewal was up to one heartbeat before the kill.
    assert LEASE_S - HEARTBEAT_S - 0.2 <= failed_s < LEASE_S + 5


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

        waiter = asyncio.create_task(wait_for_status(api, created["id"], 3))
        await asyncio.sleep(0.3)
        asked = time.monotonic()
        status, body = await api.post(f"/api/v1/executions/{created['id']}/terminate")
        assert status == 202 and body["status"] == "terminated", body
        done = await waiter
        woke_s = time.monotonic() - asked

    assert done["status"] == "terminated"
    assert woke_s < 1.0, f"the waiter answered {woke_s:.1f} s after the termination"
