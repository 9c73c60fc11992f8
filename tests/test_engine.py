"""The execution engine end to end: the HTTP API, a real worker with real replicas (agent
subprocesses or Docker containers), real PostgreSQL and Redis.

Each test deploys a package from tests/engine_fixtures, runs executions through the API
and checks what the API reports. Figures (cold start, terminate latency) are printed:
`pytest -s tests/test_engine.py` shows them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import make_zip
from tests.engine_helpers import running_worker, wait_for_status
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
    assert done["output"] == {
        "text": "HELLO",
        "execution_id": created["id"],
        "attempt": 1,
        "pid": done["output"]["pid"],
    }
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
    assert 2000 <= timed_out["duration_ms"] < 4000
    assert elapsed < 4.0
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

    assert bomb["status"] == "failed", bomb
    assert bomb_s < 5 + 2.5
    assert after_bomb["status"] == "success", after_bomb
    assert len(replicas) == 1 and after_bomb["attempt"] == 1


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
    assert latency < 2.0
    assert [e["status"] for e in done["status_log"]] == ["created", "in-progress", "terminated"]
    assert done["attempt"] == 1 and done["output"] is None
    assert done["duration_ms"] < 5000
    assert again == 409  # nothing left to terminate
    assert after["status"] == "success"  # the replica lives on
