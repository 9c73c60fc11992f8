"""The execution engine end to end: the HTTP API, a real worker with real replicas (agent
subprocesses or Docker containers), real PostgreSQL and Redis.

Each test deploys a package from tests/engine_fixtures, runs executions through the API
and checks what the API reports. Figures (cold start, terminate latency) are printed:
`pytest -s tests/test_engine.py` shows them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import make_zip
from tests.engine_helpers import running_worker, wait_for_status, wait_parked
from worker.host import WorkerHost

FIXTURES = Path(__file__).parent / "engine_fixtures"
RUNNER_IMAGE = "ferry/runner:py3"
# Containers of these tests carry this owner label: a worker's start-up clean-up then
# leaves alone the containers of anything else sharing the engine.
DOCKER_OWNER = f"ferry-engine-tests-{uuid.uuid4().hex[:8]}"

_docker_problem: list[str] = []


def _docker_unavailable() -> str | None:
    """Why docker tests cannot run here, or None (checked once per session)."""
    if not _docker_problem:
        try:
            import docker

            client = docker.from_env(timeout=10)
            try:
                client.ping()
                client.images.get(RUNNER_IMAGE)
                _docker_problem.append("")
            finally:
                client.close()
        except ImportError:
            _docker_problem.append("the docker SDK is not installed")
        except Exception as exc:
            name = type(exc).__name__
            if name == "ImageNotFound":
                _docker_problem.append(
                    f"{RUNNER_IMAGE} is not built (`ferry image build` builds it)"
                )
            else:
                _docker_problem.append(f"no Docker engine answers here ({exc})")
    return _docker_problem[0] or None


def _require_docker() -> None:
    problem = _docker_unavailable()
    if problem:
        pytest.skip(problem)


@pytest.fixture(params=["process", pytest.param("docker", marks=pytest.mark.docker)])
def runtime(request) -> str:
    if request.param == "docker":
        _require_docker()
    return request.param


@pytest.fixture(scope="module", autouse=True)
async def _remove_test_containers():
    yield
    if _docker_unavailable() is None:
        from worker.runtimes.docker import DockerRuntime

        leftover = DockerRuntime(owner=DOCKER_OWNER)
        removed = await leftover.cleanup_orphans(keep=set())
        await leftover.close()
        assert not removed, f"containers outlived their worker: {removed}"


@contextlib.asynccontextmanager
async def engine(
    settings, pool, redis, runtime: str, **overrides: Any
) -> AsyncIterator[WorkerHost]:
    """A worker in this process, with the runtime asked for."""
    if runtime == "process":
        async with running_worker(settings, pool, redis, runtime="process", **overrides) as host:
            yield host
        return
    from worker.runtimes.docker import DockerRuntime

    host = WorkerHost(
        settings.model_copy(update={"runtime": "docker", **overrides}),
        pool,
        redis,
        runtime=DockerRuntime(owner=DOCKER_OWNER),
    )
    stop = asyncio.Event()
    task = asyncio.create_task(host.run(stop))
    try:
        yield host
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


# -- deploying and running ----------------------------------------------------------------


def fixture_code(*names: str) -> dict[str, str]:
    return {name: (FIXTURES / name).read_text() for name in names}


def manifest_of(
    functions: list[dict[str, Any]], *, entry_point: str = "main.py", **module: Any
) -> dict[str, Any]:
    return {
        "name": "engine-test",
        "modules": [{"name": "main", "entry_point": entry_point, **module, "functions": functions}],
    }


def fn(name: str, *inputs: tuple[str, str], outputs: list[str] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "inputs": [{"name": n, "type": t} for n, t in inputs],
        "outputs": [{"name": o, "type": "json"} for o in outputs or []],
    }


MAIN_FUNCTIONS = [
    fn("work", ("text", "string")),
    fn("fail", ("message", "string")),
    fn("nap", ("seconds", "number")),
    fn("show_secret"),
    fn("allocate", ("mb", "integer")),
    fn("fork_bomb", ("seconds", "number")),
    fn("network"),
    fn("chatter", ("lines", "integer"), ("width", "integer")),
    fn("whoami"),
]


async def deploy(
    api,
    project_id: str,
    files: dict[str, str],
    manifest: dict[str, Any],
    *,
    name: str = "svc",
    runtime: dict[str, Any] | None = None,
    **fields: Any,
) -> tuple[dict, dict]:
    """Upload a package (named after the service) and deploy it; returns (package, service)."""
    manifest = {**manifest, "name": f"pkg-{name}"}
    archive = make_zip({"ferry.yaml": yaml.safe_dump(manifest), **files})
    status, package = await api.upload(project_id, archive)
    assert status == 201, package
    body = {
        "project": project_id,
        "name": name,
        "package": package["id"],
        "runtime": runtime or {},
        **fields,
    }
    status, service = await api.post("/api/v1/services", body)
    assert status == 201, service
    return package, service


async def deploy_main(api, project_id: str, **kwargs: Any) -> dict:
    _, service = await deploy(
        api, project_id, fixture_code("main.py"), manifest_of(MAIN_FUNCTIONS), **kwargs
    )
    return service


async def start(
    api, service_id: str, function: str, input: dict | None = None, **fields: Any
) -> dict:
    status, body = await api.post(
        "/api/v1/executions",
        {"service": service_id, "function": function, "input": input or {}, **fields},
    )
    assert status == 201, body
    return body


async def run(
    api,
    service_id: str,
    function: str,
    input: dict | None = None,
    wait_s: float = 60,
    **fields: Any,
) -> dict:
    """Start an execution (`fields` go into its body, e.g. `timeout_s`) and wait for its end."""
    created = await start(api, service_id, function, input, **fields)
    return await wait_for_status(api, created["id"], wait_s)


async def get(api, path: str) -> Any:
    status, body = await api.get(path)
    assert status == 200, body
    return body


async def poll(
    check: Callable[[], Awaitable[Any]], timeout_s: float, what: str, interval_s: float = 0.05
) -> Any:
    """Call `check` until it returns something truthy; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(interval_s)


async def wait_in_progress(api, execution_id: str, timeout_s: float = 60) -> dict:
    async def running() -> dict | None:
        body = await get(api, f"/api/v1/executions/{execution_id}")
        assert body["status"] in ("created", "in-progress"), body
        return body if body["status"] == "in-progress" else None

    return await poll(running, timeout_s, f"{execution_id} to be in progress")


async def logs_of(api, execution_id: str) -> list[tuple[str, str]]:
    body = await get(api, f"/api/v1/executions/{execution_id}/logs?limit=1000")
    return [(line["stream"], line["text"]) for line in body["items"]]


async def replicas_of(api, service_id: str) -> list[dict]:
    return (await get(api, f"/api/v1/services/{service_id}/status"))["replicas"]


# -- 1. the happy path ----------------------------------------------------------------------


async def test_execute_output_progress_logs_context(api, project, settings, pool, redis, runtime):
    service = await deploy_main(api, project["id"], runtime={"memory_mb": 128, "max_replicas": 1})
    async with engine(settings, pool, redis, runtime):
        began = time.monotonic()
        created = await start(api, service["id"], "work", {"text": "hello"})
        assert created["status"] == "created"

        async def half_way() -> dict | None:
            body = await get(api, f"/api/v1/executions/{created['id']}")
            assert body["status"] in ("created", "in-progress"), body
            return body if body["progress"]["percent"] == 50 else None

        seen = await poll(half_way, 60, "progress 50 while in progress", interval_s=0.02)
        assert seen["status"] == "in-progress"
        assert seen["progress"] == {"percent": 50, "message": "half"}
        done = await wait_for_status(api, created["id"], 60)
        print(
            f"\n[{runtime}] first execution (cold start included): {time.monotonic() - began:.2f} s"
        )

    assert done["status"] == "success", done
    assert done["reason"] is None and done["error"] is None
    pid = done["output"].pop("pid")
    assert done["output"] == {"text": "HELLO", "execution_id": created["id"], "attempt": 1}
    # A child forked for the execution: neither this process nor (in a container) the agent,
    # which is the container's pid 1.
    assert isinstance(pid, int) and pid > 1 and pid != os.getpid(), pid
    assert done["attempt"] == 1
    assert done["progress"]["percent"] == 100
    assert [e["status"] for e in done["status_log"]] == ["created", "in-progress", "success"]
    assert done["started_at"] and done["finished_at"]
    assert 1500 <= done["duration_ms"] < 30_000

    lines = [line for line in await logs_of(api, created["id"]) if line[0] != "system"]
    assert lines[:2] == [("stdout", "stdout: starting hello"), ("stderr", "stderr: warming up")]
    assert len(lines) == 3, lines
    assert lines[2][0] == "stderr" and "WARNING" in lines[2][1]
    assert lines[2][1].endswith("logging: half way")


# -- 2. a class loaded once per replica ----------------------------------------------------


async def test_class_loaded_once_across_executions(api, project, settings, pool, redis, runtime):
    manifest = manifest_of(
        [fn("compute", ("x", "integer"))],
        entry_point="model.py",
        class_name="Model",
        init_inputs=[
            {"name": "factor", "type": "integer"},
            {"name": "label", "type": "string", "default": "m"},
        ],
    )
    _, service = await deploy(
        api,
        project["id"],
        fixture_code("model.py"),
        manifest,
        runtime={"memory_mb": 128, "concurrency": 4, "max_replicas": 1},
        init_inputs={"factor": 7, "label": "seven"},
    )
    async with engine(settings, pool, redis, runtime):
        created = [await start(api, service["id"], "compute", {"x": x}) for x in range(20)]
        done = await asyncio.gather(*(wait_for_status(api, c["id"], 60) for c in created))

    assert [d["status"] for d in done] == ["success"] * 20, [d["error"] for d in done]
    outputs = [d["output"] for d in done]
    assert [o["value"] for o in outputs] == [7 * x for x in range(20)]
    assert {o["label"] for o in outputs} == {"seven"}
    loaded_in = {o["loaded_in"] for o in outputs}
    assert len(loaded_in) == 1, f"the class was loaded in {len(loaded_in)} processes"
    # Fork per execution: each ran in its own child of the process that loaded the class,
    # so state an execution changes never leaks into the next.
    assert {o["calls"] for o in outputs} == {1}
    assert not loaded_in & {o["ran_in"] for o in outputs}


async def test_a_service_that_reuses_processes(api, project, settings, pool, redis, runtime):
    manifest = manifest_of(
        [fn("compute", ("x", "integer"))],
        entry_point="model.py",
        class_name="Model",
        init_inputs=[{"name": "factor", "type": "integer"}],
    )
    _, service = await deploy(
        api,
        project["id"],
        fixture_code("model.py"),
        manifest,
        runtime={"memory_mb": 128, "concurrency": 1, "max_replicas": 1},
        init_inputs={"factor": 3},
    )
    status, patched = await api.patch(
        f"/api/v1/services/{service['id']}", {"runtime": {"executions_per_process": 4}}
    )
    assert status == 200, patched
    assert (patched["runtime"]["executions_per_process"], patched["generation"]) == (4, 2)
    async with engine(settings, pool, redis, runtime):
        done = [await run(api, service["id"], "compute", {"x": x}) for x in range(10)]

    assert [d["status"] for d in done] == ["success"] * 10, [d["error"] for d in done]
    outputs = [d["output"] for d in done]
    assert [o["value"] for o in outputs] == [3 * x for x in range(10)]
    # One process ran four executions in a row, carrying what they changed, then another.
    assert [o["calls"] for o in outputs] == [1, 2, 3, 4, 1, 2, 3, 4, 1, 2]
    ran_in = [o["ran_in"] for o in outputs]
    assert len(set(ran_in[:4])) == len(set(ran_in[4:8])) == 1 and ran_in[0] != ran_in[4]


# -- 3. failures, limits and secrets --------------------------------------------------------


async def test_exception_and_timeout(api, project, settings, pool, redis, runtime):
    service = await deploy_main(api, project["id"], runtime={"memory_mb": 128, "max_replicas": 1})
    async with engine(settings, pool, redis, runtime):
        failed = await run(api, service["id"], "fail", {"message": "bad input: 42"})

        began = time.monotonic()
        timed_out = await run(api, service["id"], "nap", {"seconds": 30}, timeout_s=2)
        elapsed = time.monotonic() - began
        print(f"\n[{runtime}] a 2 s timeout ended the execution after {elapsed:.2f} s")

    assert (failed["status"], failed["reason"]) == ("failed", "exception"), failed
    assert failed["error"]["type"] == "ValueError"
    assert failed["error"]["message"] == "bad input: 42"
    traceback = failed["error"]["traceback"]
    assert traceback.startswith("Traceback (most recent call last)")
    assert "in fail" in traceback and "in inner" in traceback
    assert traceback.rstrip().endswith("ValueError: bad input: 42")
    assert "agent.py" not in traceback  # the agent's own frames are left out
    assert failed["output"] is None and failed["attempt"] == 1

    assert (timed_out["status"], timed_out["reason"]) == ("failed", "timeout"), timed_out
    assert timed_out["timeout_s"] == 2
    assert timed_out["error"]["type"] == "Timeout"
    # Not before its 2 s, and killed then, long before the 30 s it asked for (the margin
    # is for a loaded machine recording it late).
    assert 2000 <= timed_out["duration_ms"] < 15_000
    assert timed_out["attempt"] == 1  # a timeout is the function's fault: not retried


async def test_secret_values_are_masked_in_logs(api, project, settings, pool, redis, runtime):
    secret = "s3cr3t-Value-9c1f"
    service = await deploy_main(
        api, project["id"], runtime={"memory_mb": 128}, secrets={"API_KEY": secret}
    )
    assert service["secrets"] == ["API_KEY"]
    async with engine(settings, pool, redis, runtime):
        done = await run(api, service["id"], "show_secret")

    assert done["status"] == "success", done
    assert done["output"] == {"length": len(secret)}  # the function saw the real value
    lines = await logs_of(api, done["id"])
    assert ("stdout", "the key is ********") in lines
    assert not [line for line in lines if secret in line[1]]
    stored = await pool.fetch("SELECT text FROM execution_logs WHERE execution_id = $1", done["id"])
    assert stored and not [r for r in stored if secret in r["text"]]
    status, body = await api.get(f"/api/v1/services/{service['id']}")
    assert secret not in str(body)


@pytest.mark.docker
async def test_docker_memory_pids_and_network_limits(api, project, settings, pool, redis):
    _require_docker()
    small = await deploy_main(
        api,
        project["id"],
        name="small",
        runtime={"memory_mb": 64, "network": False, "max_replicas": 1},
    )
    # Default memory (512 MB) and pids limit (256): the bomb runs into the pids limit.
    bombed = await deploy_main(
        api, project["id"], name="bombed", runtime={"max_replicas": 1}, max_attempts=1
    )
    async with engine(settings, pool, redis, "docker"):
        oom = await run(api, small["id"], "allocate", {"mb": 300})
        fits = await run(api, small["id"], "allocate", {"mb": 8})
        net = await run(api, small["id"], "network")

        await run(api, bombed["id"], "nap", {"seconds": 0})  # warm: time the bomb alone
        began = time.monotonic()
        bomb = await run(api, bombed["id"], "fork_bomb", {"seconds": 30}, timeout_s=5)
        bomb_s = time.monotonic() - began
        print(f"\n[docker] fork bomb ended ({bomb['reason']}) after {bomb_s:.2f} s")
        after_bomb = await run(api, bombed["id"], "nap", {"seconds": 0}, wait_s=20)
        replicas = await replicas_of(api, bombed["id"])

    assert (oom["status"], oom["reason"]) == ("failed", "oom"), oom
    assert oom["error"]["type"] == "OutOfMemory"
    assert oom["attempt"] == 1
    # Only the execution's process was killed: the replica serves on.
    assert fits["status"] == "success" and fits["output"] == {"allocated_mb": 8}

    assert net["status"] == "success", net
    assert net["output"]["interfaces"] == ["lo"]
    assert net["output"]["error"] and "OSError" in net["output"]["error"]

    # Its copies never fork past the pids limit; the 5 s timeout kills its process group,
    # long before the 30 s the copies would run.
    assert (bomb["status"], bomb["reason"]) == ("failed", "timeout"), bomb
    assert 5000 <= bomb["duration_ms"] < 20_000, bomb_s
    assert after_bomb["status"] == "success", after_bomb
    assert len(replicas) == 1 and after_bomb["attempt"] == 1


@pytest.mark.docker
async def test_docker_fork_bomb_in_a_small_container_times_out(api, project, settings, pool, redis):
    _require_docker()
    service = await deploy_main(
        api, project["id"], runtime={"memory_mb": 64, "max_replicas": 1}, max_attempts=1
    )
    async with engine(settings, pool, redis, "docker"):
        await run(api, service["id"], "nap", {"seconds": 0})
        began = time.monotonic()
        bomb = await run(api, service["id"], "fork_bomb", {"seconds": 30}, timeout_s=5)
        bomb_s = time.monotonic() - began
        print(f"\n[docker] fork bomb in 64 MB: {bomb['reason']} after {bomb_s:.2f} s")
        after = await run(api, service["id"], "nap", {"seconds": 0}, wait_s=30)

    assert (bomb["status"], bomb["reason"]) == ("failed", "timeout"), bomb
    assert 5000 <= bomb["duration_ms"] < 20_000, bomb_s
    assert after["status"] == "success", after


# -- 4. terminate --------------------------------------------------------------------------


async def test_terminate_while_running(api, project, settings, pool, redis, runtime):
    service = await deploy_main(api, project["id"], runtime={"memory_mb": 128})
    async with engine(settings, pool, redis, runtime):
        created = await start(api, service["id"], "nap", {"seconds": 60})
        await wait_in_progress(api, created["id"])
        await asyncio.sleep(0.2)  # the function is sleeping, not starting

        asked = time.monotonic()
        status, body = await api.post(f"/api/v1/executions/{created['id']}/terminate")
        assert status == 202, body
        done = await wait_for_status(api, created["id"], 10)
        latency = time.monotonic() - asked
        print(f"\n[{runtime}] terminate: terminal {latency * 1000:.0f} ms after the request")

        again, _ = await api.post(f"/api/v1/executions/{created['id']}/terminate")
        after = await run(api, service["id"], "nap", {"seconds": 0})

    assert done["status"] == "terminated", done
    # Acted on at once (SIGTERM, SIGKILL after a second): far from the 60 s it would nap,
    # with a margin for a loaded machine.
    assert latency < 10
    assert [e["status"] for e in done["status_log"]] == ["created", "in-progress", "terminated"]
    assert done["attempt"] == 1 and done["output"] is None
    assert done["duration_ms"] < 15_000
    assert again == 409  # nothing left to terminate
    assert after["status"] == "success"  # the replica lives on


# -- 5. scale from zero, back to zero, pause ------------------------------------------------


async def test_scale_from_zero_and_back(api, project, settings, pool, redis, runtime):
    service = await deploy_main(
        api,
        project["id"],
        runtime={"memory_mb": 128, "min_replicas": 0, "max_replicas": 1, "idle_timeout_s": 2},
    )
    async with engine(settings, pool, redis, runtime):
        await asyncio.sleep(1)  # a few placement rounds: nothing to run, nothing started
        assert await replicas_of(api, service["id"]) == []

        began = time.monotonic()
        first = await run(api, service["id"], "nap", {"seconds": 0})
        first_s = time.monotonic() - began
        replicas = await replicas_of(api, service["id"])
        assert [r["status"] for r in replicas] == ["ready"], replicas
        cold_ms = await pool.fetchval(
            "SELECT cold_start_ms FROM replicas WHERE id = $1", replicas[0]["id"]
        )

        warm_began = time.monotonic()
        warm = await run(api, service["id"], "nap", {"seconds": 0})
        warm_s = time.monotonic() - warm_began

        idle_from = time.monotonic()

        async def scaled_to_zero() -> bool:
            return await replicas_of(api, service["id"]) == []

        await poll(scaled_to_zero, 2 + 10, "the idle replica to stop", interval_s=0.2)
        idle_s = time.monotonic() - idle_from
        stopped = await pool.fetchrow(
            "SELECT status, message, stopped_at FROM replicas WHERE id = $1", replicas[0]["id"]
        )

        again_began = time.monotonic()
        second = await run(api, service["id"], "nap", {"seconds": 0})
        second_s = time.monotonic() - again_began
        replicas_now = await replicas_of(api, service["id"])

    print(
        f"\n[{runtime}] scale from zero: first execution {first_s * 1000:.0f} ms "
        f"(replica cold start {cold_ms} ms), warm {warm_s * 1000:.0f} ms; "
        f"back to zero {idle_s:.1f} s after the last execution (idle timeout 2 s); "
        f"second cold start {second_s * 1000:.0f} ms"
    )
    assert first["status"] == warm["status"] == second["status"] == "success"
    assert cold_ms is not None and cold_ms > 0
    assert (stopped["status"], stopped["message"]) == ("stopped", "scaled down")
    # PostgreSQL's times: the replica stayed its idle timeout (2 s) after the last
    # execution, and went within a few placement rounds after that.
    idle_for = (stopped["stopped_at"] - datetime.fromisoformat(warm["finished_at"])).total_seconds()
    assert 2 <= idle_for < 2 + 10, idle_for
    assert len(replicas_now) == 1 and replicas_now[0]["id"] != replicas[0]["id"]


async def test_pause_stops_replicas_and_holds_executions(
    api, project, settings, pool, redis, runtime
):
    service = await deploy_main(
        api, project["id"], runtime={"memory_mb": 128, "min_replicas": 1, "max_replicas": 1}
    )
    async with engine(settings, pool, redis, runtime):

        async def warm_replica() -> bool:
            return [r["status"] for r in await replicas_of(api, service["id"])] == ["ready"]

        await poll(warm_replica, 30, "min_replicas to start a replica")

        status, paused = await api.post(f"/api/v1/services/{service['id']}/pause")
        assert status == 200 and paused["status"] == "paused", paused

        async def no_replicas() -> bool:
            return await replicas_of(api, service["id"]) == []

        await poll(no_replicas, 15, "pausing to stop the replica", interval_s=0.1)

        held = await start(api, service["id"], "nap", {"seconds": 0})
        await asyncio.sleep(2)
        still = await get(api, f"/api/v1/executions/{held['id']}")
        paused_status = await get(api, f"/api/v1/services/{service['id']}/status")

        status, resumed = await api.post(f"/api/v1/services/{service['id']}/resume")
        assert status == 200 and resumed["status"] == "active", resumed
        done = await wait_for_status(api, held["id"], 30)

    assert still["status"] == "created", still
    assert paused_status["replicas"] == [] and paused_status["queue_length"] == 1
    assert paused_status["desired_replicas"] == 0
    assert done["status"] == "success" and done["attempt"] == 1


# -- 6. rolling over to a new revision with executions in flight ----------------------------

ROLLOUT_CODE = """
import time

REVISION = {revision}


def step(i):
    time.sleep(0.3)
    return {{"i": i, "revision": REVISION}}
"""


async def test_rollout_with_executions_in_flight(api, project, settings, pool, redis, runtime):
    manifest = manifest_of([fn("step", ("i", "integer"))])
    package, service = await deploy(
        api,
        project["id"],
        {"main.py": ROLLOUT_CODE.format(revision=1)},
        manifest,
        runtime={"memory_mb": 128, "concurrency": 4, "max_replicas": 1},
    )
    archive = make_zip(
        {
            "ferry.yaml": yaml.safe_dump({**manifest, "name": package["name"]}),
            "main.py": ROLLOUT_CODE.format(revision=2),
        }
    )
    status, revision_2 = await api.upload(
        None, archive, path=f"/api/v1/packages/{package['id']}/revisions"
    )
    assert status == 201, revision_2
    async with engine(settings, pool, redis, runtime):
        status, batch = await api.post(
            "/api/v1/executions/batch",
            {
                "executions": [
                    {"service": service["id"], "function": "step", "input": {"i": i}}
                    for i in range(30)
                ]
            },
        )
        assert status == 201, batch
        ids = [e["id"] for e in batch["items"]]

        async def some_done() -> bool:
            counts = await get(api, f"/api/v1/executions/counters?service={service['id']}")
            return counts["success"] >= 4

        await poll(some_done, 60, "the first executions to finish")
        status, patched = await api.patch(
            f"/api/v1/services/{service['id']}", {"package_revision": 2}
        )
        assert status == 200, patched
        assert (patched["package_revision"], patched["generation"]) == (2, 2)

        done = await asyncio.gather(*(wait_for_status(api, i, 60) for i in ids))

        async def only_generation_2() -> list[dict] | None:
            replicas = await replicas_of(api, service["id"])
            generations = {r["generation"] for r in replicas}
            return replicas if generations == {2} else None

        # Rolled out (what `ferry deploy` waits for): from then on only the new code runs.
        # An execution posted while the old replica still drains may run on either.
        replicas = await poll(only_generation_2, 30, "the old replica to drain", interval_s=0.1)
        after = await run(api, service["id"], "step", {"i": 99})

    assert [d["status"] for d in done] == ["success"] * 30, [d["error"] for d in done]
    assert [d["output"]["i"] for d in done] == list(range(30))
    assert {d["attempt"] for d in done} == {1}  # none was cut short and retried
    revisions = [d["output"]["revision"] for d in done]
    assert revisions.count(1) >= 4  # those finished before the patch
    assert set(revisions) <= {1, 2}
    print(f"\n[{runtime}] rollout: {revisions.count(1)} on revision 1, {revisions.count(2)} on 2")
    # Each ran on a replica of the generation whose code answered.
    rows = await pool.fetch(
        """SELECT e.id, r.generation FROM executions e JOIN replicas r ON r.id = e.replica_id
           WHERE e.id = ANY($1::text[])""",
        ids,
    )
    generation_of = {r["id"]: r["generation"] for r in rows}
    assert [generation_of[d["id"]] for d in done] == revisions
    assert after["status"] == "success" and after["output"]["revision"] == 2
    assert all(r["status"] in ("ready", "starting") for r in replicas)
    old = await pool.fetch(
        "SELECT status, message FROM replicas WHERE service_id = $1 AND generation = 1",
        service["id"],
    )
    assert [(r["status"], r["message"]) for r in old] == [
        ("stopped", "rolled over to a new generation")
    ]


async def test_terminating_a_queued_execution_wakes_its_waiters(api, project):
    # No worker: the execution stays `created` until it is terminated.
    service = await deploy_main(api, project["id"])
    created = await start(api, service["id"], "nap", {"seconds": 0})
    # A long wait: only the wake-up can answer it before the test's own bound.
    waiter = asyncio.create_task(wait_for_status(api, created["id"], 120))
    await wait_parked(api, created["id"])
    assert not waiter.done()

    asked = time.monotonic()
    status, body = await api.post(f"/api/v1/executions/{created['id']}/terminate")
    assert status == 202 and body["status"] == "terminated", body
    done = await asyncio.wait_for(waiter, 30)
    woke_s = time.monotonic() - asked
    print(f"\nterminate woke its waiter after {woke_s * 1000:.0f} ms")

    assert done["status"] == "terminated"
    assert [e["status"] for e in done["status_log"]] == ["created", "terminated"]


# -- 7. logs truncated at their limits --------------------------------------------------------


async def stored_logs(pool, execution_id: str) -> list[tuple[int, str, str]]:
    rows = await pool.fetch(
        "SELECT seq, stream, text FROM execution_logs WHERE execution_id = $1 ORDER BY seq",
        execution_id,
    )
    return [(r["seq"], r["stream"], r["text"]) for r in rows]


async def test_logs_are_truncated_at_the_line_and_byte_limits(api, project, settings, pool, redis):
    service = await deploy_main(api, project["id"], runtime={"max_replicas": 1})
    async with engine(settings, pool, redis, "process", log_max_lines=5):
        by_lines = await run(api, service["id"], "chatter", {"lines": 50, "width": 20})
    async with engine(settings, pool, redis, "process", log_max_bytes=100):
        by_bytes = await run(api, service["id"], "chatter", {"lines": 50, "width": 30})

    assert by_lines["status"] == by_bytes["status"] == "success"
    marker = (
        "[log truncated: the limit of {lines} lines / {bytes} bytes per execution was "
        "reached; later lines are dropped]"
    )
    # Four lines, then the marker as the fifth: nothing past it was stored.
    lines = await stored_logs(pool, by_lines["id"])
    assert lines == [
        *((n + 1, "stdout", f"line {n:04d} " + "x" * 10) for n in range(4)),
        (5, "system", marker.format(lines=5, bytes=settings.log_max_bytes)),
    ]
    assert await logs_of(api, by_lines["id"]) == [(s, t) for _, s, t in lines]
    # 30-byte lines: three fit in 100 bytes, the fourth would not.
    lines = await stored_logs(pool, by_bytes["id"])
    assert lines == [
        *((n + 1, "stdout", f"line {n:04d} " + "x" * 20) for n in range(3)),
        (4, "system", marker.format(lines=settings.log_max_lines, bytes=100)),
    ]
    live = await redis.xrange(f"ferry:logs:{by_lines['id']}")
    assert len(live) == 5  # the live stream stops at the marker too


# -- 8. terminate through the heartbeat when the pub/sub message is lost ----------------------


async def test_terminate_reaches_the_worker_through_its_heartbeat(
    api, project, settings, pool, redis, runtime
):
    from core import states

    service = await deploy_main(api, project["id"], runtime={"memory_mb": 128, "max_replicas": 1})
    async with engine(settings, pool, redis, runtime, heartbeat_s=0.5):
        created = await start(api, service["id"], "nap", {"seconds": 60})
        await wait_in_progress(api, created["id"])
        # What the API does, minus the pub/sub message: only the flag in PostgreSQL.
        assert await states.request_termination(pool, created["id"]) is not None
        done = await wait_for_status(api, created["id"], 60)
        after = await run(api, service["id"], "nap", {"seconds": 0})

    assert done["status"] == "terminated", done
    assert [e["status"] for e in done["status_log"]] == ["created", "in-progress", "terminated"]
    assert done["attempt"] == 1 and done["output"] is None
    assert done["duration_ms"] < 30_000  # ended by the flag, not by the 60 s nap
    assert after["status"] == "success" and after["attempt"] == 1


# -- 9. Redis flushed while executions run -----------------------------------------------------


async def test_flushall_while_executions_run(api, project, settings, pool, redis, runtime):
    from tests.engine_helpers import running_reconciler

    service = await deploy_main(
        api, project["id"], runtime={"memory_mb": 128, "max_replicas": 1, "concurrency": 2}
    )
    async with engine(settings, pool, redis, runtime), running_reconciler(pool, redis):
        await run(api, service["id"], "nap", {"seconds": 0})  # warm
        running = [await start(api, service["id"], "nap", {"seconds": 2}) for _ in range(2)]
        for execution in running:
            await wait_in_progress(api, execution["id"])
        queued = [await start(api, service["id"], "nap", {"seconds": 0.1}) for _ in range(3)]
        await redis.flushall()  # queues, arq's own keys, log streams: all gone
        done = await asyncio.gather(*(wait_for_status(api, e["id"], 90) for e in running + queued))
        after = await run(api, service["id"], "nap", {"seconds": 0})

    assert [d["status"] for d in done] == ["success"] * 5, [d["error"] for d in done]
    # The running ones finished where they ran; the queued ones were queued again.
    assert {d["attempt"] for d in done} == {1}
    assert after["status"] == "success"


# -- 10. a cron tick's time reaches the function ----------------------------------------------


async def test_trigger_fire_time_reaches_the_context(api, project, settings, pool, redis):
    from scheduler.cron import CronLoop

    service = await deploy_main(api, project["id"], runtime={"max_replicas": 1})
    status, trigger = await api.post(
        "/api/v1/triggers",
        {
            "project": project["id"],
            "name": "tick",
            "type": "cron",
            "input": {},
            "operation": {"type": "function", "service": service["id"], "function": "whoami"},
            "spec": {"cron": "* * * * * *"},
        },
    )
    assert status == 201, trigger
    await pool.execute(
        "UPDATE triggers SET next_fire_at = date_trunc('second', now()) WHERE id = $1",
        trigger["id"],
    )
    assert await CronLoop(pool, redis, "solo", 100).run_once() == 1
    row = await pool.fetchrow(
        "SELECT id, trigger_fire_time FROM executions WHERE trigger_id = $1", trigger["id"]
    )  # one tick: no scheduler runs on after this round
    async with engine(settings, pool, redis, "process"):
        done = await wait_for_status(api, row["id"], 60)

    assert done["status"] == "success", done
    assert done["output"] == {
        "execution_id": row["id"],
        "trigger_id": trigger["id"],
        "trigger_fire_time": row["trigger_fire_time"].isoformat(),
    }
