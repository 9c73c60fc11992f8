"""The Docker runtime's warm pool (worker/runtimes/pool.py) against a real engine: replicas
that take a pre-started container over, containers that die while they wait, the clean-up
of what a worker left, and a worker whose new service's replica comes from its pool."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from tests.agent_helpers import RUNNER_IMAGE, make_spec, start_replica
from tests.test_engine import _require_docker, deploy, engine, manifest_of, run
from worker.runtimes import ReplicaSpec

pytestmark = pytest.mark.docker

# A new service's runtime as core/service_spec.py defaults it: the shape the pool keeps.
DEFAULT_SHAPE = {"memory_mb": 512, "cpu": 1.0, "pids_limit": 256, "network": True}


@pytest.fixture
async def pooled(tmp_path_factory):
    """A Docker runtime of its own owner (the clean-up cannot touch other tests' containers)
    whose pool is started by the test; everything it made is removed afterwards."""
    from worker.runtimes.docker import DockerRuntime

    _require_docker()
    runtime = DockerRuntime(owner=f"test-pool-{uuid.uuid4().hex[:8]}")
    yield runtime
    await runtime.cleanup_orphans(keep=set())
    await runtime.close()


def default_spec(tmp_path_factory, **overrides) -> ReplicaSpec:
    return make_spec(tmp_path_factory.mktemp("rep"), **{**DEFAULT_SHAPE, **overrides})


def waiting_ids(runtime) -> list[str]:
    return [c.id for waiting in runtime.pool.waiting.values() for c in waiting]


async def filled(runtime, size: int, timeout_s: float = 30) -> list[str]:
    """The ids of the pool's containers once `size` wait with their agent listening (a
    worker starts its pool once it is up)."""
    deadline = time.monotonic() + timeout_s
    while True:
        waiting_lists = runtime.pool.waiting.values() if runtime.pool is not None else []
        containers = [c for waiting in waiting_lists for c in waiting]
        if len(containers) >= size and all(c.listening() for c in containers):
            return [c.id for c in containers]
        assert time.monotonic() < deadline, f"the pool did not fill to {size} in {timeout_s} s"
        await asyncio.sleep(0.05)


def container_state(runtime, container_id: str) -> str:
    """`running`, `exited`, ... or `gone`."""
    import docker.errors

    try:
        return runtime.client.api.inspect_container(container_id)["State"]["Status"]
    except docker.errors.NotFound:
        return "gone"


async def test_replica_takes_a_pool_container_and_sees_its_env(pooled, tmp_path_factory):
    await pooled.start_warm_pool(1, RUNNER_IMAGE, tmp_path_factory.mktemp("pool"))
    [waiting] = await filled(pooled, 1)
    spec = default_spec(tmp_path_factory, env={"FERRY_TEST_VALUE": "42"})
    replica = await start_replica(pooled, spec)
    try:
        assert replica.handle.warm and replica.handle.ref == waiting
        assert waiting not in waiting_ids(pooled)  # taken for good
        assert replica.ready["pid"] == 1
        call = await replica.call("environment", name="FERRY_TEST_VALUE")
        assert call.outcome.output == {"value": "42", "cwd": "/ferry/code"}
        ids = (await replica.call("pids")).outcome.output
        assert ids["uid"] == 1000  # the same lock-down as a replica's own container
        for path in ("/ferry/code/written", "/ferry/agent.py"):
            assert (await replica.call("write_file", path=path)).outcome.status == "failed"
        # The container's own environment stays generic: the service's is in config.json.
        env = pooled.client.api.inspect_container(waiting)["Config"]["Env"]
        assert not [e for e in env if e.startswith("FERRY_TEST_VALUE=")]
    finally:
        await replica.close()
    assert container_state(pooled, waiting) == "gone"  # removed with its replica
    assert not replica.handle.backend.directory.exists()


async def test_two_services_never_share_a_pool_container(pooled, tmp_path_factory):
    await pooled.start_warm_pool(2, RUNNER_IMAGE, tmp_path_factory.mktemp("pool"))
    first_pool = set(await filled(pooled, 2))
    one = await start_replica(pooled, default_spec(tmp_path_factory, service_id="svc-one"))
    two = await start_replica(pooled, default_spec(tmp_path_factory, service_id="svc-two"))
    try:
        assert one.handle.warm and two.handle.warm
        assert {one.handle.ref, two.handle.ref} == first_pool
        await one.close()
        assert container_state(pooled, one.handle.ref) == "gone"
        assert (await two.call("add", a=1, b=2)).outcome.output == {"sum": 3}
        # Refilled with new containers: neither of those two ever waits in the pool again.
        refilled = set(await filled(pooled, 2))
        assert not refilled & first_pool
        three = await start_replica(pooled, default_spec(tmp_path_factory, service_id="svc-3"))
        try:
            assert three.handle.warm and three.handle.ref in refilled
        finally:
            await three.close()
    finally:
        await one.close()
        await two.close()


async def test_a_dead_pool_container_is_replaced_and_never_handed_out(pooled, tmp_path_factory):
    await pooled.start_warm_pool(1, RUNNER_IMAGE, tmp_path_factory.mktemp("pool"))
    [first] = await filled(pooled, 1)
    # Killed while it waits: the upkeep notices, removes it and starts another.
    await asyncio.to_thread(pooled.client.api.kill, first)
    deadline = time.monotonic() + 60
    while waiting_ids(pooled) in ([], [first]) or container_state(pooled, first) != "gone":
        assert time.monotonic() < deadline, "the killed pool container was not replaced"
        await asyncio.sleep(0.1)
    [second] = await filled(pooled, 1)
    assert second != first
    # Killed just before a replica asks: the replica starts a container of its own.
    await asyncio.to_thread(pooled.client.api.kill, second)
    replica = await start_replica(pooled, default_spec(tmp_path_factory))
    try:
        assert not replica.handle.warm
        assert replica.handle.ref not in (first, second)
        assert (await replica.call("add", a=2, b=2)).outcome.output == {"sum": 4}
        assert container_state(pooled, second) == "gone"
    finally:
        await replica.close()


async def test_only_replicas_of_the_pool_shape_and_a_plain_env_take_one(pooled, tmp_path_factory):
    await pooled.start_warm_pool(1, RUNNER_IMAGE, tmp_path_factory.mktemp("pool"))
    [waiting] = await filled(pooled, 1)
    other_shape = default_spec(tmp_path_factory, memory_mb=256)
    # PYTHONPATH is read as the interpreter starts: the pool's agent started without it.
    startup_env = default_spec(tmp_path_factory, env={"PYTHONPATH": "/ferry/code/lib"})
    for spec in (other_shape, startup_env):
        replica = await start_replica(pooled, spec)
        try:
            assert not replica.handle.warm
            assert replica.handle.run_dir == spec.run_dir
        finally:
            await replica.close()
    assert waiting_ids(pooled) == [waiting]


async def test_pool_size_zero_is_the_plain_start(pooled, tmp_path_factory):
    await pooled.start_warm_pool(0, RUNNER_IMAGE, tmp_path_factory.mktemp("pool"))
    assert pooled.pool is None
    spec = default_spec(tmp_path_factory, env={"FERRY_TEST_VALUE": "7"})
    replica = await start_replica(pooled, spec)
    try:
        assert not replica.handle.warm and replica.handle.run_dir == spec.run_dir
        call = await replica.call("environment", name="FERRY_TEST_VALUE")
        assert call.outcome.output == {"value": "7", "cwd": "/ferry/code"}
        env = pooled.client.api.inspect_container(replica.handle.ref)["Config"]["Env"]
        assert "FERRY_TEST_VALUE=7" in env  # the container's environment, as ever
    finally:
        await replica.close()


async def test_cleanup_removes_untaken_pool_containers_and_keeps_taken_ones(
    pooled, tmp_path_factory
):
    from worker.runtimes.docker import DockerRuntime

    await pooled.start_warm_pool(2, RUNNER_IMAGE, tmp_path_factory.mktemp("pool"))
    await filled(pooled, 2)
    replica = await start_replica(pooled, default_spec(tmp_path_factory))
    taken = replica.handle.ref
    untaken = set(await filled(pooled, 2))  # refilled: two wait again
    directories = {c.id: c.directory for waiting in pooled.pool.waiting.values() for c in waiting}
    # The worker dies (its pool is never closed); the next one of the same owner starts.
    next_worker = DockerRuntime(pooled.client, owner=pooled.owner)
    removed = await next_worker.cleanup_orphans(keep={replica.handle.replica_id})
    assert len(removed) == len(untaken) == 2
    assert all(name.startswith("pool-") for name in removed)
    for container_id in untaken:
        assert container_state(pooled, container_id) == "gone"
        assert not directories[container_id].exists()
    assert container_state(pooled, taken) == "running"  # its replica lives on
    assert (await replica.call("add", a=1, b=1)).outcome.output == {"sum": 2}
    # Once that replica is no longer kept, its container goes too, reported by its id.
    replica.conn.close()
    assert await next_worker.cleanup_orphans(keep=set()) == [replica.handle.replica_id]
    assert container_state(pooled, taken) == "gone"
    assert not replica.handle.backend.directory.exists()


# -- a worker ---------------------------------------------------------------------------


GREETING_CODE = """
import os

AT_IMPORT = os.environ.get("GREETING")


def greet():
    return {"at_import": AT_IMPORT, "now": os.environ.get("GREETING"),
            "secret_length": len(os.environ.get("API_KEY", ""))}
"""


async def test_worker_starts_a_new_service_from_its_pool(api, project, settings, pool, redis):
    _require_docker()
    function = {
        "name": "greet",
        "inputs": [],
        "outputs": [
            {"name": "at_import", "type": "json"},
            {"name": "now", "type": "json"},
            {"name": "secret_length", "type": "json"},
        ],
    }
    _, service = await deploy(
        api,
        project["id"],
        {"main.py": GREETING_CODE},
        manifest_of([function]),
        runtime={"max_replicas": 1},
        env={"GREETING": "hello"},
        secrets={"API_KEY": "s3cr3t-value"},
    )
    async with engine(settings, pool, redis, "docker", warm_pool_size=1) as host:
        pool_at_start = await filled(host.runtime, 1, timeout_s=60)
        done = await run(api, service["id"], "greet")
        replica_id, replica = next(iter(host.replicas.items()))
        taken = replica.handle.ref
        assert taken in pool_at_start
        row = await pool.fetchrow(
            "SELECT message, cold_start_ms FROM replicas WHERE id = $1", replica_id
        )
        refilled = await filled(host.runtime, 1, timeout_s=60)
        owner = host.runtime.owner
    assert done["status"] == "success", done
    assert done["output"] == {"at_import": "hello", "now": "hello", "secret_length": 12}
    assert row["message"].endswith("from the warm pool") and row["cold_start_ms"] is not None
    # The worker shut down: its replica's container and its waiting one are gone.
    from worker.runtimes.docker import DockerRuntime

    looker = DockerRuntime(owner=owner)
    try:
        for container_id in (taken, *refilled):
            assert container_state(looker, container_id) == "gone"
    finally:
        await looker.close()
