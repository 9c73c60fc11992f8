"""The event stream: a full execution lifecycle in order, resumable, filtered by type glob
and by what the token may see; external events via POST /events."""

from __future__ import annotations

import asyncio

from tests.conftest import token_for
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


async def test_post_event_filters_and_visibility(api, project, pool):
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
        status, created = await api.post("/api/v1/projects", {"name": "third"})
        # Nothing of the invoice.* kind reaches a service.* filter; a service event does.
        with_service = asyncio.create_task(read_sse(other_types, stop_after=1))
        await asyncio.sleep(0.2)
        assert not with_service.done()
        with_service.cancel()


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
