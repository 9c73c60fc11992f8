"""Event triggers: events on `ferry:events` matched by resource, action and filter, handled
once across schedulers, in mode `once` once per resource id, with the loop guard."""

from __future__ import annotations

import asyncio
import copy

import pytest

from core import events
from core.triggers import EVENTS_GROUP
from scheduler.event_triggers import EventTriggerLoop, parse_event
from tests.conftest import ECHO_CODE, ECHO_MANIFEST, echo_archive
from tests.engine_helpers import running_worker, wait_for_status

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

    def __init__(self, pool, redis, count: int = 2, **options) -> None:
        self.loops = [
            EventTriggerLoop(pool, redis, f"scheduler-{i}", **options) for i in range(count)
        ]
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


async def test_a_batch_fires_together_and_one_broken_trigger_spoils_nothing(
    api, pool, redis, project, handler
):
    big = await event_trigger(
        api, project, handler, "big", {"resource": "item", "filter": {"size": {"$gt": 10}}}
    )
    every = await event_trigger(api, project, handler, "every", {"resource": "item"})
    once = await event_trigger(api, project, handler, "once", {"resource": "item", "mode": "once"})
    published = [
        await events.publish(
            redis, "item.created", project["id"], "item", f"i-{i % 5}", {"size": i}
        )
        for i in range(40)
    ]
    loop = EventTriggerLoop(pool, redis, "batch")
    await loop.read_and_handle(">")  # the 40 events come as one batch, one transaction
    # Sets: one statement creates them all, so their created_at do not order them.
    assert {r["event_id"] for r in await executions_of(pool, every["id"])} == set(published)
    assert len(await executions_of(pool, every["id"])) == 40
    assert {r["event_id"] for r in await executions_of(pool, big["id"])} == set(published[11:])
    assert sorted(r["input"]["event"]["resource_id"] for r in await executions_of(
        pool, once["id"]
    )) == [f"i-{i}" for i in range(5)]  # fmt: skip
    assert (await redis.xpending(events.EVENTS_STREAM, EVENTS_GROUP))["pending"] == 0

    # As if the service moved to a revision without the trigger's function: the batch's
    # bodies are refused together, then fired one by one, and only that trigger is marked.
    await pool.execute(
        """UPDATE triggers SET operation = jsonb_set(operation, '{function}', '"gone"')
           WHERE id = $1""",
        every["id"],
    )
    later = [
        await events.publish(redis, "item.created", project["id"], "item", "j", {"size": 50})
        for _ in range(3)
    ]
    await loop.read_and_handle(">")
    fired_big = {r["event_id"] for r in await executions_of(pool, big["id"])}
    assert fired_big == set(published[11:]) | set(later)
    assert len(await executions_of(pool, every["id"])) == 40
    status, body = await api.get(f"/api/v1/triggers/{every['id']}")
    assert body["status"] == "error" and "gone" in body["last_error"], body
    status, body = await api.get(f"/api/v1/triggers/{big['id']}")
    assert body["status"] == "ok" and body["last_fired_at"] is not None, body

    # Handled again (a scheduler died before its XACK): nothing new.
    replayed = [(e, (await redis.xrange(events.EVENTS_STREAM, e, e))[0][1]) for e in published]
    await loop.handle_events([parse_event(e, fields) for e, fields in replayed])
    assert len(await executions_of(pool, big["id"])) == 29 + 3


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
    read_at = await pool.fetchval("SELECT clock_timestamp()")
    reply = await redis.xreadgroup(EVENTS_GROUP, "dead", {events.EVENTS_STREAM: ">"}, count=10)
    assert len(reply[0][1]) == 1
    # The survivors' own loop takes it over on its schedule (shortened from 30 s / 10 s),
    # once it has been idle long enough, and not before.
    idle_ms = 1500
    async with Schedulers(pool, redis, count=2, claim_idle_ms=idle_ms, claim_every_s=0.2):
        for _ in range(300):
            if await executions_of(pool, trigger["id"]):
                break
            await asyncio.sleep(0.05)
        await drained(redis)
    rows = await executions_of(pool, trigger["id"])
    assert [r["event_id"] for r in rows] == [event_id]
    assert (rows[0]["created_at"] - read_at).total_seconds() >= idle_ms / 1000
    survivor = EventTriggerLoop(pool, redis, "survivor")
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


HANDLER_CODE = """

def on_event(event, label):
    print("handling", event["type"], event["resource_id"], "for", label)
"""


async def test_an_execution_event_fires_a_trigger_end_to_end(
    api, pool, redis, settings, project, service
):
    """A real worker runs an execution; its `execution.success` event (the outbox, the
    stream) fires an event trigger, whose execution the worker runs too."""
    status, package = await api.upload(
        project["id"], echo_archive(MANIFEST, ECHO_CODE + HANDLER_CODE)
    )
    assert status == 201, package
    status, handler = await api.post(
        "/api/v1/services",
        {"project": project["id"], "name": "after", "package": package["id"]},
    )
    assert status == 201, handler
    trigger = await event_trigger(
        api, project, handler, "after-echo", {"resource": "execution", "actions": ["success"]}
    )
    async with (
        running_worker(settings, pool, redis, runtime="process"),
        Schedulers(pool, redis, count=1),
    ):
        status, source = await api.post(
            "/api/v1/executions",
            {"service": service["id"], "function": "echo", "input": {"text": "hi"}},
        )
        assert status == 201, source
        assert (await wait_for_status(api, source["id"]))["status"] == "success"
        for _ in range(600):
            if rows := await executions_of(pool, trigger["id"]):
                break
            await asyncio.sleep(0.05)
        assert rows, "the execution's success fired nothing"
        handled = await wait_for_status(api, rows[0]["id"])
        # The handler's own success reaches the trigger too, and is refused (loop guard).
        for _ in range(600):
            status, body = await api.get(f"/api/v1/triggers/{trigger['id']}")
            if body["status"] == "skipped":
                break
            await asyncio.sleep(0.05)
        assert body["last_error"].startswith("loop guard"), body
        await drained(redis)

    assert handled["status"] == "success", handled
    event = handled["input"]["event"]
    assert (event["type"], event["resource_id"]) == ("execution.success", source["id"])
    assert event["data"]["service"] == service["id"] and event["data"]["function"] == "echo"
    assert handled["input"]["label"] == "after-echo"
    assert len(await executions_of(pool, trigger["id"])) == 1
    status, logs = await api.get(f"/api/v1/executions/{handled['id']}/logs")
    texts = [line["text"] for line in logs["items"]]
    assert f"handling execution.success {source['id']} for after-echo" in texts


async def test_events_no_trigger_listens_to_leave_postgresql_untouched(
    api, pool, redis, settings, project, handler
):
    """Every statement the consumer sends is counted (asyncpg's query logger on its own
    pool): 200 events of a resource no trigger watches cost none; a trigger created then
    is heard by NOTIFY at once, and its first event fires it."""
    import asyncpg

    from core.db import _init_connection, _reset_cheaply

    statements: list[str] = []

    async def init(conn: asyncpg.Connection) -> None:
        await _init_connection(conn)
        conn.add_query_logger(lambda logged: statements.append(logged.query))

    counted = await asyncpg.create_pool(
        settings.database_url, min_size=1, max_size=4, init=init, reset=_reset_cheaply
    )
    consumer = EventTriggerLoop(counted, redis, "counted")
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    pid = project["id"]
    try:
        for _ in range(100):  # until it listens (its group exists by then)
            if any(q.startswith("LISTEN") for q in statements):
                break
            await asyncio.sleep(0.05)
        await events.publish(redis, "order.created", pid, "order", "warm-up", {})
        await drained(redis)  # the watched pairs loaded
        before = len(statements)
        for i in range(200):
            await events.publish(redis, "order.created", pid, "order", f"order-{i}", {"n": i})
        await drained(redis)
        assert statements[before:] == []

        trigger = await event_trigger(api, project, handler, "orders", {"resource": "order"})
        late = await events.publish(redis, "order.created", pid, "order", "order-late", {})
        await drained(redis)
        rows = await executions_of(pool, trigger["id"])
        assert [r["event_id"] for r in rows] == [late]
        assert len(statements) > before  # that event was looked up, and fired
    finally:
        stop.set()
        await task
        await counted.close()


def test_the_trigger_index_finds_exactly_what_checking_every_trigger_finds():
    from scheduler.event_triggers import EventSpec, _matches, _TriggerIndex

    filters_ = [
        {},
        {"k": 1},
        {"k": 1.0},
        {"k": True},
        {"k": "1"},
        {"k": None},
        {"k": {"$eq": 2}},
        {"k": {"$gt": 1}},
        {"k": [1, 2]},
        {"a.b": "x"},
        {"a.b": "x", "k": 2},
        {"$or": [{"k": 1}, {"k": 2}]},
        {"k": {"$ne": 1}},
        {"tags.0": "red"},
    ]
    rows = [
        {"id": f"t{i:02d}", "spec": {"resource": "item", "filter": f, "actions": ["created"]}}
        for i, f in enumerate(filters_)
    ]
    index = _TriggerIndex()
    for row in rows:
        index.add(row)
    datas = [
        {},
        {"k": 1},
        {"k": 1.0},
        {"k": True},
        {"k": "1"},
        {"k": None},
        {"k": 2},
        {"k": 3},
        {"k": [1, 2]},
        {"a": {"b": "x"}, "k": 2},
        {"a": {"b": "y"}},
        {"tags": ["red"]},
    ]
    for action in ("created", "deleted"):
        for data in datas:
            event = {"action": action, "data": data}
            every = [r["id"] for r in rows if _matches(EventSpec.model_validate(r["spec"]), event)]
            indexed = [r["id"] for r, spec in index.candidates(event) if _matches(spec, event)]
            assert indexed == every, (action, data)
