"""Triggers that start pipelines: a cron tick or an event starts exactly one pipeline
execution, run end to end by a real worker (process runtime); a pipeline that is not
installed fires nothing; the loop guard; validation.

The scheduler loops run in this process, as in tests/test_cron.py and
tests/test_event_triggers.py."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

from core import events
from scheduler.cron import CronLoop
from scheduler.event_triggers import EventTriggerLoop
from tests.engine_helpers import running_worker
from tests.pipeline_helpers import create_pipeline, deploy_flow, link, node, wait_run
from tests.test_cron import _seconds, run_schedulers
from tests.test_event_triggers import Schedulers, drained


def trigger_body(project, pipeline: str, name: str, type_: str, spec: dict, **extra) -> dict:
    return {
        "project": project["id"],
        "name": name,
        "type": type_,
        "input": {"n": 1},
        "operation": {"type": "pipeline", "pipeline": pipeline},
        "spec": spec,
        **extra,
    }


async def create_trigger(api, body) -> dict:
    status, trigger = await api.post("/api/v1/triggers", body)
    assert status == 201, trigger
    return trigger


async def chain(api, project, name: str = "chain", ids: tuple[str, str] = ("a", "b")) -> dict:
    """An installed pipeline a(n) → b(n + 10): input {"n": 1} ends as {"b": {"n": 12}}."""
    first, second = ids
    return await create_pipeline(
        api,
        project["id"],
        name,
        [node(first, "add"), node(second, "add", plus=10)],
        [link(first, "n", second, "n")],
    )


async def runs_of(pool, trigger_id: str) -> list:
    return await pool.fetch(
        """SELECT * FROM pipeline_executions WHERE trigger_id = $1
           ORDER BY trigger_fire_time, created_at""",
        trigger_id,
    )


async def test_a_cron_tick_starts_one_pipeline_execution(api, pool, redis, project, settings):
    await deploy_flow(api, project["id"])
    pipeline = await chain(api, project)
    # By name: stored by id, so a rename of the pipeline changes nothing.
    trigger = await create_trigger(
        api,
        trigger_body(
            project, "chain", "every-second", "cron", {"cron": "* * * * * *", "misfire": "run-all"}
        ),
    )
    assert trigger["operation"] == {"type": "pipeline", "pipeline": pipeline["id"]}
    assert trigger["active"] is True

    async with running_worker(settings, pool, redis, runtime="process"):
        await run_schedulers(pool, redis, 4.0)
        rows = await runs_of(pool, trigger["id"])
        done = [await wait_run(api, row["id"]) for row in rows]

    times = [row["trigger_fire_time"] for row in rows]
    assert len(times) >= 3
    assert times == _seconds(times[0] - timedelta(seconds=1), times[-1])  # each second, once
    assert all(row["event_id"] is None and row["input"] == {"n": 1} for row in rows)
    for run in done:
        assert run["status"] == "success", run
        assert run["trigger"] == trigger["id"] and run["pipeline"] == pipeline["id"]
        assert run["output"] == {"b": {"n": 12, "node": "b"}}
    status, body = await api.get(f"/api/v1/triggers/{trigger['id']}")
    assert body["status"] == "ok" and body["last_error"] is None
    assert datetime.fromisoformat(body["last_fired_at"]) == max(times)

    # A replayed round (next_fire_at moved back over ticks already fired, run-all) inserts
    # nothing: the unique (trigger, fire time) holds.
    await pool.execute(
        "UPDATE triggers SET next_fire_at = $2 WHERE id = $1", trigger["id"], times[0]
    )
    await CronLoop(pool, None, "replay", 100).run_once()
    replayed = await runs_of(pool, trigger["id"])
    again = [row["trigger_fire_time"] for row in replayed]
    assert len(again) == len(set(again))
    assert [row["id"] for row in replayed if row["trigger_fire_time"] in times] == [
        row["id"] for row in rows
    ]


async def test_an_event_starts_one_pipeline_execution_with_the_event(
    api, pool, redis, project, settings
):
    await deploy_flow(api, project["id"])
    pipeline = await chain(api, project)
    after = await chain(api, project, "after", ("x", "y"))
    spec = {"resource": "item", "actions": ["created"], "filter": {"size": {"$gt": 10}}}
    on_item = await create_trigger(
        api, trigger_body(project, pipeline["id"], "on-item", "event", spec)
    )
    # Chaining pipelines: `after` runs when `chain` succeeds.
    on_chain = await create_trigger(
        api,
        trigger_body(
            project,
            after["id"],
            "after-chain",
            "event",
            {
                "resource": "pipeline_execution",
                "actions": ["success"],
                "filter": {"pipeline": pipeline["id"]},
            },
            input={"n": 100},
        ),
    )
    # Loops the guard refuses: the pipeline's own pipeline executions and node executions.
    # (The filters keep `after`'s out: chain → after → chain would be a loop of two, which
    # the guard does not look for.)
    own_runs = await create_trigger(
        api,
        trigger_body(
            project, pipeline["id"], "own-runs", "event",
            {"resource": "pipeline_execution", "filter": {"pipeline": pipeline["id"]}},
        ),
    )  # fmt: skip
    own_nodes = await create_trigger(
        api,
        trigger_body(
            project, pipeline["id"], "own-nodes", "event",
            {"resource": "execution", "filter": {"node": {"$in": ["a", "b"]}}},
        ),
    )  # fmt: skip

    pid = project["id"]
    async with running_worker(settings, pool, redis, runtime="process"), Schedulers(pool, redis):
        posted = []
        for resource_id, size in (("item-1", 50), ("item-2", 5), ("item-3", 99)):
            status, accepted = await api.post(
                "/api/v1/events",
                {
                    "project": pid,
                    "resource": "item",
                    "action": "created",
                    "resource_id": resource_id,
                    "data": {"size": size},
                },
            )
            assert status == 202, accepted
            posted.append(accepted["id"])
        await api.post(
            "/api/v1/events",
            {"project": pid, "resource": "item", "action": "deleted", "resource_id": "item-1"},
        )
        for _ in range(600):  # both chain runs succeed, then each starts one run of `after`
            if len(await runs_of(pool, on_chain["id"])) == 2:
                break
            await asyncio.sleep(0.1)
        for row in await runs_of(pool, on_chain["id"]):
            assert (await wait_run(api, row["id"]))["status"] == "success"
        await drained(redis)

    rows = await runs_of(pool, on_item["id"])
    assert sorted(row["event_id"] for row in rows) == sorted([posted[0], posted[2]])
    for row in rows:
        event = row["input"]["event"]
        assert row["input"]["n"] == 1 and event["id"] == row["event_id"]
        assert event["type"] == "item.created" and event["resource_id"] in ("item-1", "item-3")
        assert event["data"]["size"] > 10
        assert (await wait_run(api, row["id"]))["output"] == {"b": {"n": 12, "node": "b"}}
    chained = await runs_of(pool, on_chain["id"])
    assert {r["input"]["event"]["resource_id"] for r in chained} == {r["id"] for r in rows}
    assert all(r["pipeline_id"] == after["id"] for r in chained)

    for guarded in (own_runs, own_nodes):
        assert await runs_of(pool, guarded["id"]) == []
        status, body = await api.get(f"/api/v1/triggers/{guarded['id']}")
        assert body["status"] == "skipped", body
        assert body["last_error"] == "loop guard: an event of the same pipeline"

    # The same event handled again (a scheduler died before its XACK): nothing new.
    fields = (await redis.xrange(events.EVENTS_STREAM, posted[0], posted[0]))[0][1]
    await EventTriggerLoop(pool, redis, "replay").handle(posted[0], fields)
    assert len(await runs_of(pool, on_item["id"])) == 2


async def test_a_pipeline_not_installed_fires_nothing(api, pool, redis, project):
    await deploy_flow(api, project["id"])
    status, pipeline = await api.post(
        "/api/v1/pipelines",
        {"project": project["id"], "name": "idle", "nodes": [node("a", "add")]},
    )
    assert status == 201, pipeline
    every = {"cron": "* * * * * *"}
    cron = await create_trigger(api, trigger_body(project, "idle", "tick", "cron", every))
    assert cron["active"] is False  # stored inactive: installing activates it
    event = await create_trigger(
        api, trigger_body(project, "idle", "on-item", "event", {"resource": "item"})
    )
    assert event["active"] is False
    status, body = await api.post(f"/api/v1/triggers/{cron['id']}/resume")
    assert status == 409 and body["error"]["details"][0]["field"] == "active", body
    assert "not installed" in body["error"]["message"]

    await run_schedulers(pool, redis, 1.5, count=1)
    assert await runs_of(pool, cron["id"]) == []

    pipeline_id = pipeline["id"]
    assert (await api.post(f"/api/v1/pipelines/{pipeline_id}/install"))[0] == 200
    assert (await api.get(f"/api/v1/triggers/{cron['id']}"))[1]["active"] is True
    assert (await api.post(f"/api/v1/pipelines/{pipeline_id}/uninstall"))[0] == 200
    assert (await api.get(f"/api/v1/triggers/{cron['id']}"))[1]["active"] is False

    # Active although the pipeline is not installed (as if written before the uninstall
    # reached it): the tick and the event are skipped, and the triggers say why.
    await pool.execute("UPDATE triggers SET active = true WHERE pipeline_id = $1", pipeline_id)
    await pool.execute(
        "UPDATE triggers SET next_fire_at = date_trunc('second', now()) WHERE id = $1", cron["id"]
    )
    claimed_after = datetime.now(UTC)
    assert await CronLoop(pool, redis, "solo", 100).run_once() == 1
    status, body = await api.get(f"/api/v1/triggers/{cron['id']}")
    assert body["status"] == "skipped", body
    assert body["last_error"] == "pipeline not installed: tick skipped"
    assert datetime.fromisoformat(body["next_fire_at"]) > claimed_after  # moved on
    async with Schedulers(pool, redis, count=1):
        await events.publish(redis, "item.created", project["id"], "item", "item-1", {})
        await drained(redis)
    status, body = await api.get(f"/api/v1/triggers/{event['id']}")
    assert body["last_error"] == "pipeline not installed: event skipped", body
    assert await runs_of(pool, cron["id"]) == [] and await runs_of(pool, event["id"]) == []


async def test_validation_and_the_pipeline_filter(api, pool, project):
    service = await deploy_flow(api, project["id"])
    pipeline = await chain(api, project)
    status, other = await api.post("/api/v1/projects", {"name": "beta"})
    await deploy_flow(api, other["id"])
    elsewhere = await chain(api, other, "elsewhere")

    cron = {"cron": "0 3 * * *"}
    base = trigger_body(project, pipeline["id"], "nightly", "cron", cron)
    event = {"type": "event", "spec": {"resource": "item"}}
    cases = [
        ({"operation": {"type": "pipeline", "pipeline": "nope"}}, "operation.pipeline"),
        ({"operation": {"type": "pipeline", "pipeline": elsewhere["id"]}}, "operation.pipeline"),
        # Pydantic names a tagged union's member in the path: operation.<type>.<field>.
        ({"operation": {"type": "pipeline", "pipeline": ""}}, "operation.pipeline.pipeline"),
        ({"operation": {"type": "pipeline"}}, "operation.pipeline.pipeline"),
        ({"input": {"m": 1}}, "input.n"),  # the start node's required input is missing
        ({"input": {"n": 1, "txt": "typo"}}, "input.txt"),  # no start node declares it
        ({"input": {"n": "one"}}, "input.n"),
        ({**event, "input": {"n": 1, "event": {}}}, "input.event"),
    ]
    for extra, field in cases:
        status, body = await api.post("/api/v1/triggers", {**base, **extra})
        assert status == 422, (extra, body)
        assert body["error"]["details"][0]["field"] == field, (extra, body)

    trigger = await create_trigger(api, base)
    on_event = await create_trigger(api, {**base, **event, "name": "on-item"})
    assert on_event["input"] == {"n": 1}
    status, body = await api.patch(f"/api/v1/triggers/{trigger['id']}", {"input": {"n": "x"}})
    assert status == 422 and body["error"]["details"][0]["field"] == "input.n", body

    status, page = await api.get(f"/api/v1/triggers?pipeline={pipeline['id']}")
    assert status == 200 and {t["id"] for t in page["items"]} == {trigger["id"], on_event["id"]}
    assert (await api.get(f"/api/v1/triggers?service={service['id']}"))[1]["items"] == []

    # Turned into a function trigger: the columns follow the operation.
    status, patched = await api.patch(
        f"/api/v1/triggers/{trigger['id']}",
        {"operation": {"type": "function", "service": service["id"], "function": "add"}},
    )
    assert status == 200, patched
    assert patched["operation"]["type"] == "function"
    row = await pool.fetchrow(
        "SELECT service_id, pipeline_id FROM triggers WHERE id = $1", trigger["id"]
    )
    assert row["service_id"] == service["id"] and row["pipeline_id"] is None
    status, page = await api.get(f"/api/v1/triggers?pipeline={pipeline['id']}")
    assert [t["id"] for t in page["items"]] == [on_event["id"]]

    # Deleting the pipeline deletes the triggers that start it.
    assert (await api.delete(f"/api/v1/pipelines/{pipeline['id']}"))[0] == 204
    assert (await api.get(f"/api/v1/triggers/{on_event['id']}"))[0] == 404


async def test_a_start_node_refusing_the_input_marks_the_trigger(api, pool, redis, project):
    await deploy_flow(api, project["id"])
    pipeline = await chain(api, project)
    trigger = await create_trigger(
        api, trigger_body(project, pipeline["id"], "tick", "cron", {"cron": "* * * * * *"})
    )
    # A new version whose start node needs `count`, which the trigger's input lacks.
    status, changed = await api.patch(
        f"/api/v1/pipelines/{pipeline['id']}", {"nodes": [node("a", "source")], "connections": []}
    )
    assert status == 200 and changed["version"] == 2, changed
    await pool.execute(
        "UPDATE triggers SET next_fire_at = date_trunc('second', now()) WHERE id = $1",
        trigger["id"],
    )
    assert await CronLoop(pool, redis, "solo", 100).run_once() == 1
    status, body = await api.get(f"/api/v1/triggers/{trigger['id']}")
    assert body["status"] == "error", body
    assert body["last_error"] == "pipeline not started: input.count: required"
    # Nothing half-made: the savepoint took the pipeline execution back with its start.
    assert await runs_of(pool, trigger["id"]) == []
    assert await pool.fetchval("SELECT count(*) FROM executions") == 0


async def test_cli_creates_and_lists_a_pipeline_trigger(
    api, client, admin_token, project, monkeypatch
):
    from typer.testing import CliRunner

    from ferry.cli import app

    await deploy_flow(api, project["id"])
    pipeline = await chain(api, project)
    monkeypatch.setenv("FERRY_URL", str(client.make_url("")).rstrip("/"))
    monkeypatch.setenv("FERRY_TOKEN", admin_token)
    runner = CliRunner()

    async def ferry(*args: str):
        return await asyncio.to_thread(runner.invoke, app, ["triggers", *args])

    result = await ferry(
        "create", "hourly", "--project", project["id"], "--pipeline", "chain",
        "--cron", "0 * * * *", "--input", '{"n": 2}',
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    created = json.loads(result.output)
    assert created["operation"] == {"type": "pipeline", "pipeline": pipeline["id"]}
    listed = await ferry("list", "--pipeline", pipeline["id"], "--json")
    assert [t["id"] for t in json.loads(listed.output)] == [created["id"]]
    both = await ferry(
        "create", "muddled", "--project", project["id"], "--pipeline", "chain",
        "--service", "flow", "--function", "add", "--cron", "0 * * * *",
    )  # fmt: skip
    assert both.exit_code == 2


async def test_once_mode_starts_one_pipeline_execution_per_resource(api, pool, redis, project):
    await deploy_flow(api, project["id"])
    pipeline = await chain(api, project)
    trigger = await create_trigger(
        api,
        trigger_body(
            project, pipeline["id"], "first-sight", "event", {"resource": "item", "mode": "once"}
        ),
    )
    pid = project["id"]
    async with Schedulers(pool, redis, count=2):
        for _ in range(3):
            await events.publish(redis, "item.updated", pid, "item", "item-1", {})
        await events.publish(redis, "item.updated", pid, "item", "item-2", {})
        await drained(redis)
    rows = await runs_of(pool, trigger["id"])
    assert sorted(r["input"]["event"]["resource_id"] for r in rows) == ["item-1", "item-2"]
    firings = await pool.fetch("SELECT * FROM trigger_firings WHERE trigger_id = $1", trigger["id"])
    assert {f["execution_id"] for f in firings} == {r["id"] for r in rows}
