"""Handlers for services."""

from __future__ import annotations

from aiohttp import web

from core import queue, replica_store, services
from core.services import ServiceStatus
from service.http import principal
from service.keys import DB, REDIS, SECRETS, SETTINGS


async def create_service(request: web.Request, body, query):
    return await services.create_service(
        request.app[DB],
        request.app[SECRETS],
        principal(request),
        body,
        request.app[REDIS],
        default_timeout_s=request.app[SETTINGS].default_execution_timeout_s,
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
    replicas = await replica_store.live_replicas(pool, row["id"])
    # Why replicas of the current generation cannot start, while none of them is ready.
    failed = None
    if not any(r.status == "ready" and r.generation == row["generation"] for r in replicas):
        failed = await replica_store.last_failed_replica(
            pool, row["id"], generation=row["generation"]
        )
    return ServiceStatus(
        queue_length=await queue.queue_length(request.app[REDIS], row["id"]),
        in_progress=in_progress,
        desired_replicas=row["desired_replicas"],
        replicas=replicas,
        last_failure=failed,
    )
