"""`ferry api --workers 2`: two processes on one port, each with its own stream hub. Live
followers spread over both get every line once: one from the start, one that connects
mid-stream, one that leaves and resumes with Last-Event-ID."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys

import aiohttp

from tests.engine_helpers import running_worker, wait_for_status
from tests.stream_helpers import chatty_service, read_sse

SSE = {"Accept": "text/event-stream"}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _seqs(events) -> list[int]:
    return [e["data"]["seq"] for e in events if e["event"] == "log"]


async def test_followers_get_every_line_once_across_two_api_processes(
    api, project, settings, pool, redis
):
    port = _free_port()
    env = {
        **os.environ,
        "FERRY_DATABASE_URL": settings.database_url,
        "FERRY_REDIS_URL": settings.redis_url,
        "FERRY_DATA_DIR": str(settings.data_dir),
        "FERRY_SECRET_KEY": settings.secret_key,
        "FERRY_API_HOST": "127.0.0.1",
        "FERRY_API_PORT": str(port),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ferry", "api", "--workers", "2", env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    headers = {**SSE, "Authorization": f"Bearer {api.token}"}
    # A connection of its own per request: the kernel spreads them over the processes.
    sessions = [
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) for _ in range(8)
    ]
    try:
        for _ in range(300):
            try:
                async with sessions[0].get(f"{base}/readyz") as response:
                    if response.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
        service = await chatty_service(api, project["id"])
        async with running_worker(settings, pool, redis, runtime="process", worker_id="w"):
            status, body = await api.post(
                "/api/v1/executions",
                {
                    "service": service["id"],
                    "function": "chatty",
                    "input": {"n": 1000, "pause": 0.003, "start_after": 0.5},
                },
            )
            assert status == 201, body
            url = f"{base}/api/v1/executions/{body['id']}/logs?follow=true"
            halfway = asyncio.Event()

            async def whole(session: aiohttp.ClientSession) -> list[dict]:
                async with session.get(url, headers=headers) as response:
                    assert response.status == 200
                    events = await read_sse(response, stop_after=300)
                    halfway.set()
                    return events + await read_sse(response)

            async def mid_stream(session: aiohttp.ClientSession) -> list[dict]:
                await halfway.wait()
                async with session.get(url, headers=headers) as response:
                    return await read_sse(response)

            async def resumed(first: aiohttp.ClientSession, again: aiohttp.ClientSession):
                async with first.get(url, headers=headers) as response:
                    events = await read_sse(response, stop_after=400)
                resume = {**headers, "Last-Event-ID": events[-1]["id"]}
                async with again.get(url, headers=resume) as response:
                    return events + await read_sse(response)

            results = await asyncio.wait_for(
                asyncio.gather(
                    whole(sessions[1]),
                    whole(sessions[2]),
                    mid_stream(sessions[3]),
                    mid_stream(sessions[4]),
                    resumed(sessions[5], sessions[6]),
                    resumed(sessions[7], sessions[0]),
                ),
                120,
            )
            await wait_for_status(api, body["id"])
        expected = _seqs(results[0])
        assert len(expected) == 1001  # 1,000 lines and "all done"
        assert expected == sorted(set(expected))
        for events in results:
            assert events[-1]["event"] == "end"
            assert events[-1]["data"]["status"] == "success"
            assert _seqs(events) == expected  # every line once, in order
    finally:
        for session in sessions:
            await session.close()
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 30)
    assert code == 0
