"""Handlers for services."""

from __future__ import annotations

from aiohttp import web

from core import queue, services
from core.services import ReplicaStatus, ServiceStatus
from service.http import principal
from service.keys import DB, REDIS, SECRETS


async def create_service(request: web.Request, body, query):
    return await services.create_service(
        request.app[DB], request.app[SECRETS], principal(request), body, request.app[REDIS]
    )


async def list_services(request: web.Request, body, query):
    return await services.list_services(
        request.app[DB],
        principal(request),
        project=query.project,
        package=query.package,
        status=query.status,
        cursor=query.cursor,
        limit=query.limit,
        order=query.order,
    )


async def get_service(request: web.Request, body, query):
    return await services.get_service(request.app[DB], principal(request), request.match_info["id"])


async def update_service(request: web.Request, body, query):
    return await services.update_service(
        request.app[DB],
        request.app[SECRETS],
        principal(request),
        request.match_info["id"],
        body,
        request.app[REDIS],
    )


async def delete_service(request: web.Request, body, query):
    await services.delete_service(
        request.app[DB], principal(request), request.match_info["id"], request.app[REDIS]
    )


async def pause_service(request: web.Request, body, query):
    return await services.set_service_status(
        request.app[DB], principal(request), request.match_info["id"], "paused", request.app[REDIS]
    )


async def resume_service(request: web.Request, body, query):
    return await services.set_service_status(
        request.app[DB], principal(request), request.match_info["id"], "active", request.app[REDIS]
    )


async def service_status(request: web.Request, body, query):
    pool = request.app[DB]
    row = await services.fetch_service(pool, principal(request), request.match_info["id"])
    in_progress = await pool.fetchval(
        "SELECT count(*) FROM executions WHERE service_id = $1 AND status = 'in-progress'",
        row["id"],
    )
    replicas = await pool.fetch(
        """SELECT * FROM replicas WHERE service_id = $1 AND status IN ('starting', 'ready', 'draining')
           ORDER BY started_at""",
        row["id"],
    )
    return ServiceStatus(
        queue_length=await queue.queue_length(request.app[REDIS], row["id"]),
        in_progress=in_progress,
        desired_replicas=row["desired_replicas"],
        replicas=[ReplicaStatus.model_validate(dict(r)) for r in replicas],
    )
