"""The event stream over SSE (`GET /events/stream`) and external events (`POST /events`).

Events live in one bounded Redis stream (`core.events`); the stream id is the SSE id, so
`Last-Event-ID` resumes exactly after the last event a client saw. Without it a client
gets the events from the moment it connected. Tokens see only their own project's events.
"""

from __future__ import annotations

import json
from fnmatch import fnmatchcase
from typing import Any

from aiohttp import web
from pydantic import Field

from core import events
from core.auth import Role
from core.errors import Invalid, NotFound
from core.models import Model, Request
from service.http import principal
from service.keys import DB, REDIS
from service.streams import (
    ClientGone,
    Entry,
    LiveResponse,
    decode_entries,
    hub_for,
    parse_stream_id,
    stream_id_key,
)

PAGE = 1_000
_NAME = r"^[a-z][a-z0-9_-]{0,62}$"


class EventCreate(Request):
    body_kind = "input"  # `data` is what triggered executions take as input

    project: str
    resource: str = Field(pattern=_NAME)
    action: str = Field(pattern=_NAME)
    resource_id: str = Field(min_length=1, max_length=200)
    data: dict[str, Any] = Field(default_factory=dict)


class EventAccepted(Model):
    id: str
    type: str


def event_payload(entry: Entry) -> dict[str, Any]:
    stream_id, f = entry
    try:
        data = json.loads(f.get("data") or "{}")
    except ValueError:
        data = {}
    return {
        "id": stream_id,
        "type": f.get("type", ""),
        "at": f.get("at", ""),
        "project": f.get("project", ""),
        "resource": f.get("resource", ""),
        "resource_id": f.get("resource_id", ""),
        "data": data,
    }


async def post_event(request: web.Request, body: EventCreate, query):
    by = principal(request)
    by.require(Role.developer, body.project)
    if not await request.app[DB].fetchval("SELECT 1 FROM projects WHERE id = $1", body.project):
        raise NotFound("project not found")
    type_ = f"{body.resource}.{body.action}"
    event_id = await events.publish(
        request.app[REDIS], type_, body.project, body.resource, body.resource_id, body.data
    )
    return EventAccepted(id=event_id, type=type_), 202


async def event_stream(request: web.Request, body, query):
    by = principal(request)
    project = by.project_filter(query.project)
    globs = [g.strip() for g in (query.types or "").split(",") if g.strip()]
    header = request.headers.get("Last-Event-ID")
    resume = header or query.last_event_id
    if resume:
        resume = parse_stream_id(resume)
        if resume is None:
            field = "Last-Event-ID" if header else "last_event_id"
            raise Invalid.field(field, "an event id such as 1700000000000-0")

    def keep(payload: dict[str, Any]) -> bool:
        if project is not None and payload["project"] != project:
            return False
        return not globs or any(fnmatchcase(payload["type"], g) for g in globs)

    redis = request.app[REDIS]
    out = await LiveResponse(request, "sse").start()

    async def send(entries: list[Entry]) -> None:
        items = []
        for entry in entries:
            payload = event_payload(entry)
            if keep(payload):
                items.append((payload["id"], None, payload, ""))
        await out.send(items)

    async def catch_up(after: str, until: str = "+") -> str:
        while True:
            entries = decode_entries(
                await redis.xrange(events.EVENTS_STREAM, min=f"({after}", max=until, count=PAGE)
            )
            await send(entries)
            if entries:
                after = entries[-1][0]
            if len(entries) < PAGE:
                return after

    hub = hub_for(request.app, redis)
    sub = await hub.subscribe(events.EVENTS_STREAM)
    try:
        cursor = sub.start_id
        if resume and stream_id_key(resume) < stream_id_key(cursor):
            await catch_up(resume, cursor)
        elif resume:
            cursor = resume
        while True:
            entries, overflow = await sub.get(1.0)
            if overflow:
                cursor = await catch_up(cursor)
            fresh = [e for e in entries if stream_id_key(e[0]) > stream_id_key(cursor)]
            if fresh:
                await send(fresh)
                cursor = fresh[-1][0]
            await out.heartbeat_if_due()
    except ClientGone:
        return out.response
    finally:
        hub.unsubscribe(sub)
