"""Fixtures' helpers for the execution engine: a worker and a scheduler in this process."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from core.settings import Settings
from scheduler.reconciler import Reconciler
from worker.host import WorkerHost


@contextlib.asynccontextmanager
async def running_worker(
    settings: Settings, pool: Any, redis: Any, **overrides: Any
) -> AsyncIterator[WorkerHost]:
    # Port 0: tests never bind the worker's metrics port.
    host = WorkerHost(
        settings.model_copy(update={"metrics_port_worker": 0, **overrides}), pool, redis
    )
    stop = asyncio.Event()
    task = asyncio.create_task(host.run(stop))
    try:
        yield host
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


@contextlib.asynccontextmanager
async def running_reconciler(
    pool: Any, redis: Any, interval_s: float = 0.2
) -> AsyncIterator[Reconciler]:
    reconciler = Reconciler(pool, redis)

    async def loop() -> None:
        while True:
            await reconciler.run_once()
            await asyncio.sleep(interval_s)

    task = asyncio.create_task(loop())
    try:
        yield reconciler
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def wait_for_status(api: Any, execution_id: str, timeout_s: float = 60) -> dict:
    status, body = await api.get(f"/api/v1/executions/{execution_id}/wait?timeout={timeout_s}")
    assert status == 200, body
    return body


async def wait_parked(api: Any, execution_id: str, timeout_s: float = 30) -> None:
    """Until a `GET /executions/{id}/wait` request is parked on the execution: registered
    with the API's waiters and awaiting its wake-up (past its first read of the row), so
    that what answers it next can only be the wake-up or its timeout."""
    from service.keys import WAITERS

    waiters = api.client.app[WAITERS]
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        futures = waiters._waiting.get(execution_id, ())
        # The handler shields its future while it waits: a done callback appears then.
        if any(f._callbacks for f in futures):
            return
        assert asyncio.get_running_loop().time() < deadline, f"no waiter parked on {execution_id}"
        await asyncio.sleep(0.01)
