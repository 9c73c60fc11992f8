"""Event triggers: events on `ferry:events` matched by resource, action and filter, handled
once across schedulers, in mode `once` once per resource id, with the loop guard."""

from __future__ import annotations

import asyncio
import copy

import pytest

from core import events
from core.triggers import EVENTS_GROUP
from scheduler.event_triggers import EventTriggerLoop
from tests.conftest import ECHO_MANIFEST, echo_archive

MANIFEST = copy.deepcopy(ECHO_MANIFEST)
MANIFEST["name"] = "handlers"
MANIFEST["modules"][0]["functions"].append(
    {
        "name": "on_event",
        "inputs": [{"name": "event", "type": "json"}, {"name": "label", "type": "string"}],
        "outputs": [],
    }
)


@pytest.fixture
async def handler(api, project) -> dict:
    status, package = await api.upload(project["id"], echo_archive(MANIFEST))
    assert status == 201, package
    status, service = await api.post(
        "/api/v1/services", {"project": project["id"], "name": "handler", "package": package["id"]}
    )
    assert status == 201, service
    return service


async def event_trigger(api, project, service, name, spec, **extra) -> dict:
    body = {
        "project": project["id"],
        "name": name,
        "type": "event",
        "input": {"label": name},
        "operation": {"type": "function", "service": service["id"], "function": "on_event"},
        "spec": spec,
        **extra,
    }
    status, trigger = await api.post("/api/v1/triggers", body)
    assert status == 201, trigger
    return trigger


class Schedulers:
    """Event loops of several schedulers, in-process, each with its own consumer name."""

    def __init__(self, pool, redis, count: int = 2) -> None:
        self.loops = [EventTriggerLoop(pool, redis, f"scheduler-{i}") for i in range(count)]
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task] = []

    async def __aenter__(self) -> Schedulers:
        self.tasks = [asyncio.create_task(loop.run(self.stop)) for loop in self.loops]
        return self

    async def __aexit__(self, *exc) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks)


async def executions_of(pool, trigger_id: str) -> list:
    return await pool.fetch(
        "SELECT * FROM executions WHERE trigger_id = $1 ORDER BY created_at", trigger_id
    )


async def drained(redis) -> None:
    """Until every published event was delivered and acknowledged."""
    for _ in range(100):
        groups = await redis.xinfo_groups(events.EVENTS_STREAM)
        group = next(g for g in groups if g["name"] in (EVENTS_GROUP, EVENTS_GROUP.encode()))
        stream = await redis.xinfo_stream(events.EVENTS_STREAM)
        delivered = group["last-delivered-id"] == stream["last-generated-id"]
        if group["pending"] == 0 and delivered:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"events not handled: {group}")


async def test_matching_event_fires_once_non_matching_never(api, pool, redis, project, handler):
    trigger = await event_trigger(
        api,
        project,
        handler,
        "big-items",
        {"resource": "item", "actions": ["created"], "filter": {"size": {"$gt": 10}}},
    )
    pid = project["id"]
    async with Schedulers(pool, redis, count=3):
        big = await events.publish(redis, "item.created", pid, "item", "item-1", {"size": 50})
        await events.publish(redis, "item.created", pid, "item", "item-2", {"size": 5})
        await events.publish(redis, "item.deleted", pid, "item", "item-3", {"size": 50})
        await events.publish(redis, "order.created", pid, "order", "order-1", {"size": 50})
        await events.publish(redis, "item.created", "other-project", "item", "x", {"size": 50})
        await drained(redis)
    rows = await executions_of(pool, trigger["id"])
    assert len(rows) == 1
    execution = rows[0]
    assert execution["event_id"] == big and execution["function"] == "on_event"
    assert execution["input"]["label"] == "big-items"
    event = execution["input"]["event"]
    assert event["resource_id"] == "item-1" and event["action"] == "created"
    assert event["data"] == {"size": 50} and event["id"] == big
    status, body = await api.get(f"/api/v1/triggers/{trigger['id']}")
    assert body["status"] == "ok" and body["last_fired_at"] is not None


async def test_once_mode_fires_once_per_resource(api, pool, redis, project, handler):
    trigger = await event_trigger(
        api, project, handler, "first-sight", {"resource": "item", "mode": "once"}
    )
    pid = project["id"]
    async with Schedulers(pool, redis, count=2):
        for _ in range(3):
            await events.publish(redis, "item.updated", pid, "item", "item-1", {})
        await events.publish(redis, "item.updated", pid, "item", "item-2", {})
        await drained(redis)
    rows = await executions_of(pool, trigger["id"])
    assert sorted(r["input"]["event"]["resource_id"] for r in rows) == ["item-1", "item-2"]
    firings = await pool.fetch("SELECT * FROM trigger_firings WHERE trigger_id = $1", trigger["id"])
    assert {f["execution_id"] for f in firings} == {r["id"] for r in rows}


async def test_events_while_no_scheduler_runs_are_handled_later(api, pool, redis, project, handler):
    # Creating an event trigger creates the consumer group: the stream keeps events for it.
    trigger = await event_trigger(api, project, handler, "later", {"resource": "item"})
    pid = project["id"]
    for n in range(5):
        await events.publish(redis, "item.created", pid, "item", f"item-{n}", {"n": n})
    assert await executions_of(pool, trigger["id"]) == []
    async with Schedulers(pool, redis, count=2):
        await drained(redis)
    assert len(await executions_of(pool, trigger["id"])) == 5


async def test_inactive_paused_and_loop_guard_fire_nothing(api, pool, redis, project, handler):
    pid = project["id"]
    inactive = await event_trigger(api, project, handler, "off", {"resource": "item"}, active=False)
    guarded = await event_trigger(
        api, project, handler, "on-success", {"resource": "execution", "actions": ["success"]}
    )
    async with Schedulers(pool, redis, count=1):
        await events.publish(redis, "item.created", pid, "item", "item-1", {})
        # An execution of the trigger's own service: refused, or it would loop forever.
        await events.publish(
            redis, "execution.success", pid, "execution", "e-1", {"service": handler["id"]}
        )
        await drained(redis)
        assert await executions_of(pool, guarded["id"]) == []
        status, body = await api.get(f"/api/v1/triggers/{guarded['id']}")
        assert body["status"] == "skipped" and body["last_error"].startswith("loop guard")
        # Another service's execution fires it.
        await events.publish(
            redis, "execution.success", pid, "execution", "e-2", {"service": "another-service"}
        )
        await drained(redis)
        assert len(await executions_of(pool, guarded["id"])) == 1

        assert (await api.post(f"/api/v1/services/{handler['id']}/pause"))[0] == 200
        await events.publish(
            redis, "execution.success", pid, "execution", "e-3", {"service": "another-service"}
        )
        await drained(redis)
    assert len(await executions_of(pool, guarded["id"])) == 1
    status, body = await api.get(f"/api/v1/triggers/{guarded['id']}")
    assert body["status"] == "skipped" and body["last_error"] == "service paused: event skipped"
    assert await executions_of(pool, inactive["id"]) == []


async def test_entries_of_a_dead_scheduler_are_claimed(api, pool, redis, project, handler):
    trigger = await event_trigger(api, project, handler, "orphaned", {"resource": "item"})
    event_id = await events.publish(redis, "item.created", project["id"], "item", "i-1", {})
    # A scheduler read it and died before handling it: pending, never acknowledged.
    reply = await redis.xreadgroup(EVENTS_GROUP, "dead", {events.EVENTS_STREAM: ">"}, count=10)
    assert len(reply[0][1]) == 1
    survivor = EventTriggerLoop(pool, redis, "survivor")
    assert await survivor.claim_abandoned(min_idle_ms=0) == 1
    rows = await executions_of(pool, trigger["id"])
    assert [r["event_id"] for r in rows] == [event_id]
    # Handled twice (the dead one comes back and replays it): still one execution.
    fields = (await redis.xrange(events.EVENTS_STREAM, event_id, event_id))[0][1]
    assert await survivor.handle(event_id, fields) == []
    assert len(await executions_of(pool, trigger["id"])) == 1
    assert (await redis.xpending(events.EVENTS_STREAM, EVENTS_GROUP))["pending"] == 0


async def test_a_restarted_scheduler_handles_its_own_pending_entries(
    api, pool, redis, project, handler
):
    trigger = await event_trigger(api, project, handler, "mine", {"resource": "item"})
    await events.publish(redis, "item.created", project["id"], "item", "i-1", {})
    # Delivered to scheduler-0, which stopped before handling it; it comes back under that id.
    await redis.xreadgroup(EVENTS_GROUP, "scheduler-0", {events.EVENTS_STREAM: ">"}, count=10)
    async with Schedulers(pool, redis, count=1):
        await drained(redis)
    assert len(await executions_of(pool, trigger["id"])) == 1
