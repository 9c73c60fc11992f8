"""Wake `GET /executions/{id}/wait` callers when PostgreSQL notifies a terminal status.

One LISTEN connection per API process fans notifications out to in-process futures, so
waiting costs no polling and no connection per waiter.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

from core.states import NOTIFY_CHANNEL


class FinishedWaiters:
    def __init__(self) -> None:
        self._waiting: dict[str, set[asyncio.Future[None]]] = defaultdict(set)
        self._conn: asyncpg.Connection | None = None

    async def start(self, dsn: str) -> None:
        self._conn = await asyncpg.connect(dsn)
        await self._conn.add_listener(NOTIFY_CHANNEL, self._on_notify)

    async def stop(self) -> None:
        if self._conn is not None:
            await self._conn.close()
        for futures in self._waiting.values():
            for future in futures:
                future.cancel()

    def _on_notify(self, _conn: object, _pid: int, _channel: str, execution_id: str) -> None:
        for future in self._waiting.pop(execution_id, ()):
            if not future.done():
                future.set_result(None)

    def register(self, execution_id: str) -> asyncio.Future[None]:
        # Register before reading the row, so a finish between read and wait is not missed.
        future = asyncio.get_running_loop().create_future()
        self._waiting[execution_id].add(future)
        return future

    def discard(self, execution_id: str, future: asyncio.Future[None]) -> None:
        futures = self._waiting.get(execution_id)
        if futures is not None:
            futures.discard(future)
            if not futures:
                del self._waiting[execution_id]


@asynccontextmanager
async def listen(dsn: str) -> AsyncIterator[FinishedWaiters]:
    waiters = FinishedWaiters()
    await waiters.start(dsn)
    try:
        yield waiters
    finally:
        await waiters.stop()
