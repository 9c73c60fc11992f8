"""The execution state machine: statuses, reasons, and every transition as one conditional
UPDATE, so status can never move backwards whoever races whom.

    created ──▶ in-progress ──▶ success | failed | terminated
       ├──────────────────────────────────────────▶ terminated
       └──────────────────────────────────────────▶ failed (replica-failed)

An in-progress execution whose worker vanished is *handed back*: it stays in-progress with
no lease (`lease_until IS NULL`) until a worker claims it again with attempt + 1.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import asyncpg

from core.models import status_entry
from core.outbox import OutboxEvent, execution_event_cte

NOTIFY_CHANNEL = "ferry_execution_finished"


class ExecutionStatus(StrEnum):
    created = "created"
    in_progress = "in-progress"
    success = "success"
    failed = "failed"
    terminated = "terminated"


class Reason(StrEnum):
    exception = "exception"
    timeout = "timeout"
    oom = "oom"
    crashed = "crashed"
    lost = "lost"
    max_attempts = "max-attempts"
    system = "system"
    replica_failed = "replica-failed"


TERMINAL = frozenset({ExecutionStatus.success, ExecutionStatus.failed, ExecutionStatus.terminated})
LIVE = frozenset({ExecutionStatus.created, ExecutionStatus.in_progress})


# The final SELECT of a transition with an event: the row, and its outbox row as `outbox`.
_WITH_EVENT = """
    SELECT {source}.*, (SELECT row_to_json(e)::jsonb FROM evented e) AS outbox FROM {source}"""


def row_events(row: asyncpg.Record | None) -> list[OutboxEvent]:
    """The event a transition wrote with its row (see `_WITH_EVENT`), as a list."""
    if row is None or row["outbox"] is None:
        return []
    return [OutboxEvent.from_row(row["outbox"])]


def _log(status: str, message: str | None = None, **extra: Any) -> list[dict[str, Any]]:
    # Appended with `status_log || $n::jsonb`: a one-element JSON array.
    return [status_entry(status, message, **extra)]


async def claim(
    conn: asyncpg.Connection, execution_id: str, *, worker_id: str, replica_id: str, lease_s: float
) -> asyncpg.Record | None:
    """created (or handed back) → in-progress with attempt + 1 and a lease; None if not ours.

    One statement (the attempt row and the `execution.in-progress` event's outbox row are
    written in the same one): this is on every execution's path, and each round trip to
    PostgreSQL shows in its latency.
    """
    return await conn.fetchrow(
        """WITH claimed AS (
               UPDATE executions SET status = 'in-progress', attempt = attempt + 1,
                   lease_until = clock_timestamp() + make_interval(secs => $4),
                   worker_id = $2, replica_id = $3,
                   started_at = coalesce(started_at, clock_timestamp()),
                   updated_at = clock_timestamp(),
                   status_log = status_log || jsonb_build_array(jsonb_build_object(
                       'status', 'in-progress', 'at', to_char(clock_timestamp() AT TIME ZONE 'UTC',
                       'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'), 'message', 'attempt ' || (attempt + 1),
                       'attempt', attempt + 1))
               WHERE id = $1 AND attempt < max_attempts AND NOT terminate_requested
                 AND (status = 'created' OR (status = 'in-progress' AND lease_until IS NULL))
               RETURNING *),
           recorded AS (
               INSERT INTO execution_attempts (execution_id, attempt, worker_id, replica_id, status)
               SELECT id, attempt, $2, $3, 'in-progress' FROM claimed
               ON CONFLICT (execution_id, attempt) DO NOTHING),
           """
        + execution_event_cte("claimed", "'execution.in-progress'")
        + _WITH_EVENT.format(source="claimed"),
        execution_id,
        worker_id,
        replica_id,
        lease_s,
    )


async def claim_many(
    conn: asyncpg.Connection,
    claims: list[tuple[str, str]],
    *,
    worker_id: str,
    lease_s: float,
) -> dict[str, asyncpg.Record]:
    """`claim` for several (execution id, replica id) pairs in one statement: the group
    commit of a busy worker. Returns the claimed rows by id; an id missing was not ours.
    The ids must be distinct."""
    return {
        row["id"]: row
        for row in await conn.fetch(
            """WITH wanted AS (
                   SELECT * FROM unnest($1::text[], $2::text[]) AS w(id, replica_id)),
               claimed AS (
                   UPDATE executions e SET status = 'in-progress', attempt = e.attempt + 1,
                       lease_until = clock_timestamp() + make_interval(secs => $4),
                       worker_id = $3, replica_id = w.replica_id,
                       started_at = coalesce(e.started_at, clock_timestamp()),
                       updated_at = clock_timestamp(),
                       status_log = e.status_log || jsonb_build_array(jsonb_build_object(
                           'status', 'in-progress', 'at', to_char(clock_timestamp() AT TIME ZONE 'UTC',
                           'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'), 'message', 'attempt ' || (e.attempt + 1),
                           'attempt', e.attempt + 1))
                   FROM wanted w
                   WHERE e.id = w.id AND e.attempt < e.max_attempts AND NOT e.terminate_requested
                     AND (e.status = 'created' OR (e.status = 'in-progress' AND e.lease_until IS NULL))
                   RETURNING e.*),
               recorded AS (
                   INSERT INTO execution_attempts (execution_id, attempt, worker_id, replica_id, status)
                   SELECT id, attempt, $3, replica_id, 'in-progress' FROM claimed
                   ON CONFLICT (execution_id, attempt) DO NOTHING),
               """
            + execution_event_cte("claimed", "'execution.in-progress'")
            + """
               SELECT claimed.*, (SELECT row_to_json(e)::jsonb FROM evented e
                                  WHERE e.resource_id = claimed.id) AS outbox
               FROM claimed""",
            [execution_id for execution_id, _ in claims],
            [replica_id for _, replica_id in claims],
            worker_id,
            lease_s,
        )
    }


async def renew_leases(
    conn: asyncpg.Connection | asyncpg.Pool,
    worker_id: str,
    execution_ids: list[str],
    lease_s: float,
) -> list[str]:
    """Extend this worker's leases; returns the ids it still holds (others were taken back)."""
    if not execution_ids:
        return []
    rows = await conn.fetch(
        """UPDATE executions SET lease_until = clock_timestamp() + make_interval(secs => $3)
           WHERE id = ANY($2::text[]) AND worker_id = $1 AND status = 'in-progress'
             AND lease_until IS NOT NULL
           RETURNING id""",
        worker_id,
        execution_ids,
        lease_s,
    )
    return [r["id"] for r in rows]


async def finish(
    conn: asyncpg.Connection,
    execution_id: str,
    attempt: int,
    status: ExecutionStatus,
    *,
    reason: Reason | None = None,
    output: Any = None,
    error: dict[str, Any] | None = None,
    message: str | None = None,
) -> asyncpg.Record | None:
    """in-progress (this attempt) → terminal. None when someone else moved it on first.

    One statement: the status, the attempt's row, the event's outbox row and the NOTIFY that
    wakes waiters (sent at commit). The attempt row is closed even when the execution moved
    on without it.
    """
    assert status in TERMINAL
    return await conn.fetchrow(
        """WITH done AS (
               UPDATE executions SET status = $3, reason = $4, output = $5, error = $6,
                   lease_until = NULL, finished_at = clock_timestamp(),
                   updated_at = clock_timestamp(),
                   progress_percent = CASE WHEN $3 = 'success' THEN 100 ELSE progress_percent END,
                   status_log = status_log || $7::jsonb
               WHERE id = $1 AND attempt = $2 AND status = 'in-progress'
                 AND lease_until IS NOT NULL  -- handed back: the attempt is no longer held
               RETURNING *),
           closed AS (
               UPDATE execution_attempts SET status = $3, reason = $4, error = $6,
                   finished_at = clock_timestamp()
               WHERE execution_id = $1 AND attempt = $2 AND finished_at IS NULL),
           """
        + execution_event_cte("done", "'execution.' || status")
        + _WITH_EVENT.format(source="done")
        + ", LATERAL (SELECT pg_notify($8, done.id)) AS notified",
        execution_id,
        attempt,
        status.value,
        reason.value if reason else None,
        output,
        error,
        _log(
            status.value,
            message or (error or {}).get("message"),
            reason=reason and reason.value,
        ),
        NOTIFY_CHANNEL,
    )


async def succeed_many(
    conn: asyncpg.Connection, items: list[tuple[str, int, Any]]
) -> dict[str, asyncpg.Record]:
    """`finish` with success for several (execution id, attempt, output) in one statement:
    the group commit of a busy worker, for executions outside pipelines (a pipeline node's
    outcome advances its pipeline in its own transaction). The ids must be distinct.
    Returns the finished rows by id; an id missing had moved on without this attempt."""
    return {
        row["id"]: row
        for row in await conn.fetch(
            """WITH wanted AS (
                   SELECT * FROM unnest($1::text[], $2::int[], $3::jsonb[])
                       AS w(id, attempt, output)),
               done AS (
                   UPDATE executions e SET status = 'success', reason = NULL,
                       output = w.output, error = NULL,
                       lease_until = NULL, finished_at = clock_timestamp(),
                       updated_at = clock_timestamp(), progress_percent = 100,
                       status_log = e.status_log || $4::jsonb
                   FROM wanted w
                   WHERE e.id = w.id AND e.attempt = w.attempt AND e.status = 'in-progress'
                     AND e.lease_until IS NOT NULL  -- handed back: the attempt is no longer held
                   RETURNING e.*),
               closed AS (
                   UPDATE execution_attempts a SET status = 'success', reason = NULL,
                       error = NULL, finished_at = clock_timestamp()
                   FROM wanted w
                   WHERE a.execution_id = w.id AND a.attempt = w.attempt
                     AND a.finished_at IS NULL),
               """
            + execution_event_cte("done", "'execution.' || status")
            + """
               SELECT done.*, (SELECT row_to_json(e)::jsonb FROM evented e
                               WHERE e.resource_id = done.id) AS outbox
               FROM done, LATERAL (SELECT pg_notify($5, done.id)) AS notified""",
            [execution_id for execution_id, _, _ in items],
            [attempt for _, attempt, _ in items],
            [output for _, _, output in items],
            _log(ExecutionStatus.success.value, None, reason=None),
            NOTIFY_CHANNEL,
        )
    }


async def hand_back(
    conn: asyncpg.Connection,
    execution_id: str,
    attempt: int,
    *,
    reason: Reason,
    error: dict[str, Any] | None,
    retry: bool,
) -> asyncpg.Record | None:
    """An attempt that died with its replica: retry it (attempt + 1 on the next claim) or fail.

    Retried while `retry` and attempts remain; otherwise failed with `reason`, or with
    `max-attempts` when the attempts ran out.
    """
    async with conn.transaction():
        row = await conn.fetchrow(
            """WITH moved AS (UPDATE executions SET
                   lease_until = NULL, worker_id = NULL, replica_id = NULL,
                   updated_at = clock_timestamp(),
                   status = CASE WHEN $3 AND attempt < max_attempts THEN 'in-progress' ELSE 'failed' END,
                   reason = CASE WHEN $3 AND attempt < max_attempts THEN NULL
                                 WHEN $3 THEN 'max-attempts' ELSE $4 END,
                   error = CASE WHEN $3 AND attempt < max_attempts THEN NULL ELSE $5::jsonb END,
                   finished_at = CASE WHEN $3 AND attempt < max_attempts THEN NULL
                                      ELSE clock_timestamp() END,
                   status_log = status_log || jsonb_build_array(jsonb_build_object(
                       'status', CASE WHEN $3 AND attempt < max_attempts THEN 'in-progress'
                                      ELSE 'failed' END,
                       'at', to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'),
                       'message', CASE WHEN $3 AND attempt < max_attempts
                                       THEN 'attempt ' || attempt || ' ' || $4 || ': retrying'
                                       ELSE 'attempt ' || attempt || ' ' || $4 END,
                       'reason', $4))
               WHERE id = $1 AND attempt = $2 AND status = 'in-progress'
               RETURNING *),
               """
            + execution_event_cte(
                "moved",
                "CASE WHEN status = 'in-progress' THEN 'execution.retrying' ELSE 'execution.failed' END",
            )
            + _WITH_EVENT.format(source="moved"),
            execution_id,
            attempt,
            retry,
            reason.value,
            error,
        )
        await _close_attempt(conn, execution_id, attempt, "failed", reason, error)
        if row is not None and row["status"] == ExecutionStatus.failed:
            await _notify_finished(conn, row)
    return row


async def terminate_created(conn: asyncpg.Connection | asyncpg.Pool, execution_id: str):
    """created → terminated, before any worker took it."""
    row = await conn.fetchrow(
        """WITH moved AS (
               UPDATE executions SET status = 'terminated', finished_at = clock_timestamp(),
                   updated_at = clock_timestamp(), status_log = status_log || $2::jsonb
               WHERE id = $1 AND status = 'created' RETURNING *),
           """
        + execution_event_cte("moved", "'execution.terminated'")
        + _WITH_EVENT.format(source="moved"),
        execution_id,
        _log("terminated", "terminated before it started"),
    )
    if row is not None:
        await _notify_finished(conn, row)
    return row


async def fail_waiting(
    conn: asyncpg.Connection, service_id: str, *, error: dict[str, Any], limit: int
) -> list[asyncpg.Record]:
    """Waiting executions of a service (created, or handed back) → failed `replica-failed`.

    For a service whose replica cannot start. At most `limit` rows per call, so a long queue
    is failed in bounded transactions; each returned row carries its event as `outbox`.
    """
    rows = await conn.fetch(
        """WITH moved AS (
               UPDATE executions SET status = 'failed', reason = 'replica-failed', error = $2,
                   lease_until = NULL, worker_id = NULL, replica_id = NULL,
                   finished_at = clock_timestamp(), updated_at = clock_timestamp(),
                   status_log = status_log || $3::jsonb
               WHERE id IN (SELECT id FROM executions WHERE service_id = $1
                              AND (status = 'created'
                                   OR (status = 'in-progress' AND lease_until IS NULL))
                            ORDER BY created_at LIMIT $4 FOR UPDATE SKIP LOCKED)
                 AND (status = 'created' OR (status = 'in-progress' AND lease_until IS NULL))
               RETURNING *),
           """
        + execution_event_cte("moved", "'execution.failed'")
        + """
           SELECT moved.*, (SELECT row_to_json(e)::jsonb FROM evented e
                            WHERE e.resource_id = moved.id) AS outbox
           FROM moved""",
        service_id,
        error,
        _log(
            ExecutionStatus.failed.value, error.get("message"), reason=Reason.replica_failed.value
        ),
        limit,
    )
    if rows:  # delivered at commit, like every terminal transition's NOTIFY
        await conn.execute(
            "SELECT pg_notify($1, id) FROM unnest($2::text[]) AS id",
            NOTIFY_CHANNEL,
            [r["id"] for r in rows],
        )
    return rows


async def request_termination(conn: asyncpg.Connection | asyncpg.Pool, execution_id: str):
    """Mark a live execution for termination; its worker kills it and records `terminated`.

    A handed-back execution (no worker holds it) is terminated at once.
    """
    row = await conn.fetchrow(
        """WITH moved AS (
               UPDATE executions SET terminate_requested = true,
                   status = CASE WHEN lease_until IS NULL THEN 'terminated' ELSE status END,
                   finished_at = CASE WHEN lease_until IS NULL THEN clock_timestamp() END,
                   status_log = CASE WHEN lease_until IS NULL THEN status_log || $2::jsonb
                                     ELSE status_log END
               WHERE id = $1 AND status = 'in-progress' RETURNING *),
           """
        + execution_event_cte("moved", "'execution.terminated'", "status = 'terminated'")
        + _WITH_EVENT.format(source="moved"),
        execution_id,
        _log("terminated", "terminated while waiting for a retry"),
    )
    if row is not None and row["status"] == ExecutionStatus.terminated:
        await _notify_finished(conn, row)
    return row


async def expired_leases(conn: asyncpg.Connection | asyncpg.Pool, limit: int = 500):
    """In-progress executions whose worker stopped renewing its lease."""
    return await conn.fetch(
        """SELECT e.id, e.service_id, e.project_id, e.attempt, e.max_attempts, e.worker_id,
                  e.pipeline_execution_id, e.created_at, s.on_reset
           FROM executions e JOIN services s ON s.id = e.service_id
           WHERE e.status = 'in-progress' AND e.lease_until < clock_timestamp()
           ORDER BY e.lease_until LIMIT $1""",
        limit,
    )


async def _close_attempt(
    conn: asyncpg.Connection,
    execution_id: str,
    attempt: int,
    status: str,
    reason: Reason | None,
    error: dict[str, Any] | None,
) -> None:
    await conn.execute(
        """UPDATE execution_attempts SET status = $3, reason = $4, error = $5,
               finished_at = clock_timestamp()
           WHERE execution_id = $1 AND attempt = $2 AND finished_at IS NULL""",
        execution_id,
        attempt,
        status,
        reason.value if reason else None,
        error,
    )


async def _notify_finished(conn: asyncpg.Connection | asyncpg.Pool, row: asyncpg.Record) -> None:
    # Delivered at commit: `GET /executions/{id}/wait` answers without polling.
    await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, row["id"])
