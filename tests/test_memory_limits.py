"""One execution that runs out of memory fails alone: each execution's process has its own
memory bound inside its replica's, so the hog gets `oom` while the executions next to it
finish and the replica serves on. Through `ferry worker` subprocesses, on the process
runtime and on Docker where an engine and the runner image are available.
"""

from __future__ import annotations

import asyncio

import pytest
import yaml

from tests.conftest import make_zip
from tests.engine_helpers import wait_for_status
from tests.test_engine import _require_docker
from worker.runtimes.base import execution_memory_mb

MEMORY_MB = 128

CODE = """
import resource
import time


def nap(seconds):
    time.sleep(seconds)
    return {"slept": seconds}


def hog(mb):
    # Never let a mistake turn this loose on the host: only under a bound well below `mb`.
    soft, _ = resource.getrlimit(resource.RLIMIT_DATA)
    if soft == resource.RLIM_INFINITY or soft >= mb * 1024 * 1024:
        raise RuntimeError(f"refusing to allocate {mb} MB without a smaller memory bound")
    chunks = [b"\\x01" * (1024 * 1024) for _ in range(mb)]  # touched, so really resident
    return {"allocated_mb": len(chunks)}
"""

MANIFEST = {
    "name": "pkg-memory",
    "modules": [
        {
            "name": "main",
            "entry_point": "main.py",
            "functions": [
                {"name": "nap", "inputs": [{"name": "seconds", "type": "number"}]},
                {"name": "hog", "inputs": [{"name": "mb", "type": "integer"}]},
            ],
        }
    ],
}


@pytest.fixture(params=["process", pytest.param("docker", marks=pytest.mark.docker)])
def runtime(request) -> str:
    if request.param == "docker":
        _require_docker()
    return request.param


async def start(api, service_id: str, function: str, input: dict) -> str:
    status, body = await api.post(
        "/api/v1/executions", {"service": service_id, "function": function, "input": input}
    )
    assert status == 201, body
    return body["id"]


async def test_the_hog_alone_fails_oom(api, project, pool, workers, runtime):
    archive = make_zip({"ferry.yaml": yaml.safe_dump(MANIFEST), "main.py": CODE})
    status, package = await api.upload(project["id"], archive)
    assert status == 201, package
    body = {
        "project": project["id"],
        "name": "memory",
        "package": package["id"],
        "runtime": {"memory_mb": MEMORY_MB, "concurrency": 4, "max_replicas": 1},
        "max_attempts": 1,
    }
    status, service = await api.post("/api/v1/services", body)
    assert status == 201, service
    worker = workers("a", env={"FERRY_RUNTIME": runtime})
    await worker.wait_up(pool, timeout_s=60)

    siblings = [await start(api, service["id"], "nap", {"seconds": 2}) for _ in range(3)]

    async def all_running() -> bool:
        count = await pool.fetchval(
            "SELECT count(*) FROM executions WHERE id = ANY($1) AND status = 'in-progress'",
            siblings,
        )
        return count == len(siblings)

    for _ in range(1200):  # 60 s for the first replica to start (image, cold start)
        if await all_running():
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail(f"the siblings never ran\n{worker.output()}")
    hog = await start(api, service["id"], "hog", {"mb": 4 * MEMORY_MB})

    hogged = await wait_for_status(api, hog, 60)
    done = [await wait_for_status(api, i, 60) for i in siblings]
    after = await wait_for_status(api, await start(api, service["id"], "nap", {"seconds": 0}), 60)

    assert (hogged["status"], hogged["reason"], hogged["attempt"]) == ("failed", "oom", 1), hogged
    assert hogged["error"]["type"] == "OutOfMemory"
    assert f"{execution_memory_mb(MEMORY_MB)} MB" in hogged["error"]["message"]
    for sibling in done:
        assert (sibling["status"], sibling["attempt"]) == ("success", 1), str(
            (sibling["reason"], sibling["error"], hogged["error"])
        )
    assert (after["status"], after["attempt"]) == ("success", 1), after
    # One replica served them all: it never died, nor was it replaced.
    replicas = await pool.fetch(
        "SELECT id, status FROM replicas WHERE service_id = $1", service["id"]
    )
    assert [r["status"] for r in replicas] == ["ready"], [dict(r) for r in replicas]
    ran_on = await pool.fetch(
        "SELECT DISTINCT replica_id FROM executions WHERE service_id = $1", service["id"]
    )
    assert [r["replica_id"] for r in ran_on] == [replicas[0]["id"]]
