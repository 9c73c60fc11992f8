"""Placement: which replicas this worker starts and drains, worked out every round.

Every worker runs the same loop, so any number of them share the replicas through
PostgreSQL alone. Each round works out every service's desired replica count from its
queue (`worker/autoscale.py`); a worker with free capacity claims a missing replica under
a per-service advisory lock (`core/replica_store.py`), and drains its own surplus,
old-generation (rolled-over) and paused-service replicas. A replica that fails to start
backs its service off on this worker; after `replica_start_attempts` failed starts in a
row, on any worker, what waits for the service fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

import asyncpg
from arq.connections import ArqRedis

from core import outbox, outcomes, queue, replica_store
from core.outages import UNAVAILABLE, Outage
from core.secrets import SecretBox
from core.settings import Settings
from worker.autoscale import desired_replicas
from worker.replica import Replica
from worker.service_config import ServiceConfig, load_service_config

log = logging.getLogger(__name__)

# A round also runs at once when a queue goes from empty to non-empty (a wake-up on
# WAKE_CHANNEL), so this bounds only how soon a new, resumed or changed service is seen.
PLACEMENT_INTERVAL_S = 1.0
START_BACKOFF_S = (1, 2, 5, 10, 30, 60)


class Placement:
    def __init__(
        self,
        settings: Settings,
        pool: asyncpg.Pool,
        redis: ArqRedis,
        *,
        worker_id: str,
        hostname: str,
        secret_box: SecretBox,
        replicas: dict[str, Replica],
        new_replica: Callable[[str, ServiceConfig], Replica],
        spawn: Callable[[Coroutine[Any, Any, Any], str], None],
        finished: Callable[[Any], None],
    ) -> None:
        """`replicas` is the worker's own table of its replicas (replica id to replica),
        which placement fills and prunes; `new_replica` makes one, `spawn` runs a replica
        action in the background, `finished` counts an execution that ended."""
        self.settings = settings
        self.pool = pool
        self.redis = redis
        self.worker_id = worker_id
        self.hostname = hostname
        self.secret_box = secret_box
        self.replicas = replicas
        self.new_replica = new_replica
        self.spawn = spawn
        self.finished = finished
        self.wake = asyncio.Event()  # set for a round now rather than at the next tick
        self.shutting_down = False  # no replica is started any more
        self._activity: dict[str, float] = {}
        self._failures: dict[str, tuple[int, float]] = {}  # service -> (count, retry after)
        self._by_service: dict[str, list[Replica]] = {}

    def note_activity(self, service_id: str) -> None:
        self._activity[service_id] = time.time()

    async def run(self) -> None:
        """Place every `PLACEMENT_INTERVAL_S`, or at once when woken, until cancelled."""
        outage = Outage("placement", log)
        while True:
            try:
                await self.place()
                outage.ok()
            except asyncio.CancelledError:
                raise
            except UNAVAILABLE as exc:
                await asyncio.sleep(outage.lost(exc))
            except Exception:
                log.exception("placement failed; trying again")
            await asyncio.sleep(0.05)  # wake-ups in a burst coalesce into one round
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), PLACEMENT_INTERVAL_S)
            self.wake.clear()

    async def place(self) -> None:
        """One round: compute desired replicas per service, claim or drain accordingly."""
        # Replicas that ended on their own (failed, drained) leave the local table.
        for replica_id, replica in list(self.replicas.items()):
            if replica.status in ("stopped", "failed"):
                del self.replicas[replica_id]
                if replica.status == "failed":
                    count, _ = self._failures.get(replica.service.id, (0, 0))
                    delay = START_BACKOFF_S[min(count, len(START_BACKOFF_S) - 1)]
                    self._failures[replica.service.id] = (count + 1, time.monotonic() + delay)
        services = await replica_store.placement_view(self.pool)
        async with self.redis.pipeline(transaction=False) as pipe:
            for service in services:
                pipe.zcard(queue.queue_name(service["id"]))
            queued = await pipe.execute()
        busy = [s["id"] for s, q in zip(services, queued, strict=True) if q or s["in_progress"]]
        busy += [sid for sid, at in self._activity.items() if time.time() - at < 5]
        self._activity.clear()
        if busy:
            await self.pool.execute(
                "UPDATE services SET last_activity_at = now() WHERE id = ANY($1::text[])", busy
            )
        self._by_service = {}  # this round's replicas by service: a look-up, not a scan each
        for replica in self.replicas.values():
            self._by_service.setdefault(replica.service.id, []).append(replica)
        known = {s["id"] for s in services}
        for replica in list(self.replicas.values()):
            if replica.service.id not in known and replica.status in ("starting", "ready"):
                self.spawn(replica.stop("stopped", "service deleted"), f"stop {replica.id}")
        for service, queue_length in zip(services, queued, strict=True):
            desired = desired_replicas(
                service["runtime"],
                active=service["status"] == "active",
                # arq keeps a job in its queue until it finishes: the running ones are in
                # the queue's count as well as in `in_progress`; count them once.
                queued=max(queue_length - service["in_progress"], 0),
                in_progress=service["in_progress"],
                live=service["live"],
                idle_for_s=0 if service["id"] in busy else float(service["idle_for_s"]),
            )
            if desired != service["desired_replicas"]:
                await self.pool.execute(
                    "UPDATE services SET desired_replicas = $2 WHERE id = $1",
                    service["id"],
                    desired,
                )
            await self._converge(service, desired)

    def _mine(self, service_id: str) -> list[Replica]:
        return self._by_service.get(service_id, [])

    def _free_capacity(self) -> int:
        live = sum(
            1 for r in self.replicas.values() if r.status in ("starting", "ready", "draining")
        )
        return self.settings.worker_capacity - live

    async def _converge(self, service: asyncpg.Record, desired: int) -> None:
        service_id = service["id"]
        mine = self._mine(service_id)
        # Rolled over: replicas of an older generation drain once a new one is ready.
        outdated = [
            r for r in mine if r.service.generation < service["generation"] and r.status == "ready"
        ]
        if outdated:
            new_ready = await replica_store.count_ready(
                self.pool, service_id, generation=service["generation"]
            )
            # A full worker drains anyway: the new generation needs the room.
            if new_ready or desired == 0 or self._free_capacity() <= 0:
                for replica in outdated:
                    self.spawn(
                        replica.drain("rolled over to a new generation"), f"drain {replica.id}"
                    )
        if service["live"] < desired and not self.shutting_down:
            _, retry_after = self._failures.get(service_id, (0, 0.0))
            if time.monotonic() >= retry_after and self._free_capacity() > 0:
                replica_id = await replica_store.claim_slot(
                    self.pool,
                    service_id,
                    generation=service["generation"],
                    desired=desired,
                    worker_id=self.worker_id,
                    host=self.hostname,
                )
                if replica_id is not None:
                    await self._start_replica(replica_id, service_id)
        elif service["live"] > desired:
            # One of this worker's ready replicas drains, if the service has too many.
            replica_id = await replica_store.release_slot(
                self.pool,
                service_id,
                generation=service["generation"],
                desired=desired,
                worker_id=self.worker_id,
            )
            if replica_id is not None and replica_id in self.replicas:
                reason = "service paused" if service["status"] != "active" else "scaled down"
                self.spawn(self.replicas[replica_id].drain(reason), f"drain {replica_id}")

    async def _start_replica(self, replica_id: str, service_id: str) -> None:
        try:
            config = await load_service_config(self.pool, self.secret_box, service_id)
        except Exception as exc:
            log.exception("cannot prepare service %s", service_id)
            message = f"cannot prepare the service: {exc}"
            await replica_store.fail_before_start(self.pool, replica_id, message=message)
            await self._after_failed_start(service_id, message)
            return
        replica = self.new_replica(replica_id, config)
        self.replicas[replica_id] = replica
        event = await outbox.add(
            self.pool,
            "replica.starting",
            config.project_id,
            "replica",
            replica_id,
            {"service": service_id, "host": self.hostname},
        )
        await outbox.publish(self.pool, self.redis, [event])

        async def start() -> None:
            try:
                await replica.start()
                self._failures.pop(service_id, None)
            except Exception:
                # Recorded on the replica row by Replica.start; placement backs off.
                if not self.shutting_down:  # a start cut short by a shutdown is no failure
                    await self._after_failed_start(service_id, replica.message or "start failed")

        self.spawn(start(), f"start {replica_id}")

    async def _after_failed_start(self, service_id: str, cause: str) -> None:
        """After `replica_start_attempts` failed starts in a row, fail what waits for one.

        Counted in PostgreSQL over the service's current generation, across workers: failed
        replicas that never got ready, since the last one that did. Once over the bound,
        every further failed start fails what arrived meanwhile, until a start succeeds or a
        PATCH (a new generation) resets the count.
        """
        tries = await replica_store.failed_starts(self.pool, service_id)
        if tries < self.settings.replica_start_attempts:
            return
        message = f"the service's replica failed to start {tries} times; last: {cause}"
        error = {"type": "ReplicaFailed", "message": message, "traceback": None}
        ended = 0
        try:
            while True:
                async with self.pool.acquire() as conn:
                    recorded = await outcomes.fail_waiting(conn, service_id, error=error)
                    for row in recorded.ended:
                        self.finished(row)
                    await recorded.deliver(conn, self.redis)
                if not recorded.ended:
                    break
                ended += len(recorded.ended)
                await queue.forget_jobs(self.redis, service_id, [r["id"] for r in recorded.ended])
        except Exception:  # the next failed start tries again
            log.exception("failing the waiting executions of service %s failed", service_id)
        if ended:
            log.warning(
                "service %s: failed %d waiting executions (replica-failed): %s",
                service_id,
                ended,
                message,
            )
