"""The reconciler: PostgreSQL is the truth, and this makes Redis and the workers agree.

Each round it
- takes back in-progress executions whose lease expired (their worker died): retried with
  attempt + 1 while `on_reset` is `rerun` and attempts remain, else failed;
- marks the replicas of workers that stopped heartbeating as failed, so others replace them;
- queues again every live execution that is waiting for a worker but missing from Redis
  (Redis restarted or was flushed, or an enqueue failed after commit);
- publishes the events left in the outbox by a process that died before publishing them;
- folds the changes of the execution counts (core/execution_counts.py).

Any number of schedulers may run it at once: every step is conditional or idempotent.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import asyncpg
from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix, job_key_prefix

from core import execution_counts, outbox, outcomes, queue, replica_store, states
from core.outages import REDIS_UNAVAILABLE
from core.states import Reason
from scheduler.metrics import SchedulerMetrics

log = logging.getLogger(__name__)

WORKER_DEAD_AFTER_S = 20.0
LEASE_GONE_GRACE_S = 2.0
REQUEUE_GRACE_S = 2.0  # a just-committed execution is being queued by the API right now
SCAN_BATCH = 2000
SWEEP_INTERVAL_S = 30.0  # a scan of Redis' keys: rare, it only tidies after an outage


@dataclass
class RoundReport:
    leases_expired: int = 0
    retried: int = 0
    failed: int = 0
    workers_lost: int = 0
    requeued: int = 0
    events_relayed: int = 0
    counts_folded: int = 0


class Reconciler:
    def __init__(
        self, pool: asyncpg.Pool, redis: ArqRedis, metrics: SchedulerMetrics | None = None
    ) -> None:
        self.pool = pool
        self.redis = redis
        self.metrics = metrics or SchedulerMetrics()
        self._sweep_due = 0.0

    async def run_once(self) -> RoundReport:
        started = time.perf_counter()
        report = RoundReport()
        await self._expire_leases(report)
        await self._forget_dead_workers(report)
        await self._requeue_missing(report)
        if time.monotonic() >= self._sweep_due:
            await self._drop_finished_jobs()
            self._sweep_due = time.monotonic() + SWEEP_INTERVAL_S
        # Events whose committer died before publishing them (or found Redis down). While
        # Redis is down this raises, and the rows wait for a round after it is back.
        report.events_relayed = await outbox.relay_once(self.pool, self.redis)
        report.counts_folded = await execution_counts.compact(self.pool)
        if report.leases_expired or report.workers_lost or report.requeued or report.events_relayed:
            log.info("reconciled: %s", report)
        self.metrics.round_done(report, time.perf_counter() - started)
        return report

    async def _expire_leases(self, report: RoundReport) -> None:
        expired = await states.expired_leases(self.pool)
        # A worker renews leases in the same loop as its heartbeat, so an expired lease means
        # its worker is gone: fail its replicas now, not after WORKER_DEAD_AFTER_S, so that
        # the retries below find a replacement replica without waiting.
        await self._forget_workers(
            report, {row["worker_id"] for row in expired if row["worker_id"]}
        )
        for row in expired:
            report.leases_expired += 1
            async with self.pool.acquire() as conn:
                recorded = await outcomes.hand_back(
                    conn,
                    row,
                    row["attempt"],
                    reason=Reason.lost,
                    retry=row["on_reset"] == "rerun",
                    error={
                        "type": "WorkerLost",
                        "traceback": None,
                        "message": f"worker {row['worker_id']} stopped renewing its lease",
                    },
                )
                if recorded.row is None:
                    continue
                if recorded.row["status"] == "in-progress":
                    report.retried += 1
                    # The dead worker's arq job may still look "in progress": drop it, queue
                    # anew in its first place in line, ahead of work accepted after it.
                    try:
                        await queue.forget_job(self.redis, row["service_id"], row["id"])
                        await queue.enqueue_execution(
                            self.redis, row["service_id"], row["id"], queued_at=row["created_at"]
                        )
                    except REDIS_UNAVAILABLE:
                        pass  # committed and handed back: `_requeue_missing` queues it later
                else:
                    report.failed += 1
                await recorded.deliver(conn, self.redis)

    async def _forget_workers(self, report: RoundReport, worker_ids: set[str]) -> None:
        """Forget workers whose leases expired, unless they heartbeated in the last seconds
        (alive, and the lease lapsed for another reason: they stop that execution)."""
        if not worker_ids:
            return
        dead = await replica_store.forget_workers(
            self.pool, list(worker_ids), silent_for_s=LEASE_GONE_GRACE_S
        )
        await self._fail_replicas_of(report, [w["id"] for w in dead])

    async def _forget_dead_workers(self, report: RoundReport) -> None:
        dead = await replica_store.forget_silent_workers(
            self.pool, silent_for_s=WORKER_DEAD_AFTER_S
        )
        await self._fail_replicas_of(report, [w["id"] for w in dead])

    async def _fail_replicas_of(self, report: RoundReport, ids: list[str]) -> None:
        if not ids:
            return
        report.workers_lost += len(ids)
        log.warning("workers stopped heartbeating: %s", ", ".join(ids))
        await replica_store.fail_replicas_of_workers(self.pool, ids)

    async def _requeue_missing(self, report: RoundReport) -> None:
        # Replicas whose worker row vanished without a heartbeat gap (a clean delete) are
        # failed too, so they no longer count as live.
        await replica_store.fail_replicas_without_worker(
            self.pool, unchanged_for_s=WORKER_DEAD_AFTER_S
        )
        rows = await self.pool.fetch(
            """SELECT id, service_id, created_at FROM executions
               WHERE ((status = 'created' AND created_at < clock_timestamp() - make_interval(secs => $1))
                   OR (status = 'in-progress' AND lease_until IS NULL
                       AND updated_at < clock_timestamp() - make_interval(secs => $1)))
               ORDER BY created_at LIMIT $2""",
            REQUEUE_GRACE_S,
            SCAN_BATCH,
        )
        if not rows:
            return
        found = await queue.job_states(self.redis, [row["id"] for row in rows])
        missing: dict[str, list[asyncpg.Record]] = {}
        for row, state in zip(rows, found, strict=True):
            if state == queue.JOB_RUNNING:
                # Marked running in Redis, yet no worker holds its lease: the job's end was
                # never written (Redis went away under it), and arq would skip it for days.
                # A worker that did just pick it finds its claim taken: nothing runs twice.
                await queue.forget_job(self.redis, row["service_id"], row["id"])
            elif state == queue.JOB_QUEUED:
                continue
            missing.setdefault(row["service_id"], []).append(row)
        for service_id, missed in missing.items():
            report.requeued += await queue.enqueue_executions(
                self.redis,
                service_id,
                [r["id"] for r in missed],
                queued_at=[r["created_at"] for r in missed],
            )

    async def _drop_finished_jobs(self) -> None:
        """Forget arq jobs still marked running whose execution ended or is gone.

        A job's end is written to Redis after its outcome is committed; if Redis went away
        in between (or the worker died with an execution that then failed for good), the
        job would sit in its queue for days, counted as waiting work by the autoscaler.
        """
        ids: list[str] = []
        async for key in self.redis.scan_iter(match=in_progress_key_prefix + "*", count=1000):
            ids.append(key.decode().removeprefix(in_progress_key_prefix))
        if not ids:
            return
        rows = await self.pool.fetch(
            "SELECT id, service_id, status FROM executions WHERE id = ANY($1::text[])", ids
        )
        known = {r["id"]: r for r in rows}
        for execution_id in ids:
            row = known.get(execution_id)
            if row is None:
                # Deleted by retention: arq drops a queue entry whose job key is gone.
                await self.redis.delete(
                    job_key_prefix + execution_id, in_progress_key_prefix + execution_id
                )
            elif row["status"] in states.TERMINAL:
                await queue.forget_job(self.redis, row["service_id"], execution_id)
