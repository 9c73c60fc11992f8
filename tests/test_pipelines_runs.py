"""Pipelines across changes and crashes: a PATCH while a run is in flight, a rollout of a
node's service mid-run, a worker and a scheduler killed with SIGKILL mid-run (nothing lost,
nothing duplicated), and a chain on the Docker runtime."""

from __future__ import annotations

import asyncio
import collections
import time

import pytest

from tests.engine_helpers import running_reconciler, running_worker
from tests.pipeline_helpers import (
    create_pipeline,
    deploy_flow,
    execute,
    executions_of,
    link,
    node,
    node_states,
    wait_run,
)
from tests.process_helpers import WorkerProcess


async def _until(check, timeout_s: float, what: str, interval_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while True:
        result = await check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(interval_s)


async def _running(pool, run_id: str, node_id: str, count: int = 1) -> bool:
    return (
        await pool.fetchval(
            """SELECT count(*) FROM executions WHERE pipeline_execution_id = $1
                 AND pipeline_node = $2 AND status = 'in-progress' AND lease_until IS NOT NULL""",
            run_id,
            node_id,
        )
        >= count
    )


async def test_a_patch_while_running_lets_the_old_run_finish_on_its_version(
    api, project, settings, pool, redis, tmp_path
):
    gate = tmp_path / "gate"
    gate.write_text("closed")
    await deploy_flow(api, project["id"])
    pipeline = await create_pipeline(
        api,
        project["id"],
        "versioned",
        [node("wait", "hold", path=str(gate)), node("bump", "add", plus=1)],
        [link("wait", "n", "bump", "n")],
    )
    async with running_worker(settings, pool, redis, runtime="process"):
        old = await execute(api, pipeline["id"], {"n": 0})
        await _until(lambda: _running(pool, old["id"], "wait"), 60, "the first node to run")
        status, patched = await api.patch(
            f"/api/v1/pipelines/{pipeline['id']}",
            {"nodes": [node("wait", "hold", path=str(gate)), node("bump", "add", plus=100)]},
        )
        assert status == 200, patched
        assert patched["version"] == 2
        gate.unlink()
        old_done = await wait_run(api, old["id"])
        new_done = await wait_run(api, (await execute(api, pipeline["id"], {"n": 0}))["id"])

    assert (old_done["status"], old_done["version"]) == ("success", 1), old_done
    assert old_done["output"] == {"bump": {"n": 1, "node": "bump"}}
    assert (new_done["status"], new_done["version"]) == ("success", 2), new_done
    assert new_done["output"] == {"bump": {"n": 100, "node": "bump"}}


async def test_a_rollout_mid_run_does_not_break_it(api, project, settings, pool, redis, tmp_path):
    gate = tmp_path / "gate"
    gate.write_text("closed")
    service = await deploy_flow(api, project["id"])
    pipeline = await create_pipeline(
        api,
        project["id"],
        "rolled",
        [node("wait", "hold", path=str(gate)), node("after", "add")],
        [link("wait", "n", "after", "n")],
    )
    async with running_worker(settings, pool, redis, runtime="process"):
        run = await execute(api, pipeline["id"], {"n": 1})
        await _until(lambda: _running(pool, run["id"], "wait"), 60, "the first node to run")
        status, patched = await api.patch(
            f"/api/v1/services/{service['id']}", {"runtime": {"memory_mb": 300}}
        )
        assert status == 200, patched

        async def rolled_over() -> bool:
            rows = await pool.fetch(
                "SELECT generation, status FROM replicas WHERE service_id = $1", service["id"]
            )
            old_leaving = all(
                r["status"] in ("draining", "stopped") for r in rows if r["generation"] == 1
            )
            new_ready = any(r["generation"] == 2 and r["status"] == "ready" for r in rows)
            return old_leaving and new_ready

        # The old replica drains (its running node keeps going) and a new one is ready
        # before the node ends: the next node is then run by the new generation.
        await _until(rolled_over, 60, "the rollover")
        gate.unlink()
        done = await wait_run(api, run["id"])

    assert done["status"] == "success", done
    assert done["output"] == {"after": {"n": 2, "node": "after"}}
    generations = {
        r["pipeline_node"]: r["generation"]
        for r in await pool.fetch(
            """SELECT e.pipeline_node, r.generation FROM executions e
               JOIN replicas r ON r.id = e.replica_id WHERE e.pipeline_execution_id = $1""",
            run["id"],
        )
    }
    assert generations == {"wait": 1, "after": 2}


def _process(settings, tmp_path, name: str, command: str, started: list) -> WorkerProcess:
    process = WorkerProcess(settings, tmp_path, name, command).start()
    started.append(process)
    return process


@pytest.fixture
def processes(settings, tmp_path):
    started: list[WorkerProcess] = []
    yield lambda name, command: _process(settings, tmp_path, name, command, started)
    for process in started:
        process.stop()


async def test_killing_a_worker_and_a_scheduler_mid_run_loses_and_repeats_nothing(
    api, project, settings, pool, redis, processes
):
    """A fan-out of 60 naps with a worker and the scheduler killed (SIGKILL) while nodes
    run: the run ends with every element once and the merge exactly once."""
    await deploy_flow(api, project["id"], runtime={"concurrency": 8, "max_replicas": 2})
    pipeline = await create_pipeline(
        api,
        project["id"],
        "crashy",
        [
            node("list", "source"),
            node("work", "nap", seconds=0.3),
            {"id": "gather", "type": "merge"},
            node("sum", "total"),
        ],
        [
            link("list", "items", "work", "n"),
            link("work", "n", "gather", "items"),
            link("gather", "items", "sum", "items"),
        ],
    )
    first = processes("first", "worker")
    scheduler = processes("scheduler", "scheduler")
    await first.wait_up(pool)
    run = await execute(api, pipeline["id"], {"count": 60})
    await _until(lambda: _running(pool, run["id"], "work", 4), 90, "the fan-out to run")
    first.kill()
    scheduler.kill()
    # A new worker and a new scheduler take over what the dead ones held.
    second = processes("second", "worker")
    processes("scheduler-2", "scheduler")
    await second.wait_up(pool)
    done = await wait_run(api, run["id"], 240)

    assert done["status"] == "success", (done, first.output()[-2000:], second.output()[-2000:])
    assert done["output"] == {"sum": {"total": sum(range(60))}}
    executions = await executions_of(api, run["id"])
    per_node = collections.Counter(e["pipeline_node"] for e in executions)
    assert per_node == {"list": 1, "work": 60, "sum": 1}  # each hop created exactly once
    assert sorted(e["input"]["n"] for e in executions if e["pipeline_node"] == "work") == list(
        range(60)
    )
    # Some work was cut off by the kill and ran again, as another attempt of the same execution.
    retried = [e for e in executions if e["attempt"] > 1]
    assert all(e["status"] == "success" for e in executions)
    print(f"\n{len(retried)} execution(s) retried after the kill")


@pytest.mark.docker
async def test_a_chain_on_the_docker_runtime(api, project, settings, pool, redis):
    from tests.test_engine import DOCKER_OWNER, _require_docker

    _require_docker()
    from worker.host import WorkerHost
    from worker.runtimes.docker import DockerRuntime

    await deploy_flow(api, project["id"])
    pipeline = await create_pipeline(
        api,
        project["id"],
        "boxed",
        [node("a", "add"), node("b", "add")],
        [link("a", "n", "b", "n")],
    )
    host = WorkerHost(
        settings.model_copy(update={"runtime": "docker", "metrics_port_worker": 0}),
        pool,
        redis,
        runtime=DockerRuntime(owner=DOCKER_OWNER),
    )
    stop = asyncio.Event()
    task = asyncio.create_task(host.run(stop))
    try:
        async with running_reconciler(pool, redis):
            done = await wait_run(api, (await execute(api, pipeline["id"], {"n": 1}))["id"], 180)
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
    assert done["status"] == "success", done
    assert node_states(done) == {"a": "success", "b": "success"}
    assert done["output"] == {"b": {"n": 3, "node": "b"}}
