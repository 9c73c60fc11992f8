"""What an agent's outcome means for the execution, recorded in one place.

A success is checked against the function's declared outputs and, the common case,
grouped with others under load. A failure of the function (or of its own process) fails
the execution with the reason `_FAILURE_REASONS` gives. An execution stopped because its
replica is going away is handed back for another attempt; one whose whole agent died is
handed back or failed per the service's `on_reset`, read at that moment. Error messages
and tracebacks are masked of the service's secret values before they are stored.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import asyncpg
from arq.connections import ArqRedis

from core import outbox, outcomes, states
from core.errors import Invalid
from core.manifest import validate_output
from core.secrets import mask_secrets
from core.states import ExecutionStatus, Reason
from worker.agent_client import ExecutionOutcome
from worker.claims import SuccessBatcher
from worker.service_config import ServiceConfig

# Agent outcomes that fail the execution, with their reason. A crash of the function's own
# process is here; a crash of the whole agent (AgentLost) is handed back instead.
_FAILURE_REASONS = {
    "failed": Reason.exception,
    "timeout": Reason.timeout,
    "oom": Reason.oom,
    "crashed": Reason.crashed,
}


class OutcomeRecorder:
    def __init__(
        self,
        pool: asyncpg.Pool,
        redis: ArqRedis,
        successes: SuccessBatcher,
        publisher: outbox.Publisher,
        finished: Callable[[Any], None],
    ) -> None:
        """`finished` counts an execution that ended (or was handed back), before anyone
        hears of it."""
        self.pool = pool
        self.redis = redis
        self.successes = successes
        self.publisher = publisher
        self.finished = finished

    async def record(
        self, row: Any, outcome: ExecutionOutcome, service: ServiceConfig, replica_id: str
    ) -> Any:
        """Record `outcome` as the end (or hand-back) of the attempt in `row`, run by
        `replica_id`; the execution's row after it, or None when the lease was taken back
        meanwhile and another attempt owns the outcome."""
        secrets = list(service.secrets.values())
        if outcome.error is not None:  # an exception's message or traceback may quote a secret
            outcome.error = {
                k: mask_secrets(v, secrets) if isinstance(v, str) else v
                for k, v in outcome.error.items()
            }
        execution_id, attempt = row["id"], row["attempt"]
        function = service.functions.get(row["function"])
        if outcome.status == "success" and not row["pipeline_execution_id"]:
            try:
                if function is not None:
                    validate_output(function, outcome.output)
            except Invalid:
                pass  # recorded as failed below
            else:  # the common case: grouped with other successes under load
                done = await self.successes.succeed(execution_id, attempt, outcome.output)
                if done is not None:
                    self.finished(done)
                self.publisher.submit(states.row_events(done))
                return done
        async with self.pool.acquire() as conn:
            if outcome.status == "success":
                try:
                    if function is not None:
                        validate_output(function, outcome.output)
                    recorded = await outcomes.finish(
                        conn, row, attempt, ExecutionStatus.success, output=outcome.output
                    )
                except Invalid as exc:
                    recorded = await outcomes.finish(
                        conn,
                        row,
                        attempt,
                        ExecutionStatus.failed,
                        reason=Reason.exception,
                        error={
                            "type": "OutputError",
                            "message": exc.message,
                            "traceback": None,
                            "details": exc.details,
                        },
                    )
            elif (
                outcome.status in _FAILURE_REASONS
                and (outcome.error or {}).get("type") != "AgentLost"
            ):  # the function failed (or its own process died); the replica lives on
                error = outcome.error
                if outcome.status == "timeout":
                    error = {
                        "type": "Timeout",
                        "traceback": None,
                        "message": f"the function ran past its timeout of {row['timeout_s']} s and was killed",
                    }
                recorded = await outcomes.finish(
                    conn,
                    row,
                    attempt,
                    ExecutionStatus.failed,
                    reason=_FAILURE_REASONS[outcome.status],
                    error=error,
                )
            elif outcome.status in ("terminated", "shutdown"):
                wanted = await conn.fetchval(
                    "SELECT terminate_requested FROM executions WHERE id = $1", execution_id
                )
                if wanted:
                    recorded = await outcomes.finish(
                        conn,
                        row,
                        attempt,
                        ExecutionStatus.terminated,
                        message="terminated on request",
                    )
                else:  # stopped because its replica is going away: another one runs it again
                    recorded = await outcomes.hand_back(
                        conn,
                        row,
                        attempt,
                        reason=Reason.lost,
                        retry=True,
                        error={
                            "type": "WorkerShutdown",
                            "message": f"stopped by the shutdown of replica {replica_id}",
                            "traceback": None,
                        },
                    )
            elif (outcome.error or {}).get("type") == "AgentLost":
                # Read now: a PATCH of on_reset does not restart the replica.
                on_reset = await conn.fetchval(
                    "SELECT on_reset FROM services WHERE id = $1", service.id
                )
                recorded = await outcomes.hand_back(
                    conn,
                    row,
                    attempt,
                    reason=Reason.crashed,
                    retry=(on_reset or service.on_reset) == "rerun",
                    error=outcome.error,
                )
            else:  # an outcome this worker does not know: record it rather than lose it
                recorded = await outcomes.finish(
                    conn,
                    row,
                    attempt,
                    ExecutionStatus.failed,
                    reason=Reason.system,
                    error=outcome.error,
                )
            if recorded.row is not None:  # counted before anyone hears of the outcome
                self.finished(recorded.row)
            await recorded.deliver(conn, self.redis, self.publisher)
        # None: the lease was taken back meanwhile, and another attempt owns the outcome.
        return recorded.row
