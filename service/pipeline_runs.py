"""Handlers for running pipelines: execute, pipeline executions, their logs, statistics."""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import web

from core import pipeline_runs
from core.states import TERMINAL
from service.http import principal
from service.keys import DB, REDIS, WAITERS
from service.streams import ClientGone, LiveResponse, live_mode
from service.waiters import wait_until

FOLLOW_POLL_S = 0.5  # lines of several executions: read from PostgreSQL, woken early at the end


async def execute(request: web.Request, body, query):
    execution, created = await pipeline_runs.execute(
        request.app[DB], request.app[REDIS], principal(request), request.match_info["id"], body
    )
    # A repeated idempotency key answers with the first pipeline execution, 200 rather than 201.
    return execution, 201 if created else 200


async def list_pipeline_executions(request: web.Request, body, query):
    return await pipeline_runs.list_pipeline_executions(
        request.app[DB],
        principal(request),
        project=query.project,
        pipeline=query.pipeline,
        status=query.status,
        cursor=query.cursor,
        limit=query.limit,
        order=query.order,
    )


async def get_pipeline_execution(request: web.Request, body, query):
    return await pipeline_runs.get(request.app[DB], principal(request), request.match_info["id"])


async def wait_pipeline_execution(request: web.Request, body, query):
    """Long-poll: answer when the run has ended or when the timeout passes."""
    pipeline_execution_id = request.match_info["id"]

    async def read() -> pipeline_runs.PipelineExecution:
        return await pipeline_runs.get(request.app[DB], principal(request), pipeline_execution_id)

    return await wait_until(
        request.app[WAITERS],
        pipeline_execution_id,
        query.timeout,
        read,
        lambda e: e.status in TERMINAL,
    )


async def terminate(request: web.Request, body, query):
    execution = await pipeline_runs.terminate(
        request.app[DB], request.app[REDIS], principal(request), request.match_info["id"]
    )
    return execution, 202


async def resume(request: web.Request, body, query):
    return await pipeline_runs.resume(
        request.app[DB], request.app[REDIS], principal(request), request.match_info["id"], body
    )


async def logs(request: web.Request, body, query):
    """JSON pages, or with `follow` and an SSE/plain-text Accept header, every line as it
    is written until the run has ended and every line was sent."""
    pool, by = request.app[DB], principal(request)
    pipeline_execution_id = request.match_info["id"]
    mode = live_mode(request)
    cursor = request.headers.get("Last-Event-ID") or query.cursor
    if mode is None:
        return await pipeline_runs.list_logs(
            pool, by, pipeline_execution_id, cursor=cursor, limit=query.limit
        )
    row = await pipeline_runs.fetch_pipeline_execution(pool, by, pipeline_execution_id)
    out = await LiveResponse(request, mode).start()
    waiters = request.app[WAITERS]
    try:
        while True:
            ended = waiters.register(pipeline_execution_id)
            try:
                status = await pool.fetchval(
                    "SELECT status FROM pipeline_executions WHERE id = $1", row["id"]
                )
                while True:  # everything written so far
                    page = await pipeline_runs.list_logs(
                        pool, by, pipeline_execution_id, cursor=cursor, limit=1000
                    )
                    cursor = page["next_cursor"]
                    await out.send(
                        [
                            (
                                cursor,
                                "log",
                                line.model_dump(mode="json"),
                                f"[{line.node}] {line.text}",
                            )
                            for line in page["items"]
                        ]
                    )
                    if len(page["items"]) < 1000:
                        break
                if status in TERMINAL or not query.follow:
                    if query.follow or status in TERMINAL:
                        await out.end({"status": status, "cursor": cursor})
                    return out.response
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(ended), FOLLOW_POLL_S)
                await out.heartbeat_if_due()
            finally:
                waiters.discard(pipeline_execution_id, ended)
    except ClientGone:
        return out.response


async def statistics(request: web.Request, body, query):
    return await pipeline_runs.statistics(
        request.app[DB], principal(request), request.match_info["id"]
    )


async def reset_statistics(request: web.Request, body, query):
    await pipeline_runs.reset_statistics(
        request.app[DB], principal(request), request.match_info["id"]
    )
