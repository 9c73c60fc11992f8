"""Handlers for triggers."""

from __future__ import annotations

import logging

from aiohttp import web
from redis.exceptions import RedisError

from core import triggers
from service.http import principal
from service.keys import DB, REDIS

log = logging.getLogger(__name__)


async def create_trigger(request: web.Request, body, query):
    trigger = await triggers.create_trigger(request.app[DB], principal(request), body)
    if trigger.type == "event":
        # From now on the stream keeps events for the schedulers, even if none runs yet. Best
        # effort: the trigger is committed, and every scheduler creates the group at start.
        try:
            await triggers.ensure_events_group(request.app[REDIS])
        except (OSError, RedisError) as exc:
            log.warning("events consumer group not created: %s", exc)
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
