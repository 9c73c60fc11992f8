"""Handlers for executions."""

from __future__ import annotations

from aiohttp import web

from core import executions
from core.errors import Invalid
from core.states import TERMINAL
from service import waiters
from service.http import principal
from service.keys import DB, REDIS, SETTINGS, WAITERS
from service.queries import seq_cursor


async def create_execution(request: web.Request, body, query):
    [(execution, created)] = await executions.create_executions(
        request.app[DB], request.app[REDIS], principal(request), [body]
    )
    if query.wait > 0 and execution.status not in TERMINAL:
        execution = await _until_terminal(request, execution.id, query.wait)
    # A repeated idempotency key answers with the first execution, 200 rather than 201.
    return execution, 201 if created else 200


async def create_batch(request: web.Request, body, query):
    limit = request.app[SETTINGS].batch_max
    if len(body.executions) > limit:
        raise Invalid.field("executions", f"at most {limit} executions per batch")
    results = await executions.create_executions(
        request.app[DB], request.app[REDIS], principal(request), body.executions, batch=True
    )
    return {"items": [execution for execution, _ in results]}


async def list_executions(request: web.Request, body, query):
    filters = query.model_dump(exclude={"limit", "cursor", "order"})
    return await executions.list_executions(
        request.app[DB],
        principal(request),
        filters=filters,
        cursor=query.cursor,
        limit=query.limit,
        order=query.order,
    )


async def get_execution(request: web.Request, body, query):
    return await executions.get_execution(
        request.app[DB], principal(request), request.match_info["id"]
    )


async def wait_execution(request: web.Request, body, query):
    """Long-poll: answer at a terminal status or when the timeout passes, whichever is first."""
    return await _until_terminal(request, request.match_info["id"], query.timeout)


async def _until_terminal(request: web.Request, execution_id: str, seconds: float):
    async def read() -> executions.Execution:
        return await executions.get_execution(request.app[DB], principal(request), execution_id)

    return await waiters.wait_until(
        request.app[WAITERS], execution_id, seconds, read, lambda e: e.status in TERMINAL
    )


async def counters(request: web.Request, body, query):
    return await executions.counters(
        request.app[DB], principal(request), project=query.project, service=query.service
    )


async def terminate(request: web.Request, body, query):
    execution = await executions.terminate(
        request.app[DB], request.app[REDIS], principal(request), request.match_info["id"]
    )
    return execution, 202


async def rerun(request: web.Request, body, query):
    return await executions.rerun(
        request.app[DB], request.app[REDIS], principal(request), request.match_info["id"]
    )


async def update_progress(request: web.Request, body, query):
    return await executions.update_progress(
        request.app[DB], principal(request), request.match_info["id"], body
    )


async def list_logs(request: web.Request, body, query):
    return await executions.list_logs(
        request.app[DB],
        principal(request),
        request.match_info["id"],
        after_seq=seq_cursor(query.cursor),
        limit=query.limit,
    )
