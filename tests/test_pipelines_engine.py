"""Pipelines run by a real worker: chains, fan-out and merge, conditions and skips,
failures and resume, terminate, the fan-out cap, logs, statistics and access.

Every test runs the process runtime (agent subprocesses) on real PostgreSQL and Redis;
`tests/test_pipelines_runs.py` covers versions, rollouts, triggers and crashes."""

from __future__ import annotations

import asyncio
import collections

from tests.conftest import token_for
from tests.engine_helpers import running_reconciler, running_worker
from tests.pipeline_helpers import (
    create_pipeline,
    deploy_flow,
    execute,
    executions_of,
    link,
    merge,
    node,
    node_states,
    wait_run,
)


async def test_a_chain_passes_each_output_to_the_next_node(api, project, settings, pool, redis):
    await deploy_flow(api, project["id"])
    pipeline = await create_pipeline(
        api,
        project["id"],
        "chain",
        [node("a", "add"), node("b", "add", plus=10), node("c", "add", plus=100)],
        [link("a", "n", "b", "n"), link("b", "n", "c", "n")],
    )
    async with running_worker(settings, pool, redis, runtime="process"):
        run = await execute(api, pipeline["id"], {"n": 1})
        assert run["version"] == 1 and run["status"] == "in-progress"
        done = await wait_run(api, run["id"])

    assert done["status"] == "success", done
    assert done["output"] == {"c": {"n": 112, "node": "c"}}
    assert node_states(done) == {"a": "success", "b": "success", "c": "success"}
    assert all(n["executions"]["success"] == 1 for n in done["nodes"])
    assert done["started_at"] and done["ended_at"] and done["error"] is None

    executions = await executions_of(api, run["id"])
    assert [(e["pipeline_node"], e["input"]["n"], e["output"]["n"]) for e in executions] == [
        ("a", 1, 2),
        ("b", 2, 12),
        ("c", 12, 112),
    ]
    # Each hop starts from what PostgreSQL recorded: B created no earlier than A finished.
    rows = {
        r["pipeline_node"]: r
        for r in await pool.fetch(
            "SELECT * FROM executions WHERE pipeline_execution_id = $1", run["id"]
        )
    }
    assert rows["b"]["created_at"] >= rows["a"]["finished_at"]
    assert rows["c"]["created_at"] >= rows["b"]["finished_at"]
    assert rows["b"]["pipeline_parent"] == rows["a"]["id"]


async def test_fan_out_of_1000_merged_in_element_order(api, project, settings, pool, redis):
    await deploy_flow(api, project["id"], runtime={"concurrency": 16})
    pipeline = await create_pipeline(
        api,
        project["id"],
        "fan",
        [node("list", "source"), node("square", "square"), merge("gather"), node("sum", "total")],
        [
            link("list", "items", "square", "n"),
            link("square", "n", "gather", "items"),
            link("gather", "items", "sum", "items"),
        ],
    )
    async with running_worker(settings, pool, redis, runtime="process"):
        run = await execute(api, pipeline["id"], {"count": 1000})
        done = await wait_run(api, run["id"], 300)

    assert done["status"] == "success", done
    took = await pool.fetchval(
        "SELECT extract(epoch FROM ended_at - created_at) FROM pipeline_executions WHERE id = $1",
        run["id"],
    )
    print(f"\nfan-out of 1,000 into a merge: {took:.2f} s (PostgreSQL's timestamps)")
    assert done["output"] == {"sum": {"total": sum(i * i for i in range(1000))}}
    squares = {n["node"]: n for n in done["nodes"]}["square"]
    assert squares["executions"]["success"] == 1000 and squares["status"] == "success"
    # One execution per element, each exactly once.
    rows = await pool.fetch(
        """SELECT pipeline_element, input FROM executions
           WHERE pipeline_execution_id = $1 AND pipeline_node = 'square'""",
        run["id"],
    )
    assert sorted(r["pipeline_element"] for r in rows) == list(range(1000))
    assert all(r["input"] == {"n": r["pipeline_element"]} for r in rows)
    merged = await pool.fetchval(
        "SELECT output FROM pipeline_nodes WHERE pipeline_execution_id = $1 AND node = 'gather'",
        run["id"],
    )
    assert merged == {"items": [i * i for i in range(1000)]}  # element order, not finish order


async def test_conditions_route_one_way_and_skip_the_other(api, project, settings, pool, redis):
    await deploy_flow(api, project["id"])
    pipeline = await create_pipeline(
        api,
        project["id"],
        "route",
        [
            node("classify", "classify"),
            node("even", "add"),
            node("odd", "add"),
            node("after_odd", "add"),
        ],
        [
            link("classify", "n", "even", "n", condition={"kind": "even"}),
            link("classify", "n", "odd", "n", condition={"kind": {"$eq": "odd"}}),
            link("odd", "n", "after_odd", "n"),
        ],
    )
    async with running_worker(settings, pool, redis, runtime="process"):
        even = await wait_run(api, (await execute(api, pipeline["id"], {"n": 4}))["id"])
        odd = await wait_run(api, (await execute(api, pipeline["id"], {"n": 3}))["id"])

    assert even["status"] == "success", even
    assert node_states(even) == {
        "classify": "success",
        "even": "success",
        "odd": "skipped",
        "after_odd": "skipped",  # a skip propagates, and the run still ends
    }
    assert even["output"] == {"even": {"n": 5, "node": "even"}}
    assert odd["status"] == "success", odd
    assert node_states(odd) == {
        "classify": "success",
        "even": "skipped",
        "odd": "success",
        "after_odd": "success",
    }
    assert odd["output"] == {"after_odd": {"n": 5, "node": "after_odd"}}


async def test_a_failed_node_lets_other_branches_finish_then_resume(
    api, project, settings, pool, redis, tmp_path
):
    fault = tmp_path / "fault"
    fault.write_text("on")
    await deploy_flow(api, project["id"])
    pipeline = await create_pipeline(
        api,
        project["id"],
        "branches",
        [
            node("start", "add"),
            node("fragile", "fail_while", path=str(fault)),
            node("after", "add"),
            node("steady", "add", plus=5),
        ],
        [
            link("start", "n", "fragile", "n"),
            link("fragile", "n", "after", "n"),
            link("start", "n", "steady", "n"),
        ],
    )
    async with running_worker(settings, pool, redis, runtime="process"):
        run = await execute(api, pipeline["id"], {"n": 0})
        failed = await wait_run(api, run["id"])
        assert failed["status"] == "failed", failed
        assert failed["error"]["node"] == "fragile"
        assert node_states(failed) == {
            "start": "success",
            "fragile": "failed",
            "after": "skipped",
            "steady": "success",  # the independent branch finished
        }

        fault.unlink()
        status, resumed = await api.post(
            f"/api/v1/pipeline-executions/{run['id']}/resume", {"from": "failed"}
        )
        assert status == 200, resumed
        assert resumed["status"] == "in-progress" and resumed["round"] == 1
        done = await wait_run(api, run["id"])

    assert done["status"] == "success", done
    assert node_states(done) == {n: "success" for n in ("start", "fragile", "after", "steady")}
    assert done["output"] == {
        "after": {"n": 2, "node": "after"},
        "steady": {"n": 6, "node": "steady"},
    }
    by_node = collections.Counter(e["pipeline_node"] for e in await executions_of(api, run["id"]))
    # The successful ones were reused: only the failed node and what follows it ran again.
    assert by_node == {"start": 1, "steady": 1, "fragile": 2, "after": 1}


async def test_terminate_stops_running_nodes_and_starts_nothing_new(
    api, project, settings, pool, redis
):
    await deploy_flow(api, project["id"])
    pipeline = await create_pipeline(
        api,
        project["id"],
        "stoppable",
        [node("slow", "nap", seconds=60), node("next", "add")],
        [link("slow", "n", "next", "n")],
    )
    async with running_worker(settings, pool, redis, runtime="process"):
        run = await execute(api, pipeline["id"], {"n": 1})
        for _ in range(600):
            status, current = await api.get(f"/api/v1/pipeline-executions/{run['id']}")
            if {n["node"]: n for n in current["nodes"]}["slow"]["executions"]["in-progress"]:
                break
            await asyncio.sleep(0.05)
        status, body = await api.post(f"/api/v1/pipeline-executions/{run['id']}/terminate", {})
        assert status == 202, body
        done = await wait_run(api, run["id"], 60)
        status, again = await api.post(f"/api/v1/pipeline-executions/{run['id']}/terminate", {})
        assert status == 409, again

    assert done["status"] == "terminated", done
    assert node_states(done) == {"slow": "terminated", "next": "terminated"}
    executions = await executions_of(api, run["id"])
    assert [(e["pipeline_node"], e["status"]) for e in executions] == [("slow", "terminated")]


async def test_a_fan_out_over_its_cap_fails_the_node_with_the_reason(
    api, project, settings, pool, redis
):
    await deploy_flow(api, project["id"])
    pipeline = await create_pipeline(
        api,
        project["id"],
        "capped",
        [node("list", "source"), node("square", "square")],
        [link("list", "items", "square", "n")],
        settings={"fanout_cap": 5},
    )
    async with running_worker(settings, pool, redis, runtime="process"):
        done = await wait_run(api, (await execute(api, pipeline["id"], {"count": 6}))["id"])

    assert done["status"] == "failed", done
    assert done["error"]["node"] == "square"
    assert "6 elements" in done["error"]["message"] and "fanout_cap 5" in done["error"]["message"]
    assert {n["node"]: n for n in done["nodes"]}["square"]["executions"]["created"] == 0
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM executions WHERE pipeline_execution_id = $1", done["id"]
        )
        == 1
    )  # never a silent cut: nothing of the fan-out ran


async def test_logs_statistics_events_and_isolation(api, project, settings, pool, redis):
    await deploy_flow(api, project["id"], runtime={"concurrency": 4})
    pipeline = await create_pipeline(
        api,
        project["id"],
        "observed",
        [node("list", "source"), node("square", "square")],
        [link("list", "items", "square", "n")],
    )
    async with (
        running_worker(settings, pool, redis, runtime="process"),
        running_reconciler(pool, redis),
    ):
        run = await execute(api, pipeline["id"], {"count": 3}, idempotency_key="once")
        status, same = await api.post(
            f"/api/v1/pipelines/{pipeline['id']}/execute",
            {"input": {"count": 3}, "idempotency_key": "once"},
        )
        assert status == 200 and same["id"] == run["id"]
        done = await wait_run(api, run["id"])
    assert done["status"] == "success", done
    assert done["output"] == {"square": [{"n": 0}, {"n": 1}, {"n": 4}]}

    status, page = await api.get(f"/api/v1/pipeline-executions/{run['id']}/logs")
    assert status == 200, page
    lines = [(line["node"], line["text"]) for line in page["items"] if line["stream"] == "stdout"]
    assert sorted(lines) == [("square", "square 0"), ("square", "square 1"), ("square", "square 2")]

    status, stats = await api.get(f"/api/v1/pipelines/{pipeline['id']}/statistics")
    assert status == 200, stats
    assert stats["executions"]["success"] == 1
    per_node = {n["node"]: n for n in stats["nodes"]}
    assert per_node["square"]["executions"]["success"] == 3
    assert per_node["square"]["duration_ms"]["p50"] is not None

    status, listed = await api.get(f"/api/v1/pipeline-executions?pipeline={pipeline['id']}")
    assert status == 200 and [r["id"] for r in listed["items"]] == [run["id"]]

    events = await redis.xrange("ferry:events")
    kinds = [f[b"type"].decode() for _, f in events if f[b"resource_id"].decode() == run["id"]]
    assert kinds == [
        "pipeline_execution.created",
        "pipeline_execution.in-progress",
        "pipeline_execution.success",
    ]

    status, other = await api.post("/api/v1/projects", {"name": "other"})
    assert status == 201, other
    outsider = api.as_token(await token_for(pool, "owner", other["id"]))
    for path in (
        f"/api/v1/pipeline-executions/{run['id']}",
        f"/api/v1/pipeline-executions/{run['id']}/logs",
        f"/api/v1/pipelines/{pipeline['id']}/statistics",
    ):
        status, body = await outsider.get(path)
        assert status == 404, (path, body)
    for path in (
        f"/api/v1/pipelines/{pipeline['id']}/execute",
        f"/api/v1/pipeline-executions/{run['id']}/terminate",
        f"/api/v1/pipeline-executions/{run['id']}/resume",
    ):
        status, body = await outsider.post(path, {"input": {}} if "execute" in path else {})
        assert status in (404, 422) if "resume" in path else status == 404, (path, body)
    status, listed = await outsider.get("/api/v1/pipeline-executions")
    assert status == 200 and listed["items"] == []
