"""Redis lost and back: accepted executions run once it returns, processes reconnect by
themselves, `ferry up` restarts its embedded Redis, and a retry keeps its place in line.

Each test that stops Redis runs its own server, so the session's is never touched."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
import time
import tomllib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer
from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix, job_key_prefix

from core import queue
from core.embedded import EmbeddedRedis
from core.outages import UNAVAILABLE
from core.settings import Settings
from scheduler.reconciler import Reconciler
from service.app import create_app
from tests.conftest import Api, make_zip
from tests.engine_helpers import running_reconciler, running_worker, wait_for_status
from tests.process_helpers import WorkerProcess
from tests.test_durability import CODE, MANIFEST, deploy, start_nap, wait_running_on
from tests.test_up import _free_port, ferry_up


@dataclass
class OwnRedis:
    server: EmbeddedRedis
    settings: Settings  # the session's, with this Redis
    redis: ArqRedis
    api: Api

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer would: no AOF flush, no goodbye."""
        assert self.server.pid is not None
        os.kill(self.server.pid, signal.SIGKILL)
        assert not self.server.alive() or _wait(lambda: not self.server.alive())


def _wait(predicate, timeout_s: float = 10) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return True


@pytest.fixture
async def own_redis(settings, pool, admin_token) -> AsyncIterator[OwnRedis]:
    directory = Path(tempfile.mkdtemp(prefix="fr-"))  # short: a unix socket path < 107 bytes
    server = EmbeddedRedis(directory / "redis")
    url = server.start()
    own = settings.model_copy(update={"redis_url": url})
    redis = await queue.connect_redis(url)
    app = create_app(own, pool, redis, own.database_url)
    try:
        async with TestClient(TestServer(app)) as client:
            yield OwnRedis(server, own, redis, Api(client, admin_token))
    finally:
        await redis.aclose()
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.asynccontextmanager
async def reconciling(pool, redis, interval_s: float = 0.2) -> AsyncIterator[None]:
    """The reconciler as the scheduler runs it: rounds that meet an outage are retried."""
    reconciler = Reconciler(pool, redis)

    async def loop() -> None:
        while True:
            with contextlib.suppress(*UNAVAILABLE):
                await reconciler.run_once()
            await asyncio.sleep(interval_s)

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def attempt_rows(pool, execution_ids: list[str]) -> dict[str, list[str]]:
    rows = await pool.fetch(
        """SELECT execution_id, status FROM execution_attempts
           WHERE execution_id = ANY($1::text[]) ORDER BY execution_id, attempt""",
        execution_ids,
    )
    found: dict[str, list[str]] = {i: [] for i in execution_ids}
    for row in rows:
        found[row["execution_id"]].append(row["status"])
    return found


# -- 1. accepted while Redis is down -------------------------------------------------------


async def test_executions_posted_while_redis_is_down_are_accepted_and_run(project, pool, own_redis):
    api = own_redis.api
    service = await deploy(api, project["id"], name="accepted")
    own_redis.server.stop()

    body = {
        "service": service["id"],
        "function": "nap",
        "input": {"seconds": 0.1},
        "idempotency_key": "order-17",
    }
    status, first = await api.post("/api/v1/executions", body)
    assert status == 201, first
    assert first["status"] == "created"
    status, again = await api.post("/api/v1/executions", body)  # the client retries
    assert status == 200, again
    assert again["id"] == first["id"]
    status, batch = await api.post(
        "/api/v1/executions/batch",
        {"executions": [{"service": service["id"], "function": "nap", "input": {"seconds": 0}}]},
    )
    assert status == 201, batch
    status, rerun = await api.post(f"/api/v1/executions/{first['id']}/rerun")
    assert status == 201, rerun
    status, cancelled = await api.post(f"/api/v1/executions/{rerun['id']}/terminate")
    assert status == 202, cancelled
    assert cancelled["status"] == "terminated"
    # A read that needs Redis says which server is missing.
    status, error = await api.get(f"/api/v1/services/{service['id']}/status")
    assert status == 503, error
    assert "Redis" in error["error"]["message"]

    accepted = [first["id"], batch["items"][0]["id"]]
    rows = await pool.fetch("SELECT id, status FROM executions ORDER BY created_at")
    assert [(r["id"], r["status"]) for r in rows] == [
        (accepted[0], "created"),
        (accepted[1], "created"),
        (rerun["id"], "terminated"),
    ]

    # The worker and the reconciler start while Redis is still down, and carry on once
    # it is back, with nobody restarting them.
    async with (
        running_worker(own_redis.settings, pool, own_redis.redis, runtime="process"),
        reconciling(pool, own_redis.redis),
    ):
        await asyncio.sleep(1.0)
        own_redis.server.start()
        done = [await wait_for_status(api, i, 60) for i in accepted]
    assert [(d["status"], d["attempt"]) for d in done] == [("success", 1), ("success", 1)], done
    assert await pool.fetchval("SELECT count(*) FROM executions") == 3


# -- 2. Redis SIGKILLed under running processes --------------------------------------------


async def test_processes_reconnect_after_redis_is_killed(project, pool, own_redis, tmp_path):
    api = own_redis.api
    service = await deploy(
        api, project["id"], name="killed", runtime={"max_replicas": 1, "concurrency": 3}
    )
    worker = WorkerProcess(own_redis.settings, tmp_path, "w").start()
    scheduler = WorkerProcess(own_redis.settings, tmp_path, "s", command="scheduler")
    scheduler.env.update(FERRY_METRICS_PORT_SCHEDULER="0", FERRY_RECONCILE_INTERVAL_S="0.3")
    scheduler.start()
    try:
        await worker.wait_up(pool)
        deadline = time.monotonic() + 30
        while "scheduler up" not in scheduler.output():
            assert time.monotonic() < deadline, scheduler.output()
            await asyncio.sleep(0.05)
        ids = [(await start_nap(api, service["id"], 1.0))["id"] for _ in range(9)]
        await wait_running_on(pool, ids[0], worker)

        own_redis.kill()  # with three running and six queued
        await asyncio.sleep(2.0)  # running ones end meanwhile and record their outcome
        own_redis.server.restart()
        # Accepted while Redis was down, too.
        ids.append((await start_nap(api, service["id"], 0.1))["id"])

        done = [await wait_for_status(api, i, 90) for i in ids]
        assert [d["status"] for d in done] == ["success"] * len(ids), (
            [(d["id"], d["status"], d["error"]) for d in done],
            worker.output(),
            scheduler.output(),
        )
        # Every run is an attempt on record: nothing ran twice unseen.
        attempts = await attempt_rows(pool, ids)
        for execution in done:
            statuses = attempts[execution["id"]]
            assert len(statuses) == execution["attempt"], (execution, statuses)
            assert statuses[-1] == "success", (execution, statuses)
        # Reconnected, not restarted, and said so in a few lines rather than a flood.
        assert worker.process.poll() is None, worker.output()
        assert scheduler.process.poll() is None, scheduler.output()
        for process in (worker, scheduler):
            text = process.log_path.read_text(errors="replace")
            assert "reconnected" in text, text[-4000:]
            assert text.count("Traceback") == 0, text[-4000:]
            assert text.count("unavailable") <= 12, text[-4000:]
    finally:
        worker.stop()
        scheduler.stop()


# -- 3. `ferry up` restarts its embedded servers --------------------------------------------


def _server_of(name: str, data_dir: Path) -> psutil.Process:
    """The embedded server's main process: redis-server, or PostgreSQL's postmaster."""
    if name == "PostgreSQL":
        return psutil.Process(
            int((data_dir / "postgres" / "postmaster.pid").read_text().split()[0])
        )
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or ())
        if "redis" in cmdline and str(data_dir) in cmdline and "ferry" not in cmdline:
            return proc
    raise AssertionError(f"no redis-server under {data_dir}")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["Redis", "PostgreSQL"])
def test_ferry_up_restarts_a_killed_embedded_server(name, tmp_path):
    data_dir = Path(tempfile.mkdtemp(prefix="fu-"))
    config_home = tmp_path / "config"
    log = tmp_path / "ferry-up.log"
    try:
        with ferry_up(data_dir, config_home, _free_port(), log) as up:
            up.wait_ready()
            token = tomllib.loads((config_home / "ferry" / "config.toml").read_text())["token"]
            http = httpx.Client(
                base_url=up.url, headers={"Authorization": f"Bearer {token}"}, timeout=30
            )
            project = http.post("/api/v1/projects", json={"name": "up-servers"}).json()
            archive = make_zip({"ferry.yaml": yaml.safe_dump(MANIFEST), "main.py": CODE})
            package = http.post(
                "/api/v1/packages",
                data={"project": project["id"]},
                files={"codebase": ("code.zip", archive, "application/zip")},
            )
            assert package.status_code == 201, package.text
            service = http.post(
                "/api/v1/services",
                json={
                    "project": project["id"],
                    "name": "napper",
                    "package": package.json()["id"],
                    "runtime": {"max_replicas": 1, "memory_mb": 128},
                },
            )
            assert service.status_code == 201, service.text

            def run_one(key: str) -> dict:
                """As a careful client does: retry a 503 with the same idempotency key."""
                body = {
                    "service": service.json()["id"],
                    "function": "nap",
                    "input": {"seconds": 0},
                    "idempotency_key": key,
                }
                deadline = time.monotonic() + 60
                while True:
                    with contextlib.suppress(httpx.TransportError):
                        created = http.post("/api/v1/executions", json=body)
                        if created.status_code != 503:
                            break
                    assert time.monotonic() < deadline, up.output()
                    time.sleep(0.5)
                assert created.status_code == 201, created.text
                waited = http.get(f"/api/v1/executions/{created.json()['id']}/wait?timeout=60")
                return waited.json()

            assert run_one("before")["status"] == "success", up.output()

            victim = _server_of(name, data_dir)
            victim.kill()
            victim.wait(10)
            killed_at = time.monotonic()
            done = run_one("after")
            recovered_s = time.monotonic() - killed_at
            assert done["status"] == "success", (done, up.output())
            assert recovered_s < 60, up.output()
            assert _server_of(name, data_dir).pid != victim.pid
            text = log.read_text(errors="replace")
            assert f"{name} (embedded) died; restarting it" in text, up.output()
            # The processes reconnected: none of them was restarted.
            assert " exited with " not in text, up.output()
            assert up.child_roles() == {"api", "scheduler", "worker"}, up.output()
            executions = http.get("/api/v1/executions").json()["items"]
            assert len(executions) == 2, executions
            print(f"\nferry up: {name} SIGKILLed to a new execution's success: {recovered_s:.1f} s")
            assert up.stop(whole_group=False) == 0, up.output()
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


# -- 4. a retry keeps its place in line ----------------------------------------------------


async def test_a_retry_after_a_lost_worker_goes_before_the_backlog(
    api, project, settings, pool, redis, workers
):
    service = await deploy(
        api, project["id"], name="inline", runtime={"max_replicas": 1, "concurrency": 1}
    )
    worker_a = workers("a")
    await worker_a.wait_up(pool)
    first = await start_nap(api, service["id"], 1.0)
    await wait_running_on(pool, first["id"], worker_a)
    worker_a.kill()
    backlog = [(await start_nap(api, service["id"], 0))["id"] for _ in range(5)]

    # The lease runs out; one round hands the execution back and queues it again.
    reconciler = Reconciler(pool, redis)
    deadline = time.monotonic() + 30
    while (await reconciler.run_once()).retried == 0:
        assert time.monotonic() < deadline, "the lease never expired"
        await asyncio.sleep(0.2)

    async with running_worker(settings, pool, redis, runtime="process"):
        async with running_reconciler(pool, redis):
            done = [await wait_for_status(api, i, 60) for i in [first["id"], *backlog]]
    assert [d["status"] for d in done] == ["success"] * 6, done
    claimed = await pool.fetch(
        """SELECT execution_id, attempt, started_at FROM execution_attempts
           WHERE execution_id = ANY($1::text[]) ORDER BY started_at""",
        [first["id"], *backlog],
    )
    order = [(r["execution_id"], r["attempt"]) for r in claimed]
    assert order[:2] == [(first["id"], 1), (first["id"], 2)], order
    assert [execution_id for execution_id, _ in order[2:]] == backlog, order


# -- 5. jobs whose end Redis never heard of --------------------------------------------------


async def test_the_reconciler_tidies_jobs_left_marked_running(api, project, pool, redis):
    service = await deploy(api, project["id"], name="tidy")
    ended, handed_back = [(await start_nap(api, service["id"], 0))["id"] for _ in range(2)]
    queue_key = queue.queue_name(service["id"])
    assert await redis.zcard(queue_key) == 2
    # As a worker leaves them when Redis died between its outcome and arq's bookkeeping:
    # one ended, one handed back for a retry, both still marked running in Redis.
    for execution_id in (ended, handed_back):
        await redis.set(in_progress_key_prefix + execution_id, b"1")
    await pool.execute(
        "UPDATE executions SET status = 'success', attempt = 1, finished_at = now() WHERE id = $1",
        ended,
    )
    await pool.execute(
        """UPDATE executions SET status = 'in-progress', attempt = 1, lease_until = NULL,
               updated_at = now() - interval '1 minute' WHERE id = $1""",
        handed_back,
    )

    await Reconciler(pool, redis).run_once()

    assert not await redis.exists(in_progress_key_prefix + ended, job_key_prefix + ended)
    assert await redis.zscore(queue_key, ended) is None
    # Queued afresh, and still first in line (its creation time is its score).
    assert not await redis.exists(in_progress_key_prefix + handed_back)
    assert await redis.exists(job_key_prefix + handed_back)
    created_at = await pool.fetchval("SELECT created_at FROM executions WHERE id = $1", handed_back)
    assert await redis.zscore(queue_key, handed_back) == int(created_at.timestamp() * 1000)


async def test_job_states_tell_queued_running_and_missing_apart(redis):
    # What the reconciler reads, for thousands of executions a round, in one round trip.
    assert await queue.enqueue_execution(redis, "svc-states", "exe-queued")
    await redis.set(job_key_prefix + "exe-running", b"job")
    await redis.set(in_progress_key_prefix + "exe-running", b"1")
    await redis.set(in_progress_key_prefix + "exe-running-no-job", b"1")
    states = await queue.job_states(
        redis, ["exe-queued", "exe-running", "exe-missing", "exe-running-no-job"]
    )
    assert states == queue.JOB_QUEUED + queue.JOB_RUNNING + queue.JOB_MISSING + queue.JOB_RUNNING
    assert await queue.job_states(redis, []) == ""
