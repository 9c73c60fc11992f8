"""The event stream: a full execution lifecycle in order, resumable, filtered by type glob
and by what the token may see; external events via POST /events."""

from __future__ import annotations

import asyncio

from core import events
from service import streams
from tests.conftest import echo_archive, token_for
from tests.engine_helpers import running_worker, wait_for_status
from tests.stream_helpers import read_sse

SSE = {"Accept": "text/event-stream"}


def _open(api, query: str = "", last_id: str | None = None):
    headers = {**SSE, "Authorization": f"Bearer {api.token}"}
    if last_id:
        headers["Last-Event-ID"] = last_id
    return api.client.get(f"/api/v1/events/stream{query}", headers=headers)


async def test_lifecycle_in_order_and_resume(api, service, settings, pool, redis):
    async with _open(api, "?types=execution.*") as response:
        assert response.status == 200
        async with running_worker(settings, pool, redis, runtime="process", worker_id="w"):
            status, execution = await api.post(
                "/api/v1/executions",
                {"service": service["id"], "function": "echo", "input": {"text": "hi"}},
            )
            assert status == 201
            await wait_for_status(api, execution["id"])
            events = await asyncio.wait_for(read_sse(response, stop_after=3), 20)
    mine = [e for e in events if e["data"]["resource_id"] == execution["id"]]
    assert [e["data"]["type"] for e in mine] == [
        "execution.created",
        "execution.in-progress",
        "execution.success",
    ]
    assert all(e["data"]["project"] == service["project"] for e in mine)
    # Resume after the first: the other two, nothing twice.
    async with _open(api, "?types=execution.*", last_id=mine[0]["id"]) as response:
        again = await asyncio.wait_for(read_sse(response, stop_after=2), 10)
    assert [e["id"] for e in again] == [e["id"] for e in mine[1:]]


async def test_post_event_filters_and_visibility(api, project, package, pool):
    status, other = await api.post("/api/v1/projects", {"name": "other"})
    developer = api.as_token(await token_for(pool, "developer", project["id"]))
    viewer = api.as_token(await token_for(pool, "viewer", project["id"]))
    outsider = api.as_token(await token_for(pool, "developer", other["id"]))

    body = {
        "project": project["id"],
        "resource": "invoice",
        "action": "paid",
        "resource_id": "i1",
        "data": {"amount": 12},
    }
    status, answer = await viewer.post("/api/v1/events", body)
    assert status == 403
    status, answer = await outsider.post("/api/v1/events", body)
    assert status == 404
    status, answer = await developer.post("/api/v1/events", {**body, "action": "Bad Name"})
    assert status == 422

    async with (
        _open(viewer, "?types=invoice.*") as mine,
        _open(outsider) as theirs,
        _open(api, "?types=service.*") as other_types,
    ):
        status, first = await developer.post("/api/v1/events", body)
        assert status == 202 and first["type"] == "invoice.paid"
        status, _ = await outsider.post(
            "/api/v1/events", {**body, "project": other["id"], "resource_id": "o1"}
        )
        status, second = await developer.post("/api/v1/events", {**body, "action": "refunded"})
        seen = await asyncio.wait_for(read_sse(mine, stop_after=2), 10)
        assert [e["id"] for e in seen] == [first["id"], second["id"]]
        assert seen[0]["data"]["data"] == {"amount": 12}
        assert seen[0]["data"]["type"] == "invoice.paid"
        foreign = await asyncio.wait_for(read_sse(theirs, stop_after=1), 10)
        assert foreign[0]["data"]["resource_id"] == "o1"  # its own project's only
        # Nothing of the invoice.* kind reaches a service.* filter; a service event does,
        # and it is the first thing that filter sees.
        status, service = await api.post(
            "/api/v1/services",
            {"project": project["id"], "name": "svc", "package": package["id"]},
        )
        assert status == 201, service
        [first_service_event] = await asyncio.wait_for(read_sse(other_types, stop_after=1), 10)
        assert first_service_event["data"]["type"] == "service.created"
        assert first_service_event["data"]["resource_id"] == service["id"]


async def test_service_events(api, project, package):
    async with _open(api, "?types=service.*") as response:
        status, service = await api.post(
            "/api/v1/services",
            {"project": project["id"], "name": "svc", "package": package["id"]},
        )
        await api.post(f"/api/v1/services/{service['id']}/pause")
        await api.post(f"/api/v1/services/{service['id']}/resume")
        await api.patch(f"/api/v1/services/{service['id']}", {"max_attempts": 2})
        await api.delete(f"/api/v1/services/{service['id']}")
        events = await asyncio.wait_for(read_sse(response, stop_after=5), 10)
    assert [e["data"]["type"] for e in events] == [
        "service.created",
        "service.paused",
        "service.resumed",
        "service.updated",
        "service.deleted",
    ]


async def test_terminated_event(api, service):
    async with _open(api, "?types=execution.terminated") as response:
        status, execution = await api.post(
            "/api/v1/executions",
            {"service": service["id"], "function": "echo", "input": {"text": "x"}},
        )
        status, _ = await api.post(f"/api/v1/executions/{execution['id']}/terminate")
        assert status == 202
        [event] = await asyncio.wait_for(read_sse(response, stop_after=1), 10)
    assert event["data"]["resource_id"] == execution["id"]


# -- retrying, progress and replica events ----------------------------------------------------

FLAKY_CODE = """
import os
import signal
import time


def flaky(progress, context):
    progress.update(30, f"attempt {context.attempt}")
    if context.attempt == 1:
        time.sleep(0.5)  # the progress is written before the replica goes
        os.kill(os.getppid(), signal.SIGKILL)  # the replica's agent dies mid-execution
        time.sleep(30)
    return {"attempt": context.attempt}
"""

FLAKY_MANIFEST = {
    "name": "flaky",
    "modules": [
        {
            "name": "main",
            "entry_point": "main.py",
            "functions": [{"name": "flaky", "inputs": [], "outputs": []}],
        }
    ],
}


async def read_until(response, done, timeout_s: float = 60) -> list[dict]:
    """SSE events until `done(event)` is true for one of them."""
    seen: list[dict] = []

    async def read() -> None:
        while not seen or not done(seen[-1]):
            more = await read_sse(response, stop_after=1)
            assert more, f"the stream ended: {seen}"
            seen.extend(more)

    try:
        await asyncio.wait_for(read(), timeout_s)
    except TimeoutError:
        raise AssertionError(f"not seen in {timeout_s} s; seen: {seen}") from None
    return seen


async def test_retrying_progress_and_replica_events(api, project, settings, pool, redis):
    status, package = await api.upload(project["id"], echo_archive(FLAKY_MANIFEST, FLAKY_CODE))
    assert status == 201, package
    status, service = await api.post(
        "/api/v1/services",
        {
            "project": project["id"],
            "name": "flaky",
            "package": package["id"],
            "runtime": {"max_replicas": 1},
        },
    )
    assert status == 201, service
    async with _open(api, "?types=execution.*,replica.*") as response:
        assert response.status == 200
        async with running_worker(settings, pool, redis, runtime="process", worker_id="w"):
            status, execution = await api.post(
                "/api/v1/executions", {"service": service["id"], "function": "flaky"}
            )
            assert status == 201, execution
            done = await wait_for_status(api, execution["id"])
            events = await read_until(
                response,
                lambda e: (
                    e["data"]["type"] == "execution.success"
                    and e["data"]["resource_id"] == execution["id"]
                ),
            )
    assert (done["status"], done["attempt"]) == ("success", 2), done
    mine = [e["data"] for e in events if e["data"]["resource_id"] == execution["id"]]
    assert [e["type"] for e in mine] == [
        "execution.created",
        "execution.in-progress",
        "execution.progress",
        "execution.retrying",
        "execution.in-progress",
        "execution.progress",
        "execution.success",
    ], mine
    progress = [e["data"] for e in mine if e["type"] == "execution.progress"]
    assert progress == [
        {"percent": 30, "message": "attempt 1"},
        {"percent": 30, "message": "attempt 2"},
    ]
    replicas = [
        r["id"]
        for r in await pool.fetch(
            "SELECT id FROM replicas WHERE service_id = $1 ORDER BY started_at", service["id"]
        )
    ]
    assert len(replicas) == 2, replicas
    lifecycle = [
        (e["data"]["resource_id"], e["data"]["type"])
        for e in events
        if e["data"]["resource"] == "replica"
    ]
    first = [t for r, t in lifecycle if r == replicas[0]]
    second = [t for r, t in lifecycle if r == replicas[1]]
    assert first[:2] == ["replica.starting", "replica.ready"], lifecycle
    assert first[-1] == "replica.failed", lifecycle
    assert second[:2] == ["replica.starting", "replica.ready"], lifecycle
    assert all(
        e["data"]["data"]["service"] == service["id"]
        for e in events
        if e["data"]["resource"] == "replica"
    )


# -- the stream itself: keep-alives, a client that left, a follower far behind ---------------


async def test_keep_alives_while_nothing_matches(api, monkeypatch):
    monkeypatch.setattr(streams, "HEARTBEAT_S", 0.3)
    async with _open(api, "?types=nothing.*") as response:
        assert response.status == 200
        comments = []

        async def two_keep_alives() -> None:
            async for raw in response.content:
                line = raw.decode().rstrip("\r\n")
                assert not line.startswith("data:"), line
                if line.startswith(":"):
                    comments.append(line)
                    if len(comments) == 2:
                        return

        await asyncio.wait_for(two_keep_alives(), 30)
    assert comments == [": keep-alive", ": keep-alive"]


async def test_a_client_that_left_is_noticed(api, redis):
    hub = streams.hub_for(api.client.app, redis)

    def followers() -> int:
        state = hub.keys.get(events.EVENTS_STREAM)
        return len(state.subs) if state else 0

    async with _open(api) as response:
        assert response.status == 200
        for _ in range(200):
            if followers() == 1:
                break
            await asyncio.sleep(0.05)
        assert followers() == 1
        response.close()  # the client goes away without a word
    for _ in range(600):
        if followers() == 0:
            break
        await asyncio.sleep(0.05)
    assert followers() == 0, "the server still serves a client that left"


async def test_a_follower_far_behind_catches_up_in_order(api, project, redis, monkeypatch):
    # A follower may lag 10 entries: 500 arriving at once overflow it, and it catches up
    # from the stream itself, every event once and in order.
    monkeypatch.setattr(streams, "MAX_BUFFER", 10)
    async with _open(api, "?types=burst.*") as response:
        assert response.status == 200
        hub = streams.hub_for(api.client.app, redis)
        for _ in range(200):
            if hub.keys.get(events.EVENTS_STREAM):
                break
            await asyncio.sleep(0.05)
        async with redis.pipeline(transaction=True) as pipe:  # one atomic burst
            for n in range(500):
                pipe.xadd(
                    events.EVENTS_STREAM,
                    events.event_fields("burst.made", project["id"], "burst", f"b{n}", {"n": n}),
                )
            ids = [i.decode() if isinstance(i, bytes) else i for i in await pipe.execute()]
        await asyncio.sleep(1.0)  # the client reads nothing for a while
        seen = await asyncio.wait_for(read_sse(response, stop_after=500), 60)
    assert [e["id"] for e in seen] == ids
    assert [e["data"]["data"]["n"] for e in seen] == list(range(500))
