"""Wake `GET /executions/{id}/wait` callers when PostgreSQL notifies a terminal status.

One LISTEN connection per API process fans notifications out to in-process futures, so
waiting costs no polling and no connection per waiter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

import asyncpg

from core.outages import UNAVAILABLE, Outage
from core.states import NOTIFY_CHANNEL

log = logging.getLogger(__name__)
T = TypeVar("T")


class FinishedWaiters:
    def __init__(self) -> None:
        self._waiting: dict[str, set[asyncio.Future[None]]] = defaultdict(set)
        self._conn: asyncpg.Connection | None = None
        self._dsn = ""
        self._stopping = False
        self._reconnecting: asyncio.Task[None] | None = None
        self._outage = Outage("execution waiters (LISTEN)", log)

    async def start(self, dsn: str) -> None:
        self._dsn = dsn
        await self._connect()

    async def _connect(self) -> None:
        conn = await asyncpg.connect(self._dsn)
        await conn.add_listener(NOTIFY_CHANNEL, self._on_notify)
        conn.add_termination_listener(self._on_lost)
        self._conn = conn

    def _on_lost(self, _conn: object) -> None:
        """PostgreSQL went away: listen again once it is back. Notifications sent meanwhile
        are lost, so every waiter is woken then to read its row again."""
        if self._stopping or self._reconnecting is not None:
            return
        self._reconnecting = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        try:
            while not self._stopping:
                try:
                    await self._connect()
                except UNAVAILABLE as exc:
                    await asyncio.sleep(self._outage.lost(exc))
                    continue
                self._outage.ok()
                self._wake_all()
                return
        finally:
            self._reconnecting = None

    def _wake_all(self) -> None:
        for execution_id in list(self._waiting):
            self._on_notify(None, 0, NOTIFY_CHANNEL, execution_id)

    async def stop(self) -> None:
        self._stopping = True
        if self._reconnecting is not None:
            self._reconnecting.cancel()
        if self._conn is not None:
            with contextlib.suppress(*UNAVAILABLE):
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


async def wait_until(
    waiters: FinishedWaiters,
    key: str,
    timeout_s: float,
    read: Callable[[], Awaitable[T]],
    ended: Callable[[T], bool],
) -> T:
    """Long-poll: `read()` again each time `key` is notified, until `ended` says so or
    `timeout_s` passed; returns the last read. A wake-up that finds it still running (a
    retry, or the LISTEN link came back) waits on for the rest of the time."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    future = waiters.register(key)  # before reading: no end is missed
    try:
        current = await read()
        while not ended(current) and (left := deadline - loop.time()) > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(future), left)
            waiters.discard(key, future)
            future = waiters.register(key)
            current = await read()
        return current
    finally:
        waiters.discard(key, future)


@asynccontextmanager
async def listen(dsn: str) -> AsyncIterator[FinishedWaiters]:
    waiters = FinishedWaiters()
    await waiters.start(dsn)
    try:
        yield waiters
    finally:
        await waiters.stop()
