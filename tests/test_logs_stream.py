"""Live logs over SSE and text: every line once, in order, then `end`; resumable; 200
followers on one API process; invisible to other projects."""

from __future__ import annotations

import asyncio
import os
import statistics
import time

import aiohttp

from tests.conftest import token_for
from tests.engine_helpers import running_worker, wait_for_status
from tests.stream_helpers import chatty_service, read_sse

SSE = {"Accept": "text/event-stream"}


async def _start(api, service, **inputs) -> str:
    status, body = await api.post(
        "/api/v1/executions", {"service": service["id"], "function": "chatty", "input": inputs}
    )
    assert status == 201, body
    return body["id"]


def _log_texts(events):
    assert events[-1]["event"] == "end", events[-5:]
    lines = [e["data"] for e in events if e["event"] == "log"]
    return [line["text"] for line in lines], [line["seq"] for line in lines]


async def test_follow_every_line_then_end_and_resume(api, project, settings, pool, redis):
    service = await chatty_service(api, project["id"])
    async with running_worker(settings, pool, redis, runtime="process", worker_id="w"):
        execution_id = await _start(api, service, n=1000, pause=0.002, start_after=0.5)
        url = f"/api/v1/executions/{execution_id}/logs?follow=true"
        headers = {**SSE, "Authorization": f"Bearer {api.token}"}
        # A follower that leaves halfway, then comes back with Last-Event-ID.
        async with api.client.get(url, headers=headers) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/event-stream")
            first = await read_sse(response, stop_after=400)
        async with api.client.get(
            url, headers={**headers, "Last-Event-ID": first[-1]["id"]}
        ) as response:
            rest = await read_sse(response)
        # And one that stays from start to end.
        async with api.client.get(url, headers=headers) as response:
            whole = await read_sse(response)
        await wait_for_status(api, execution_id)

    texts, seqs = _log_texts(whole)
    assert [t.split(" t=")[0] for t in texts[:1000]] == [f"line {i}" for i in range(1000)]
    assert texts[-1] == "all done"
    assert seqs == sorted(set(seqs))
    assert whole[-1]["data"]["status"] == "success"

    resumed = [e["data"]["seq"] for e in first] + _log_texts(rest)[1]
    assert resumed == seqs  # no gap, no duplicate


async def test_plain_text_and_other_project(api, project, settings, pool, redis):
    service = await chatty_service(api, project["id"])
    async with running_worker(settings, pool, redis, runtime="process", worker_id="w"):
        execution_id = await _start(api, service, n=50, pause=0.001)
        response = await api.client.get(
            f"/api/v1/executions/{execution_id}/logs?follow=true",
            headers={"Accept": "text/plain", "Authorization": f"Bearer {api.token}"},
        )
        text = await response.text()
        await wait_for_status(api, execution_id)
    lines = text.splitlines()
    assert [line.split(" t=")[0] for line in lines[:50]] == [f"line {i}" for i in range(50)]
    assert lines[-1] == "all done"

    status, other = await api.post("/api/v1/projects", {"name": "other"})
    viewer = api.as_token(await token_for(pool, "viewer", other["id"]))
    status, body = await viewer.get(
        f"/api/v1/executions/{execution_id}/logs?follow=true", headers=SSE
    )
    assert status == 404, body
    status, _ = await viewer.get(f"/api/v1/services/{service['id']}/logs")
    assert status == 404
    # The JSON page still works as before.
    status, page = await api.get(f"/api/v1/executions/{execution_id}/logs?limit=10")
    assert status == 200 and len(page["items"]) == 10 and page["next_cursor"] == "10"


async def test_200_followers_and_latency(api, project, settings, pool, redis):
    service = await chatty_service(api, project["id"])
    followers = int(os.environ.get("FERRY_TEST_FOLLOWERS", "200"))
    async with running_worker(settings, pool, redis, runtime="process", worker_id="w"):
        execution_id = await _start(api, service, n=200, pause=0.01, start_after=2.0)
        url = api.client.make_url(f"/api/v1/executions/{execution_id}/logs?follow=true")
        headers = {**SSE, "Authorization": f"Bearer {api.token}"}
        latencies: list[float] = []

        async def follow(session: aiohttp.ClientSession, measure: bool):
            async with session.get(url, headers=headers) as response:
                assert response.status == 200
                events = []
                async for event in _timed(response):
                    events.append(event)
                    if measure and event["event"] == "log" and " t=" in event["data"]["text"]:
                        sent = float(event["data"]["text"].split(" t=")[1])
                        latencies.append(event["received"] - sent)
                return events

        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            started = time.monotonic()
            # A guard against a hang, not a speed bound: 200 followers parse 40,000 events in
            # this one process, which also serves them, on a machine that may be loaded.
            results = await asyncio.wait_for(
                asyncio.gather(*(follow(session, i == 0) for i in range(followers))), 240
            )
            elapsed = time.monotonic() - started
        await wait_for_status(api, execution_id)

    expected = [f"line {i}" for i in range(200)] + ["all done"]
    for events in results:
        texts, _ = _log_texts(events)
        assert [t.split(" t=")[0] for t in texts] == expected
    latencies.sort()
    p50 = statistics.median(latencies) * 1000
    p99 = latencies[int(len(latencies) * 0.99) - 1] * 1000
    print(
        f"\n{followers} followers, 201 lines each, {elapsed:.1f} s; "
        f"print → SSE received latency p50 {p50:.1f} ms, p99 {p99:.1f} ms"
    )


async def _timed(response: aiohttp.ClientResponse):
    """SSE events with the wall-clock time each arrived."""
    import json

    current: dict = {}
    async for raw in response.content:
        line = raw.decode().rstrip("\r\n")
        if not line:
            if "data" in current:
                current["data"] = json.loads(current["data"])
                current.setdefault("event", "message")
                current["received"] = time.time()
                yield current
                if current["event"] == "end":
                    return
            current = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(": ")
            current[name] = value


async def test_live_lines_are_rendered_once_for_all_followers(api, project, settings, pool, redis):
    from service import logs

    service = await chatty_service(api, project["id"])
    async with running_worker(settings, pool, redis, runtime="process", worker_id="w"):
        execution_id = await _start(api, service, n=300, pause=0.003, start_after=1.5)
        url = f"/api/v1/executions/{execution_id}/logs?follow=true"
        headers = {**SSE, "Authorization": f"Bearer {api.token}"}
        before = logs.frames_rendered

        async def follow() -> list:
            async with api.client.get(url, headers=headers) as response:
                return await read_sse(response)

        results = await asyncio.gather(*(follow() for _ in range(6)))
        await wait_for_status(api, execution_id)
    rendered = logs.frames_rendered - before
    seqs = _log_texts(results[0])[1]
    assert len(seqs) == 301
    for events in results:
        assert _log_texts(events)[1] == seqs  # every line once, in order
    # Lines that came live were rendered once for the six, not once per follower (lines a
    # follower read from PostgreSQL instead are rendered for it alone, and not counted).
    assert 0 < rendered <= len(seqs)
