"""Helpers for live-stream tests: a chatty function to follow and an SSE reader."""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from tests.conftest import echo_archive

CHATTY_MANIFEST = {
    "name": "chatty",
    "modules": [
        {
            "name": "main",
            "entry_point": "main.py",
            "functions": [
                {
                    "name": "chatty",
                    "inputs": [
                        {"name": "n", "type": "integer", "default": 1000},
                        {"name": "pause", "type": "number", "default": 0.001},
                        {"name": "start_after", "type": "number", "default": 0.0},
                    ],
                    "outputs": [],
                }
            ],
        }
    ],
}

CHATTY_CODE = """
import sys
import time


def chatty(n=1000, pause=0.001, start_after=0.0):
    time.sleep(start_after)
    for i in range(n):
        print(f"line {i} t={time.time():.6f}", flush=True)
        if i % 10 == 9:
            time.sleep(pause * 10)
    print("all done", file=sys.stderr, flush=True)
"""


async def chatty_service(api, project_id: str) -> dict:
    status, package = await api.upload(project_id, echo_archive(CHATTY_MANIFEST, CHATTY_CODE))
    assert status == 201, package
    status, service = await api.post(
        "/api/v1/services", {"project": project_id, "name": "chatty", "package": package["id"]}
    )
    assert status == 201, service
    return service


async def read_sse(
    response: aiohttp.ClientResponse, stop_after: int | None = None
) -> list[dict[str, Any]]:
    """Events as {id, event, data} until the stream closes, an `end`, or `stop_after` events."""
    events: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    async for raw in response.content:
        line = raw.decode().rstrip("\r\n")
        if not line:
            if "data" in current:
                current["data"] = json.loads(current["data"])
                current.setdefault("event", "message")
                events.append(current)
                if current["event"] == "end" or (stop_after and len(events) >= stop_after):
                    return events
            current = {}
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data" and "data" in current:
            current["data"] += "\n" + value
        else:
            current[name] = value
    return events
