"""Claims and finishes of a worker's executions, grouped under load.

An idle worker claims (and finishes) each execution with its own statement of
`core.states`, at once. While one is in flight, the ones asked for meanwhile wait for it and
then go together in one statement (`claim_many`, `finish_many`): a group commit, so a busy
worker pays one round trip and one transaction for many instead of one each.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import asyncpg

from core import states

log = logging.getLogger(__name__)

Item = TypeVar("Item", bound=tuple[Any, ...])  # its first element is the execution id


class _Grouped(Generic[Item]):
    def __init__(
        self,
        pool: asyncpg.Pool,
        one: Callable[[asyncpg.Connection, Item], Awaitable[asyncpg.Record | None]],
        many: Callable[[asyncpg.Connection, list[Item]], Awaitable[dict[str, asyncpg.Record]]],
        name: str,
    ) -> None:
        self.pool = pool
        self._one = one
        self._many = many
        self._name = name
        self._pending: list[tuple[Item, asyncio.Future[Any]]] = []
        self._task: asyncio.Task[None] | None = None
        self.statements = 0  # statements sent, and the items they carried
        self.items = 0

    async def submit(self, item: Item) -> asyncpg.Record | None:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=self._name)
        return await future

    async def _run(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            # One id twice in a batch (delivered twice): the second is not ours.
            seen: set[str] = set()
            items: list[Item] = []
            for item, future in batch:
                if item[0] in seen:
                    if not future.done():
                        future.set_result(None)
                    continue
                seen.add(item[0])
                items.append(item)
            try:
                async with self.pool.acquire() as conn:
                    if len(items) == 1:
                        rows = await self._each(conn, items)
                    else:
                        try:
                            rows = await self._many(conn, items)
                        except asyncpg.DeadlockDetectedError:
                            # A statement over many rows locks them one after another, and
                            # another one over some of the same rows (a lease renewal, the
                            # reconciler) may lock them in another order: PostgreSQL then
                            # aborts one of the two. One row per statement cannot deadlock.
                            log.info("%s: a grouped statement deadlocked; one by one", self._name)
                            rows = await self._each(conn, items)
            except BaseException as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            self.statements += 1
            self.items += len(items)
            for item, future in batch:
                if not future.done():
                    future.set_result(rows.get(item[0]))

    async def _each(self, conn: asyncpg.Connection, items: list[Item]) -> dict[str, Any]:
        rows = {}
        for item in items:
            if (row := await self._one(conn, item)) is not None:
                rows[item[0]] = row
        return rows


class ClaimBatcher(_Grouped[tuple[str, str]]):
    """Claims: (execution id, replica id) → the claimed row, or None when not ours."""

    def __init__(self, pool: asyncpg.Pool, worker_id: str, lease_s: float) -> None:
        async def one(conn: asyncpg.Connection, item: tuple[str, str]) -> asyncpg.Record | None:
            return await states.claim(
                conn, item[0], worker_id=worker_id, replica_id=item[1], lease_s=lease_s
            )

        async def many(
            conn: asyncpg.Connection, items: list[tuple[str, str]]
        ) -> dict[str, asyncpg.Record]:
            return await states.claim_many(conn, items, worker_id=worker_id, lease_s=lease_s)

        super().__init__(pool, one, many, "claims")

    async def claim(self, execution_id: str, replica_id: str) -> asyncpg.Record | None:
        return await self.submit((execution_id, replica_id))


class SuccessBatcher(_Grouped[tuple[str, int, Any]]):
    """Successes of executions outside pipelines: (execution id, attempt, output) → the
    finished row, or None when the attempt had lost the execution meanwhile."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        async def one(
            conn: asyncpg.Connection, item: tuple[str, int, Any]
        ) -> asyncpg.Record | None:
            return await states.finish(
                conn, item[0], item[1], states.ExecutionStatus.success, output=item[2]
            )

        super().__init__(pool, one, states.succeed_many, "successes")

    async def succeed(self, execution_id: str, attempt: int, output: Any) -> asyncpg.Record | None:
        return await self.submit((execution_id, attempt, output))
