"""Runtimes against the real thing: subprocesses, and containers of the local Docker engine."""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
import uuid

import pytest

from tests.agent_helpers import RUNNER_IMAGE, Replica, make_spec, new_id, start_replica
from worker.agent_client import AgentInitError
from worker.runtimes import (
    ProcessRuntime,
    ReplicaStartError,
    RuntimeUnavailable,
    detect_runtime,
)

log = logging.getLogger(__name__)


# -- process runtime --------------------------------------------------------------------


async def test_process_runtime_warns_and_passes_env_and_cwd(tmp_path_factory, caplog):
    spec = make_spec(tmp_path_factory.mktemp("proc"), env={"FERRY_TEST_VALUE": "42"})
    with caplog.at_level(logging.WARNING, logger="worker.runtimes.process"):
        replica = await start_replica(ProcessRuntime(), spec)
    try:
        assert "no replica memory, cpu, pids or network limit" in caplog.text
        call = await replica.call("environment", name="FERRY_TEST_VALUE")
        assert call.outcome.output == {"value": "42", "cwd": str(spec.codebase_dir.resolve())}
        assert not replica.runtime.isolated
    finally:
        await replica.close()
    info = await replica.runtime.exit_info(replica.handle)
    assert info is not None and info.exit_code in (0, 2)


async def check_stop_terminates_agent_and_executions(runtime, run_dir) -> Replica:
    replica = await start_replica(runtime, make_spec(run_dir))
    pending = asyncio.create_task(replica.call("sleep", seconds=30))
    await asyncio.sleep(0.3)
    assert await runtime.exit_info(replica.handle) is None
    started = time.monotonic()
    await runtime.stop(replica.handle, grace_s=60)
    # The agent handled SIGTERM and left: nowhere near the 60 s grace, even on a busy machine.
    assert time.monotonic() - started < 30
    outcome = (await asyncio.wait_for(pending, 30)).outcome
    assert outcome.status == "shutdown"  # reported before the agent left: handed back
    replica.conn.close()
    return replica


async def test_process_stop_terminates_agent_and_executions(tmp_path_factory):
    runtime = ProcessRuntime()
    replica = await check_stop_terminates_agent_and_executions(
        runtime, tmp_path_factory.mktemp("term")
    )
    info = await runtime.exit_info(replica.handle)
    assert info.exit_code == 0  # SIGTERM: the agent stopped its executions, reported them, left


def test_detect_runtime_process():
    assert isinstance(detect_runtime("process"), ProcessRuntime)


# -- docker runtime ---------------------------------------------------------------------


def _engine():
    docker = pytest.importorskip("docker")
    try:
        client = docker.from_env(timeout=10)
        client.ping()
    except Exception as exc:
        pytest.skip(f"no Docker engine answers here ({exc})")
    try:
        client.images.get(RUNNER_IMAGE)
    except docker.errors.ImageNotFound:
        client.close()
        pytest.skip(f"image {RUNNER_IMAGE} is not built (see worker/images.py)")
    return client


@pytest.fixture(scope="module")
async def docker_runtime():
    from worker.runtimes.docker import DockerRuntime

    client = _engine()
    runtime = DockerRuntime(client, owner=f"test-{uuid.uuid4().hex[:8]}")
    yield runtime
    await runtime.cleanup_orphans(keep=set())
    await runtime.close()


@pytest.fixture(scope="module")
async def small_container(docker_runtime, tmp_path_factory):
    """64 MB, no network: shared by the tests that leave it serving."""
    spec = make_spec(
        tmp_path_factory.mktemp("ctr"), memory_mb=64, network=False, pids_limit=64, cpu=1.0
    )
    replica = await start_replica(docker_runtime, spec)
    yield replica
    await replica.close()


@pytest.mark.docker
async def test_container_ready_identity_and_figures(small_container: Replica, docker_runtime):
    ready = small_container.ready
    assert ready["pid"] == 1  # the agent is the container's init: it reaps orphans
    assert ready["python"].startswith("3.")
    ids = (await small_container.call("pids")).outcome.output
    assert ids["uid"] == 1000
    assert ids["agent"] == 1
    assert docker_runtime.isolated
    round_trips = []
    for _ in range(30):
        started = time.perf_counter()
        await small_container.call("echo", value=1)
        round_trips.append((time.perf_counter() - started) * 1000)
    log.warning(
        "container start->ready %.0f ms; warm echo round trip median %.1f ms",
        small_container.start_to_ready_ms,
        statistics.median(round_trips),
    )
    assert small_container.start_to_ready_ms > 0  # a figure (logged above), not a promise


@pytest.mark.docker
async def test_container_stop_terminates_agent_and_executions(docker_runtime, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cterm")
    await check_stop_terminates_agent_and_executions(docker_runtime, run_dir)


@pytest.mark.docker
async def test_container_filesystem_is_read_only_except_tmp(small_container: Replica):
    for path in ("/etc/ferry-test", "/ferry/code/written", "/ferry/agent.py"):
        call = await small_container.call("write_file", path=path)
        assert call.outcome.status == "failed", path
        assert call.outcome.error["type"] in ("OSError", "PermissionError"), call.outcome.error
    assert (await small_container.call("write_file", path="/tmp/ok")).outcome.status == "success"


@pytest.mark.docker
async def test_container_without_network_cannot_connect_out(small_container: Replica):
    call = await small_container.call("connect", host="1.1.1.1", port=53)
    assert call.outcome.status == "failed"
    assert call.outcome.error["type"] == "OSError"
    # Refused at once (no route), not a connection that timed out after its 3 s.
    assert "unreachable" in call.outcome.error["message"].lower()


@pytest.mark.docker
async def test_container_out_of_memory(small_container: Replica, docker_runtime):
    call = await small_container.call("allocate", timeout_s=30, megabytes=500)
    assert call.outcome.status == "oom", call.outcome
    assert call.outcome.error["type"] == "OutOfMemory"
    assert (await small_container.call("add", a=2, b=2)).outcome.output == {"sum": 4}
    assert await docker_runtime.exit_info(small_container.handle) is None


@pytest.mark.docker
async def test_container_fork_bomb_is_contained(docker_runtime, tmp_path_factory):
    spec = make_spec(tmp_path_factory.mktemp("bomb"), memory_mb=512, pids_limit=48)
    replica = await start_replica(docker_runtime, spec)
    try:
        call = await replica.call("fork_bomb", timeout_s=20)
        # The pids limit stopped it: its fork failed, long before its 20 s timeout.
        assert call.outcome.status == "failed", call.outcome
        assert call.outcome.error["type"] == "BlockingIOError", call.outcome.error
        for _ in range(3):  # its processes are gone: new executions can fork again
            assert (await replica.call("add", a=1, b=2)).outcome.output == {"sum": 3}
    finally:
        await replica.close()


@pytest.mark.docker
async def test_container_stubborn_fork_bomb_times_out(docker_runtime, tmp_path_factory):
    # Copies that keep retrying the fork: only the agent's timeout kill ends them.
    spec = make_spec(tmp_path_factory.mktemp("stubborn"), memory_mb=256, pids_limit=64)
    replica = await start_replica(docker_runtime, spec)
    try:
        started = time.monotonic()
        call = await replica.call("stubborn_fork_bomb", timeout_s=2, seconds=30)
        assert call.outcome.status == "timeout", call.outcome
        assert time.monotonic() - started < 20  # ended at its timeout, not its 30 s
        assert (await replica.call("add", a=1, b=2)).outcome.output == {"sum": 3}
    finally:
        await replica.close()


@pytest.mark.docker
async def test_container_fork_failure_is_reported(docker_runtime, tmp_path_factory):
    # pids_limit 2: the agent and one execution; a second execution cannot be forked.
    spec = make_spec(tmp_path_factory.mktemp("pids"), pids_limit=2, concurrency=2)
    replica = await start_replica(docker_runtime, spec)
    try:
        sleeper = asyncio.create_task(replica.call("sleep", seconds=1))
        await asyncio.sleep(0.3)
        refused = await replica.call("echo", value=1)
        assert refused.outcome.status == "crashed"
        assert refused.outcome.error["type"] == "ForkFailed"
        assert (await sleeper).outcome.output == 1
        assert (await replica.call("echo", value=2)).outcome.output == 2
    finally:
        await replica.close()


@pytest.mark.docker
async def test_container_init_failure_and_exit_info(docker_runtime, tmp_path_factory):
    spec = make_spec(tmp_path_factory.mktemp("cbroken"), codebase="broken", functions={})
    with pytest.raises(AgentInitError) as caught:
        await start_replica(docker_runtime, spec, timeout_s=20)
    assert caught.value.error["message"] == "boom at import"


@pytest.mark.docker
async def test_container_shutdown_and_stop(docker_runtime, tmp_path_factory):
    replica = await start_replica(docker_runtime, make_spec(tmp_path_factory.mktemp("life")))
    assert (await replica.call("add", a=1, b=1)).outcome.output == {"sum": 2}
    await replica.conn.shutdown()
    info = await replica.wait_exit(timeout_s=5)
    assert info.exit_code == 0
    assert not info.oom_killed
    await docker_runtime.stop(replica.handle, grace_s=2)
    await docker_runtime.stop(replica.handle, grace_s=2)  # idempotent
    gone = await docker_runtime.exit_info(replica.handle)
    assert gone is not None and gone.exit_code is None


@pytest.mark.docker
async def test_container_cleanup_orphans(docker_runtime, tmp_path_factory):
    from worker.runtimes.docker import DockerRuntime

    # Its own owner, so that the cleanup cannot touch the other tests' containers.
    runtime = DockerRuntime(docker_runtime.client, owner=f"test-{uuid.uuid4().hex[:8]}")
    orphan = await runtime.start(make_spec(tmp_path_factory.mktemp("orphan")))
    kept = await runtime.start(make_spec(tmp_path_factory.mktemp("kept")))
    try:
        removed = await runtime.cleanup_orphans(keep={kept.replica_id})
        assert removed == [orphan.replica_id]
        assert (await runtime.exit_info(orphan)).detail == "the container is gone"
        assert await runtime.exit_info(kept) is None
    finally:
        await runtime.stop(kept, grace_s=0)
        await runtime.stop(orphan, grace_s=0)


@pytest.mark.docker
async def test_container_missing_image_fails_fast(docker_runtime, tmp_path_factory):
    spec = make_spec(tmp_path_factory.mktemp("noimg"), image=f"ferry/absent:{new_id()}")
    started = time.monotonic()
    with pytest.raises(ReplicaStartError, match="never pulls"):
        await docker_runtime.start(spec)
    assert time.monotonic() - started < 20  # refused at once: no pull was tried


@pytest.mark.docker
def test_detect_runtime_prefers_docker():
    _engine().close()
    runtime = detect_runtime("auto")
    assert runtime.name == "docker"
    assert isinstance(detect_runtime("docker"), type(runtime))


def test_detect_runtime_docker_without_engine(monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    with pytest.raises(RuntimeUnavailable, match="no Docker engine"):
        detect_runtime("docker")
    assert isinstance(detect_runtime("auto"), ProcessRuntime)


def test_publish_agent_copies_the_agent_into_the_data_dir(tmp_path):
    """A worker in a container bind-mounts the agent from its data directory, which the
    engine's host has at the same path; the installed package's path it does not."""
    from worker.runtimes import AGENT_PATH
    from worker.runtimes.docker import publish_agent

    first = publish_agent(tmp_path)
    assert first.parent == tmp_path / "agent"
    assert first.read_bytes() == AGENT_PATH.read_bytes()
    assert publish_agent(tmp_path) == first  # the same content: the same file, not a new one
    first.write_text("changed")
    assert publish_agent(tmp_path).read_bytes() == AGENT_PATH.read_bytes()  # repaired
    assert [p.name for p in first.parent.iterdir()] == [first.name]
