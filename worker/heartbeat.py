"""A worker's heartbeat: its `workers` row, and the leases of the executions it runs.

Every `heartbeat_s` the row's `heartbeat_at` moves to now (the reconciler forgets a worker
whose row goes stale, and fails its replicas) and every lease this worker holds is renewed.
An execution whose lease was not renewed because the reconciler took it back, or whose
termination was asked, is stopped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Protocol

import asyncpg

from core import replica_store
from core.outages import UNAVAILABLE, Outage
from core.settings import Settings

log = logging.getLogger(__name__)


class ExecutionRunner(Protocol):
    """What runs an execution on this worker (a replica): it can be told to stop it."""

    async def stop_execution(self, execution_id: str) -> None: ...


class Heartbeat:
    def __init__(
        self,
        pool: asyncpg.Pool,
        settings: Settings,
        *,
        worker_id: str,
        hostname: str,
        runtime_name: str,
        running: Mapping[str, ExecutionRunner],
    ) -> None:
        """`running` is the worker's own map of the executions it runs (execution id to
        replica), read at each beat."""
        self.pool = pool
        self.settings = settings
        self.worker_id = worker_id
        self.hostname = hostname
        self.runtime_name = runtime_name
        self.running = running
        # When a heartbeat (the renewal of every lease this worker holds) last succeeded.
        self.ok_at = time.monotonic()

    def can_renew_leases(self) -> bool:
        """Whether a heartbeat succeeded within the lease. A worker whose heartbeats hang
        (its network cut, calls stuck on connections the cut left half-open) would lose
        every lease it took and burn the execution's attempts: it claims nothing meanwhile."""
        return time.monotonic() - self.ok_at < self.settings.lease_s

    async def register(self) -> None:
        """The worker's row, as it starts."""
        await self._upsert_row()
        self.ok_at = time.monotonic()

    async def unregister(self) -> None:
        await replica_store.remove_worker(self.pool, self.worker_id)

    async def run(self) -> None:
        """Beat every `heartbeat_s` until cancelled, through outages."""
        outage = Outage("heartbeat", log)
        while True:
            delay = self.settings.heartbeat_s
            try:
                await self.beat()
                outage.ok()
            except asyncio.CancelledError:
                raise
            except UNAVAILABLE as exc:
                delay = max(self.settings.heartbeat_s, outage.lost(exc))
            except Exception:
                log.exception("heartbeat failed; trying again")
            await asyncio.sleep(delay)

    async def beat(self) -> None:
        # Upsert: after an outage longer than the lease (PostgreSQL down, this host cut off)
        # the reconciler has forgotten this worker; it registers again instead of running on
        # unseen.
        await self._upsert_row()
        held = list(self.running)
        if not held:
            self.ok_at = time.monotonic()
            return
        rows = await self.pool.fetch(
            """UPDATE executions SET lease_until = clock_timestamp() + make_interval(secs => $3)
               WHERE id = ANY($2::text[]) AND worker_id = $1 AND status = 'in-progress'
                 AND lease_until IS NOT NULL
               RETURNING id, terminate_requested""",
            self.worker_id,
            held,
            self.settings.lease_s,
        )
        self.ok_at = time.monotonic()
        renewed = {r["id"]: r["terminate_requested"] for r in rows}
        missing = [i for i in held if i not in renewed and i in self.running]
        if missing:
            # Not renewed: finished a moment ago (fine), or taken back by the reconciler.
            taken = await self.pool.fetch(
                """SELECT id FROM executions WHERE id = ANY($1::text[]) AND status = 'in-progress'
                     AND (worker_id IS DISTINCT FROM $2 OR lease_until IS NULL)""",
                missing,
                self.worker_id,
            )
            for row in taken:
                if (runner := self.running.get(row["id"])) is not None:
                    log.warning("lost the lease of %s; stopping it", row["id"])
                    await runner.stop_execution(row["id"])
        for execution_id, terminate in renewed.items():
            if terminate and (runner := self.running.get(execution_id)) is not None:
                await runner.stop_execution(execution_id)

    async def _upsert_row(self) -> None:
        await replica_store.register_worker(
            self.pool,
            self.worker_id,
            host=self.hostname,
            runtime=self.runtime_name,
            capacity=self.settings.worker_capacity,
        )
