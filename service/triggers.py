"""Handlers for triggers."""

from __future__ import annotations

from aiohttp import web

from core import triggers
from service.http import principal
from service.keys import DB, REDIS


async def create_trigger(request: web.Request, body, query):
    trigger = await triggers.create_trigger(request.app[DB], principal(request), body)
    if trigger.type == "event":
        # From now on the stream keeps events for the schedulers, even if none runs yet.
        await triggers.ensure_events_group(request.app[REDIS])
    return trigger


async def list_triggers(request: web.Request, body, query):
    return await triggers.list_triggers(
        request.app[DB],
        principal(request),
        filters=query.model_dump(exclude={"limit", "cursor", "order"}),
        cursor=query.cursor,
        limit=query.limit,
        order=query.order,
    )


async def get_trigger(request: web.Request, body, query):
    return await triggers.get_trigger(request.app[DB], principal(request), request.match_info["id"])


async def update_trigger(request: web.Request, body, query):
    return await triggers.update_trigger(
        request.app[DB], principal(request), request.match_info["id"], body
    )


async def delete_trigger(request: web.Request, body, query):
    await triggers.delete_trigger(request.app[DB], principal(request), request.match_info["id"])


async def pause_trigger(request: web.Request, body, query):
    return await triggers.set_active(
        request.app[DB], principal(request), request.match_info["id"], False
    )


async def resume_trigger(request: web.Request, body, query):
    return await triggers.set_active(
        request.app[DB], principal(request), request.match_info["id"], True
    )


async def next_fire_times(request: web.Request, body, query):
    return await triggers.preview(
        request.app[DB], principal(request), request.match_info["id"], query.count
    )
