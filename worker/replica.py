"""One replica: a warm container (or process) running the agent, consuming its service's
arq queue, up to `concurrency` executions at once.

Life: starting → ready → draining → stopped, or failed when its agent dies. A replica that
dies takes no execution with it: each in flight is retried or failed per `on_reset`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import arq
from arq.worker import Retry

from core import events, log_context, queue, states
from core.errors import Invalid
from core.manifest import FunctionSpec, Manifest, find_module, validate_output
from core.states import ExecutionStatus, Reason
from worker.agent_client import AgentConnection, ExecutionOutcome
from worker.logsink import LogSink
from worker.runtimes import ReplicaHandle, ReplicaSpec

if TYPE_CHECKING:
    from worker.host import WorkerHost

log = logging.getLogger(__name__)

JOB_TIMEOUT_S = 8 * 86400  # above any execution timeout: the agent enforces the real one
DRAIN_TIMEOUT_S = 600
TIMEOUT_BACKSTOP_S = 2.0
# Agent outcomes that fail the execution, with their reason. A crash of the function's own
# process is here; a crash of the whole agent (AgentLost) is handed back instead.
_FAILURE_REASONS = {
    "failed": Reason.exception,
    "timeout": Reason.timeout,
    "oom": Reason.oom,
    "crashed": Reason.crashed,
}  # the worker's own deadline, past the agent's, for a stuck agent


@dataclass
class ServiceConfig:
    """What a replica needs of its service, read once when it starts."""

    id: str
    project_id: str
    generation: int
    runtime: dict[str, Any]
    on_reset: str
    manifest: Manifest
    module: str
    env: dict[str, str]
    secrets: dict[str, str]
    init_inputs: dict[str, Any]
    package_id: str
    package_revision: int
    functions: dict[str, FunctionSpec] = field(default_factory=dict)

    def __post_init__(self) -> None:
        module = find_module(self.manifest, self.module)
        self.functions = {f.name: f for f in module.functions}


class Replica:
    def __init__(self, host: WorkerHost, replica_id: str, service: ServiceConfig) -> None:
        self.host = host
        self.id = replica_id
        self.service = service
        self.status = "starting"
        self.handle: ReplicaHandle | None = None
        self.agent = AgentConnection()
        self.consumer: arq.Worker | None = None
        self._consumer_task: asyncio.Task[None] | None = None
        self._monitor_task: asyncio.Task[None] | None = None
        self.running: dict[str, int] = {}  # execution id -> attempt
        self.started_at = time.monotonic()
        self.message: str | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        host, service = self.host, self.service
        module = find_module(service.manifest, service.module)
        try:
            codebase = await host.codebases.path_for(service.package_id, service.package_revision)
            image = await host.image_for(self, service)
            spec = ReplicaSpec(
                replica_id=self.id,
                service_id=service.id,
                image=image,
                codebase_dir=codebase,
                run_dir=host.settings.runtime_dir / self.id,
                entry_point=module.entry_point,
                class_name=module.class_name,
                init_inputs=service.init_inputs,
                functions={
                    f.name: {
                        "inputs": [p.name for p in f.inputs],
                        "outputs": [p.name for p in f.outputs],
                    }
                    for f in module.functions
                },
                concurrency=service.runtime["concurrency"],
                env={**service.env, **service.secrets},
                cpu=service.runtime["cpu"],
                memory_mb=service.runtime["memory_mb"],
                pids_limit=service.runtime.get("pids_limit", 256),
                network=service.runtime["network"],
            )
            self.handle = await host.runtime.start(spec)
            await self.agent.connect(host.runtime.socket_path(self.handle), timeout_s=60)
            ready = await asyncio.wait_for(self.agent.wait_ready(), 300)
        except Exception as exc:
            host.metrics.cold_start(service.id, None)
            await self._fail(f"start failed: {exc}", detail=await self._exit_detail())
            raise
        cold_start_ms = int((time.monotonic() - self.started_at) * 1000)
        host.metrics.cold_start(service.id, cold_start_ms / 1000)
        self.status = "ready"
        await host.set_replica_status(
            self, "ready", f"ready in {cold_start_ms} ms", cold_start_ms=cold_start_ms
        )
        log.info(
            "replica %s of %s ready in %d ms (python %s)",
            self.id,
            service.id,
            cold_start_ms,
            ready.get("python"),
        )
        self.consumer = arq.Worker(
            functions=[
                arq.func(
                    self._job,
                    name=queue.RUN_EXECUTION,
                    keep_result=0,
                    max_tries=1_000_000,
                    timeout=JOB_TIMEOUT_S,
                )
            ],
            queue_name=queue.queue_name(service.id),
            redis_settings=queue.redis_settings(host.settings.redis_url),
            max_jobs=service.runtime["concurrency"],
            poll_delay=host.settings.poll_delay_s,
            handle_signals=False,
            keep_result=0,
            job_timeout=JOB_TIMEOUT_S,
            log_results=False,
            max_tries=1_000_000,
        )
        self._consumer_task = asyncio.create_task(self.consumer.main(), name=f"consumer {self.id}")
        self._monitor_task = asyncio.create_task(self._monitor(), name=f"monitor {self.id}")

    async def drain(self, reason: str, timeout_s: float = DRAIN_TIMEOUT_S) -> None:
        """Stop taking executions, let those running finish, then stop."""
        if self.status in ("draining", "stopped", "failed"):
            return
        self.status = "draining"
        await self.host.set_replica_status(self, "draining", reason)
        if self.consumer is not None:
            self.consumer.allow_pick_jobs = False
        deadline = time.monotonic() + timeout_s
        while self.running and time.monotonic() < deadline and self.status == "draining":
            await asyncio.sleep(0.05)
        if self.status == "draining":
            await self.stop("stopped", reason)

    async def stop(self, status: str, message: str) -> None:
        """Tear down now; executions still running are stopped and handed back."""
        self.status = status
        if self.consumer is not None:
            self.consumer.allow_pick_jobs = False
        if self._monitor_task is not None and self._monitor_task is not asyncio.current_task():
            self._monitor_task.cancel()
        with contextlib.suppress(Exception):
            await self.agent.shutdown(timeout_s=2)
        # Executions of a dead agent resolve at once; let them record their outcome before
        # the consumer is closed (closing cancels its job tasks).
        deadline = time.monotonic() + 5
        while self.running and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await self._stop_consumer()
        if self.handle is not None:
            with contextlib.suppress(Exception):
                await self.host.runtime.stop(self.handle, grace_s=2)
        await self.host.set_replica_status(self, status, message)

    async def _stop_consumer(self) -> None:
        if self._consumer_task is None:
            return
        self._consumer_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._consumer_task
        if self.consumer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.consumer.close(), 10)

    async def _fail(self, message: str, detail: str = "") -> None:
        self.message = message
        log.warning(
            "replica %s of %s failed: %s%s",
            self.id,
            self.service.id,
            message,
            f"\n{detail}" if detail else "",
        )
        await self.stop("failed", f"{message}\n{detail}".strip())

    async def _exit_detail(self) -> str:
        if self.handle is None:
            return ""
        with contextlib.suppress(Exception):
            info = await self.host.runtime.exit_info(self.handle)
            if info is not None:
                head = "OOMKilled" if info.oom_killed else f"exit code {info.exit_code}"
                return f"{head}\n{info.detail}".strip()
        return ""

    async def _monitor(self) -> None:
        """Notice a dead or hung agent; its executions then resolve as crashed."""
        stale_after = 10.0
        while self.status in ("ready", "draining"):
            await asyncio.sleep(0.25)
            if self.agent.closed or self.agent.lost_reason is not None:
                break
            if time.monotonic() - self.agent.last_heartbeat > stale_after:
                self.agent.close()
                break
        else:
            return
        detail = await self._exit_detail()
        await self._fail("the agent died", detail)

    # -- executions --------------------------------------------------------------------------

    async def _job(self, ctx: dict[str, Any], execution_id: str) -> None:
        if self.status != "ready":
            # This replica is going away: put the job back for another one.
            raise Retry(defer=0.05)
        if await self.run(execution_id):
            # Handed back for another attempt: arq queues the same job again.
            raise Retry(defer=0.05)

    async def run(self, execution_id: str) -> bool:
        """Claim and run one execution; True when it was handed back for a retry."""
        host = self.host
        log_context.execution_id.set(execution_id)  # this job's task: its log lines carry it
        async with host.pool.acquire() as conn:
            row = await states.claim(
                conn,
                execution_id,
                worker_id=host.id,
                replica_id=self.id,
                lease_s=host.settings.lease_s,
            )
        if row is None:
            return False  # finished, terminated, or taken by another worker already
        attempt = row["attempt"]
        host.metrics.claimed(row)
        self.running[execution_id] = attempt
        host.running[execution_id] = self
        host.note_activity(self.service.id)
        try:
            await events.publish(
                host.redis,
                "execution.in-progress",
                row["project_id"],
                "execution",
                execution_id,
                events.execution_event_data(row),
            )
            sink = LogSink(
                host.pool,
                host.redis,
                row,
                secrets=list(self.service.secrets.values()),
                max_lines=host.settings.log_max_lines,
                max_bytes=host.settings.log_max_bytes,
            )
            if attempt > 1:
                sink.system(f"attempt {attempt} of {row['max_attempts']} on replica {self.id}")
            context = {
                "execution_id": execution_id,
                "attempt": attempt,
                "service_id": row["service_id"],
                "project_id": row["project_id"],
                "function": row["function"],
                "replica_id": self.id,
                "trigger_id": row["trigger_id"],
                "trigger_fire_time": row["trigger_fire_time"].isoformat()
                if row["trigger_fire_time"]
                else None,
                "pipeline_execution_id": row["pipeline_execution_id"],
            }
            try:
                outcome = await asyncio.wait_for(
                    self.agent.execute(
                        execution_id,
                        row["function"],
                        row["input"],
                        context,
                        row["timeout_s"],
                        on_log=sink.add,
                        on_progress=sink.progress,
                    ),
                    row["timeout_s"] + TIMEOUT_BACKSTOP_S,
                )
            except TimeoutError:
                # The agent enforces timeouts; one too starved to do so (a fork bomb in a
                # small container) cannot be trusted with more work either.
                outcome = ExecutionOutcome("timeout")
                if self.status in ("ready", "draining"):
                    self.host.spawn(
                        self._fail(f"the agent did not stop {execution_id} at its timeout"),
                        f"fail {self.id}",
                    )
            if outcome.status == "crashed" and (outcome.error or {}).get("type") == "AgentLost":
                await self._agent_lost_detail(outcome)
            await sink.close()
            finished = await self._record(row, outcome, sink)
            return finished is not None and finished["status"] == ExecutionStatus.in_progress
        finally:
            self.running.pop(execution_id, None)
            host.running.pop(execution_id, None)

    async def _agent_lost_detail(self, outcome: ExecutionOutcome) -> None:
        """When the whole replica died, tell OOM (container killed) from a crash."""
        detail = await self._exit_detail()
        if detail.startswith("OOMKilled"):
            outcome.status = "oom"
            outcome.error = {
                "type": "OutOfMemory",
                "traceback": None,
                "message": f"the replica ran out of memory ({self.service.runtime['memory_mb']} MB)",
            }
        elif outcome.error is not None and detail:
            outcome.error["message"] = (
                f"{outcome.error.get('message', '')} ({detail.splitlines()[0]})"
            )

    async def _record(self, row: Any, outcome: ExecutionOutcome, sink: LogSink) -> Any:
        host = self.host
        execution_id, attempt = row["id"], row["attempt"]
        function = self.service.functions.get(row["function"])
        async with host.pool.acquire() as conn:
            finished = None
            if outcome.status == "success":
                try:
                    if function is not None:
                        validate_output(function, outcome.output)
                    finished = await states.finish(
                        conn, execution_id, attempt, ExecutionStatus.success, output=outcome.output
                    )
                except Invalid as exc:
                    finished = await states.finish(
                        conn,
                        execution_id,
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
                finished = await states.finish(
                    conn,
                    execution_id,
                    attempt,
                    ExecutionStatus.failed,
                    reason=_FAILURE_REASONS[outcome.status],
                    error=error,
                )
            elif outcome.status == "terminated":
                wanted = await conn.fetchval(
                    "SELECT terminate_requested FROM executions WHERE id = $1", execution_id
                )
                if wanted:
                    finished = await states.finish(
                        conn,
                        execution_id,
                        attempt,
                        ExecutionStatus.terminated,
                        message="terminated on request",
                    )
                else:  # stopped because this worker is going away: someone else runs it again
                    finished = await states.hand_back(
                        conn,
                        execution_id,
                        attempt,
                        reason=Reason.lost,
                        retry=True,
                        error={
                            "type": "WorkerShutdown",
                            "message": "the worker shut down",
                            "traceback": None,
                        },
                    )
            elif (outcome.error or {}).get("type") == "AgentLost":
                finished = await states.hand_back(
                    conn,
                    execution_id,
                    attempt,
                    reason=Reason.crashed,
                    retry=self.service.on_reset == "rerun",
                    error=outcome.error,
                )
            else:  # an outcome this worker does not know: record it rather than lose it
                finished = await states.finish(
                    conn,
                    execution_id,
                    attempt,
                    ExecutionStatus.failed,
                    reason=Reason.system,
                    error=outcome.error,
                )
        if finished is None:
            return None  # the lease was taken back meanwhile: another attempt owns the outcome
        host.metrics.finished(finished)
        kind = (
            "retrying" if finished["status"] == ExecutionStatus.in_progress else finished["status"]
        )
        await events.publish(
            host.redis,
            f"execution.{kind}",
            finished["project_id"],
            "execution",
            execution_id,
            events.execution_event_data(finished),
        )
        return finished
