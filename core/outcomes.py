"""One home for an execution's outcome, wherever it is decided.

A worker records what its replica reported (`worker/replica.py`) or fails the executions
waiting for a replica that cannot start (`worker/host.py`), the reconciler hands back or
fails executions whose lease expired (`scheduler/reconciler.py`), and the API terminates
(`core/executions.py`). Each goes through the functions here, which in one transaction:

- move the execution with `core.states`' conditional UPDATE (attempt row and NOTIFY included),
- write its event to the outbox (`core.outbox`), and
- when the execution is a node of a pipeline and it ended, advance the pipeline: the
  downstream executions are created in this same transaction, so a crash can neither lose a
  hop nor make one twice (`core.pipeline_engine`).

What is left for after the commit (publishing the events, queueing what was created) is in
the returned `Recorded`; `deliver` does it, and if that process dies first the outbox relay
and the reconciler do it instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import asyncpg
from arq.connections import ArqRedis

from core import outbox, queue, states
from core.events import TERMINATE_CHANNEL
from core.outages import UNAVAILABLE
from core.states import TERMINAL, ExecutionStatus, Reason

ENQUEUE_CHUNK = 1000


@dataclass
class Recorded:
    """A transition and what it leaves to do after its commit."""

    row: asyncpg.Record | None  # the execution afterwards; None: someone else moved it first
    events: list[outbox.OutboxEvent] = field(default_factory=list)
    # Executions the transition created (pipeline hops): (service id, execution id).
    created: list[tuple[str, str]] = field(default_factory=list)
    # Executions the transition asked a worker to stop (a pipeline's terminate).
    stop: list[str] = field(default_factory=list)
    # Executions a batch transition ended (`fail_waiting`), `row` being None there.
    ended: list[asyncpg.Record] = field(default_factory=list)

    def merge(self, other: Recorded) -> None:
        self.events.extend(other.events)
        self.created.extend(other.created)
        self.stop.extend(other.stop)

    async def deliver(
        self,
        conn: asyncpg.Connection | asyncpg.Pool,
        redis: ArqRedis | None,
        publisher: outbox.Publisher | None = None,
    ) -> None:
        """After the commit: publish the events (handed to `publisher` if given, which
        publishes them without making this wait), queue the created executions, and tell the
        workers holding executions to stop. Each step is safe to lose to a crash."""
        if redis is None:
            return
        if publisher is not None:
            publisher.submit(self.events)
        else:
            await outbox.publish(conn, redis, self.events)
        by_service: dict[str, list[str]] = {}
        for service_id, execution_id in self.created:
            by_service.setdefault(service_id, []).append(execution_id)
        try:
            for service_id, ids in by_service.items():
                for start in range(0, len(ids), ENQUEUE_CHUNK):  # a fan-out, in batches
                    await queue.enqueue_executions(
                        redis, service_id, ids[start : start + ENQUEUE_CHUNK]
                    )
            for execution_id in self.stop:
                # The worker holding it hears this at once; its heartbeat would find it anyway.
                await redis.publish(TERMINATE_CHANNEL, execution_id)
        except UNAVAILABLE:
            pass  # the reconciler queues them, and the heartbeat finds the terminations


async def _lock_pipeline(conn: asyncpg.Connection, execution: Any) -> Any:
    """Lock a node's pipeline execution before the node's own row: every writer of a run
    (outcomes, terminate, resume) takes the two locks in this order, so none deadlocks."""
    if not execution["pipeline_execution_id"]:
        return None
    # Imported here: the engine creates executions, whose module terminates through us.
    from core.pipeline_engine import lock_run

    return await lock_run(conn, execution["pipeline_execution_id"])


async def _recorded(
    conn: asyncpg.Connection, row: asyncpg.Record | None, run: Any = None
) -> Recorded:
    recorded = Recorded(row, states.row_events(row))
    if row is not None and row["pipeline_execution_id"] and row["status"] in TERMINAL:
        if run is None:  # a bulk transition (fail_waiting) locks each run after the fact
            run = await _lock_pipeline(conn, row)
        from core.pipeline_engine import execution_ended

        recorded.merge(await execution_ended(conn, row, run))
    return recorded


async def finish(
    conn: asyncpg.Connection,
    execution: Any,
    attempt: int,
    status: ExecutionStatus,
    *,
    reason: Reason | None = None,
    output: Any = None,
    error: dict[str, Any] | None = None,
    message: str | None = None,
) -> Recorded:
    """in-progress (this attempt) → terminal. `execution` is its row as claimed."""
    if not execution["pipeline_execution_id"]:  # one statement: the hot path stays one trip
        row = await states.finish(
            conn, execution["id"], attempt, status, reason=reason, output=output, error=error,
            message=message,
        )  # fmt: skip
        return Recorded(row, states.row_events(row))
    async with conn.transaction():
        run = await _lock_pipeline(conn, execution)
        row = await states.finish(
            conn, execution["id"], attempt, status, reason=reason, output=output, error=error,
            message=message,
        )  # fmt: skip
        return await _recorded(conn, row, run)


async def hand_back(
    conn: asyncpg.Connection,
    execution: Any,
    attempt: int,
    *,
    reason: Reason,
    error: dict[str, Any] | None,
    retry: bool,
) -> Recorded:
    """An attempt that died with its replica or worker: retried, or failed for good."""
    async with conn.transaction():
        run = await _lock_pipeline(conn, execution)
        row = await states.hand_back(
            conn, execution["id"], attempt, reason=reason, error=error, retry=retry
        )
        return await _recorded(conn, row, run)


async def fail_waiting(
    conn: asyncpg.Connection, service_id: str, *, error: dict[str, Any], limit: int = 500
) -> Recorded:
    """Up to `limit` waiting executions of a service whose replica cannot start → failed
    `replica-failed`; call again until `ended` comes back empty."""
    async with conn.transaction():
        rows = await states.fail_waiting(conn, service_id, error=error, limit=limit)
        recorded = Recorded(None, ended=list(rows))
        for row in rows:
            recorded.merge(await _recorded(conn, row))
    return recorded


async def terminate(conn: asyncpg.Connection, execution: Any) -> Recorded:
    """created → terminated at once; in-progress → asked to stop (terminated at once when no
    worker holds it). `row` is None when the execution had ended already."""
    async with conn.transaction():
        run = await _lock_pipeline(conn, execution)
        row = await states.terminate_created(conn, execution["id"])
        if row is None:
            row = await states.request_termination(conn, execution["id"])
        recorded = await _recorded(conn, row, run)
    if row is not None and row["status"] == ExecutionStatus.in_progress:
        recorded.stop.append(row["id"])
    return recorded
