"""The reconciler: PostgreSQL is the truth, and this makes Redis and the workers agree.

Each round it
- takes back in-progress executions whose lease expired (their worker died): retried with
  attempt + 1 while `on_reset` is `rerun` and attempts remain, else failed;
- marks the replicas of workers that stopped heartbeating as failed, so others replace them;
- queues again every live execution that is waiting for a worker but missing from Redis
  (Redis restarted or was flushed, or an enqueue failed after commit).

Any number of schedulers may run it at once: every step is conditional or idempotent.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import asyncpg
from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix, job_key_prefix

from core import events, queue, states
from core.states import Reason
from scheduler.metrics import SchedulerMetrics

log = logging.getLogger(__name__)

WORKER_DEAD_AFTER_S = 20.0
LEASE_GONE_GRACE_S = 2.0
REQUEUE_GRACE_S = 2.0  # a just-committed execution is being queued by the API right now
SCAN_BATCH = 2000


@dataclass
class RoundReport:
    leases_expired: int = 0
    retried: int = 0
    failed: int = 0
    workers_lost: int = 0
    requeued: int = 0


class Reconciler:
    def __init__(
        self, pool: asyncpg.Pool, redis: ArqRedis, metrics: SchedulerMetrics | None = None
    ) -> None:
        self.pool = pool
        self.redis = redis
        self.metrics = metrics or SchedulerMetrics()

    async def run_once(self) -> RoundReport:
        started = time.perf_counter()
        report = RoundReport()
        await self._expire_leases(report)
        await self._forget_dead_workers(report)
        await self._requeue_missing(report)
        if report.leases_expired or report.workers_lost or report.requeued:
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
                updated = await states.hand_back(
                    conn,
                    row["id"],
                    row["attempt"],
                    reason=Reason.lost,
                    retry=row["on_reset"] == "rerun",
                    error={
                        "type": "WorkerLost",
                        "traceback": None,
                        "message": f"worker {row['worker_id']} stopped renewing its lease",
                    },
                )
            if updated is None:
                continue
            if updated["status"] == "in-progress":
                report.retried += 1
                # The dead worker's arq job may still look "in progress": drop it, queue anew.
                await queue.forget_job(self.redis, row["service_id"], row["id"])
                await queue.enqueue_execution(self.redis, row["service_id"], row["id"])
                await events.publish(
                    self.redis,
                    "execution.retrying",
                    updated["project_id"],
                    "execution",
                    row["id"],
                    events.execution_event_data(updated),
                )
            else:
                report.failed += 1
                await events.publish(
                    self.redis,
                    "execution.failed",
                    updated["project_id"],
                    "execution",
                    row["id"],
                    events.execution_event_data(updated),
                )

    async def _forget_workers(self, report: RoundReport, worker_ids: set[str]) -> None:
        """Forget workers whose leases expired, unless they heartbeated in the last seconds
        (alive, and the lease lapsed for another reason: they stop that execution)."""
        if not worker_ids:
            return
        dead = await self.pool.fetch(
            """DELETE FROM workers WHERE id = ANY($1::text[])
                 AND heartbeat_at < now() - make_interval(secs => $2)
               RETURNING id, host""",
            list(worker_ids),
            LEASE_GONE_GRACE_S,
        )
        await self._fail_replicas_of(report, [w["id"] for w in dead])

    async def _forget_dead_workers(self, report: RoundReport) -> None:
        dead = await self.pool.fetch(
            """DELETE FROM workers WHERE heartbeat_at < now() - make_interval(secs => $1)
               RETURNING id, host""",
            WORKER_DEAD_AFTER_S,
        )
        await self._fail_replicas_of(report, [w["id"] for w in dead])

    async def _fail_replicas_of(self, report: RoundReport, ids: list[str]) -> None:
        if not ids:
            return
        report.workers_lost += len(ids)
        log.warning("workers stopped heartbeating: %s", ", ".join(ids))
        await self.pool.execute(
            """UPDATE replicas SET status = 'failed', message = 'its worker stopped heartbeating',
                   stopped_at = now(), updated_at = now()
               WHERE worker_id = ANY($1::text[]) AND status IN ('starting', 'ready', 'draining')""",
            ids,
        )

    async def _requeue_missing(self, report: RoundReport) -> None:
        # Replicas whose worker row vanished without a heartbeat gap (a clean delete) are
        # failed too, so they no longer count as live.
        await self.pool.execute(
            """UPDATE replicas SET status = 'failed', message = 'its worker is gone',
                   stopped_at = now(), updated_at = now()
               WHERE status IN ('starting', 'ready', 'draining')
                 AND updated_at < now() - make_interval(secs => $1)
                 AND NOT EXISTS (SELECT 1 FROM workers w WHERE w.id = replicas.worker_id)""",
            WORKER_DEAD_AFTER_S,
        )
        rows = await self.pool.fetch(
            """SELECT id, service_id FROM executions
               WHERE ((status = 'created' AND created_at < clock_timestamp() - make_interval(secs => $1))
                   OR (status = 'in-progress' AND lease_until IS NULL
                       AND updated_at < clock_timestamp() - make_interval(secs => $1)))
               ORDER BY created_at LIMIT $2""",
            REQUEUE_GRACE_S,
            SCAN_BATCH,
        )
        if not rows:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for row in rows:
                pipe.exists(job_key_prefix + row["id"])
                pipe.exists(in_progress_key_prefix + row["id"])
            found = await pipe.execute()
        missing: dict[str, list[str]] = {}
        for index, row in enumerate(rows):
            if not found[2 * index] and not found[2 * index + 1]:
                missing.setdefault(row["service_id"], []).append(row["id"])
        for service_id, ids in missing.items():
            report.requeued += await queue.enqueue_executions(self.redis, service_id, ids)
