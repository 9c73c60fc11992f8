"""One replica: a warm container (or process) running the agent, consuming its service's
arq queue, up to `concurrency` executions at once.

Life: starting → ready → draining → stopped, or failed when its agent dies. A replica that
dies takes no execution with it: each in flight is retried or failed per `on_reset`.

A replica records its own status (its `replicas` row, event and lifecycle line), claims
and runs executions, and has each outcome recorded (`worker/recording.py`). Of the worker
hosting it, it is given only what it uses (`ReplicaCollaborators`): the runtime that
launches it, the claim batcher and outcome recorder, the heartbeat that says whether
leases can be renewed, the wake-ups of its queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

import arq
import asyncpg
from arq.connections import ArqRedis
from arq.worker import Retry

from core import events, log_context, outbox, queue, replica_store, states
from core.manifest import find_module
from core.outages import REDIS_UNAVAILABLE, UNAVAILABLE, Outage
from core.secrets import mask_secrets
from core.settings import Settings
from core.states import ExecutionStatus
from worker.agent_client import AgentConnection, ExecutionOutcome
from worker.claims import ClaimBatcher
from worker.codebases import CodebaseCache
from worker.consumer import QueueConsumer
from worker.control import QueueWakes
from worker.heartbeat import Heartbeat
from worker.logsink import LogSink
from worker.recording import OutcomeRecorder
from worker.runtimes import ReplicaHandle, ReplicaSpec, Runtime
from worker.service_config import ServiceConfig

log = logging.getLogger(__name__)

JOB_TIMEOUT_S = 8 * 86400  # above any execution timeout: the agent enforces the real one
TIMEOUT_BACKSTOP_S = 2.0  # the worker's own deadline, past the agent's, for a stuck agent
# The agent stops what still runs (SIGTERM, SIGKILL a second later) and reports each
# execution before it exits; this leaves room for that and for the last frames.
AGENT_SHUTDOWN_S = 5.0
# Executions of a stopped agent resolve at once: let them record their outcome (and arq
# queue the handed-back ones again) before the consumer is closed, which cancels its jobs.
SETTLE_S = 10.0


class ExecutionMetrics(Protocol):
    """What a replica reports of its starts and executions (`WorkerMetrics` does)."""

    def cold_start(self, service_id: str, seconds: float | None) -> None: ...

    def claimed(self, row: Any) -> None: ...

    def finished(self, row: Any) -> None: ...


@dataclass(frozen=True)
class ReplicaCollaborators:
    """What a replica uses of the worker that hosts it; one set, shared by its replicas."""

    settings: Settings
    pool: asyncpg.Pool
    redis: ArqRedis
    runtime: Runtime
    hostname: str
    codebases: CodebaseCache
    claims: ClaimBatcher  # claims grouped across replicas under load
    recorder: OutcomeRecorder  # what an execution's outcome means, recorded
    publisher: outbox.Publisher  # the events of claims (and, in the recorder, finishes)
    metrics: ExecutionMetrics
    heartbeat: Heartbeat  # whether leases can be renewed, so claims are worth taking
    queue_wakes: QueueWakes
    running: dict[str, Replica]  # the worker's: execution id -> the replica running it
    note_activity: Callable[[str], None]  # a service was busy: placement keeps it scaled
    spawn: Callable[[Coroutine[Any, Any, Any], str], None]  # a background task, referenced


class Replica:
    def __init__(
        self, worker: ReplicaCollaborators, replica_id: str, service: ServiceConfig
    ) -> None:
        self.worker = worker
        self.id = replica_id
        self.service = service
        self.status = "starting"
        self.handle: ReplicaHandle | None = None
        self.agent = AgentConnection()
        self.consumer: QueueConsumer | None = None
        self._consumer_task: asyncio.Task[None] | None = None
        self._monitor_task: asyncio.Task[None] | None = None
        self.running: dict[str, int] = {}  # execution id -> attempt
        self.started_at = time.monotonic()
        self.message: str | None = None
        self._outage = Outage(f"replica {replica_id}", log)
        self.wake = asyncio.Event()  # set when its queue may hold work (see QueueConsumer)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        worker, service = self.worker, self.service
        module = find_module(service.manifest, service.module)
        try:
            codebase = await worker.codebases.path_for(service.package_id, service.package_revision)
            image = await worker.runtime.image_for(
                service.runtime.get("image"),
                worker.settings.runner_image,
                service.manifest.requirements,
                lambda step: self.record_status("starting", step),
            )
            spec = ReplicaSpec(
                replica_id=self.id,
                service_id=service.id,
                image=image,
                codebase_dir=codebase,
                run_dir=worker.settings.runtime_dir / self.id,
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
                # Secrets go to the agent over its socket (below), never into the engine's
                # metadata: a container's environment is readable with `docker inspect`.
                env=dict(service.env),
                cpu=service.runtime["cpu"],
                memory_mb=service.runtime["memory_mb"],
                pids_limit=service.runtime.get("pids_limit", 256),
                executions_per_process=service.runtime.get("executions_per_process", 1),
                network=service.runtime["network"],
            )
            self.handle = await worker.runtime.start(spec)
            await self.agent.connect(worker.runtime.socket_path(self.handle), timeout_s=60)
            ready = await asyncio.wait_for(self.agent.wait_ready(), 300)
            if service.secrets:  # before any execute: frames arrive in order
                await self.agent.send_secrets(service.secrets)
        except Exception as exc:
            worker.metrics.cold_start(service.id, None)
            await self._fail(f"start failed: {exc}", detail=await self._exit_detail())
            raise
        cold_start_ms = int((time.monotonic() - self.started_at) * 1000)
        worker.metrics.cold_start(service.id, cold_start_ms / 1000)
        self.status = "ready"
        how = ", from the warm pool" if self.handle.warm else ""
        await self.record_status(
            "ready", f"ready in {cold_start_ms} ms{how}", cold_start_ms=cold_start_ms
        )
        log.info(
            "replica %s of %s ready in %d ms (python %s%s)",
            self.id,
            service.id,
            cold_start_ms,
            ready.get("python"),
            how,
        )
        self.consumer = QueueConsumer(
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
            redis_settings=queue.redis_settings(worker.settings.redis_url),
            max_jobs=service.runtime["concurrency"],
            poll_delay=worker.settings.queue_fallback_poll_s,  # arq reads it for cron only
            wake=self.wake,
            fallback_poll_s=worker.settings.queue_fallback_poll_s,
            handle_signals=False,
            keep_result=0,
            job_timeout=JOB_TIMEOUT_S,
            log_results=False,
            max_tries=1_000_000,
            on_startup=self._consumer_connected,
        )
        worker.queue_wakes.listen(queue.queue_name(service.id), self.wake)
        self._consumer_task = asyncio.create_task(self._consume(), name=f"consumer {self.id}")
        self._monitor_task = asyncio.create_task(self._monitor(), name=f"monitor {self.id}")

    async def _consume(self) -> None:
        """Run the arq consumer, again after each Redis outage (arq's loop ends on the first
        failed command). Jobs running meanwhile carry on: their outcome goes to PostgreSQL."""
        assert self.consumer is not None
        while self.status in ("ready", "draining"):
            try:
                await self.consumer.main()
                return
            except asyncio.CancelledError:
                raise
            except UNAVAILABLE as exc:
                await asyncio.sleep(self._outage.lost(exc))
            except Exception:
                log.exception("the queue consumer of replica %s failed; restarting it", self.id)
                await asyncio.sleep(1.0)

    async def _consumer_connected(self, ctx: dict[str, Any]) -> None:
        self._outage.ok()
        # Jobs that ended while Redis was away failed to write their end to it (their
        # outcome is in PostgreSQL). arq would re-raise each in its next poll and stop
        # again; the reconciler tidies their leftover keys.
        assert self.consumer is not None
        for job_id, task in list(self.consumer.tasks.items()):
            if task.done():
                del self.consumer.tasks[job_id]
                if not task.cancelled():
                    task.exception()  # retrieved: asyncio does not report it as lost

    async def drain(self, reason: str, timeout_s: float | None = None) -> None:
        """Stop taking executions, let those running finish, then stop.

        Without `timeout_s` it waits as long as the executions may run: each is bounded by
        its own timeout (`run`), so a rollover or a scale-down cuts none of them short. A
        worker shutting down passes its grace period; what still runs is handed back.
        """
        if self.status in ("stopped", "failed"):
            return
        if self.status != "draining":
            self.status = "draining"
            if self.consumer is not None:  # before any await: no job is picked once draining
                self.consumer.allow_pick_jobs = False
            await self.record_status("draining", reason)
        # Already draining (a rollover, say) when the worker shuts down: this drain bounds
        # the wait by its grace; whichever ends first stops the replica.
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self.running and self.status == "draining":
            if deadline is not None and time.monotonic() >= deadline:
                break
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
            await self.agent.shutdown(timeout_s=AGENT_SHUTDOWN_S)
        deadline = time.monotonic() + SETTLE_S
        while self._jobs_in_flight() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await self._stop_consumer()
        if self.handle is not None:
            with contextlib.suppress(Exception):
                await self.worker.runtime.stop(self.handle, grace_s=2)
        await self.record_status(status, message)

    async def record_status(
        self, status: str, message: str | None, cold_start_ms: int | None = None
    ) -> None:
        """Write the replica's row, publish its event and its service's lifecycle line."""
        worker = self.worker
        # The replica row and lifecycle line are read by viewers: no secret value in them.
        if message is not None:
            message = self.mask(message)
        async with worker.pool.acquire() as conn:
            async with conn.transaction():
                await replica_store.set_status(
                    conn,
                    self.id,
                    status=status,
                    message=message,
                    cold_start_ms=cold_start_ms,
                    running=len(self.running),
                )
                event = await outbox.add(
                    conn,
                    f"replica.{status}",
                    self.service.project_id,
                    "replica",
                    self.id,
                    {"service": self.service.id, "message": message, "host": worker.hostname},
                )
            await outbox.publish(conn, worker.redis, [event])
        try:
            await events.service_lifecycle(worker.redis, self.service.id, self.id, status, message)
            if status == "ready":
                # Every worker places at once: replicas of an older generation, on any
                # host, drain as soon as a new one is ready, not a placement tick later.
                await worker.redis.publish(queue.WAKE_CHANNEL, self.service.id)
        except REDIS_UNAVAILABLE:
            pass  # a live notice only: the replica row above is the record

    def _jobs_in_flight(self) -> bool:
        """Executions still recording their outcome, or arq jobs not yet finished (a handed
        back execution is queued again by arq once its job ends)."""
        if self.running:
            return True
        tasks = self.consumer.tasks.values() if self.consumer is not None else ()
        return any(not task.done() for task in tasks)

    async def _stop_consumer(self) -> None:
        if self._consumer_task is None:
            return
        self.worker.queue_wakes.unlisten(queue.queue_name(self.service.id), self.wake)
        self._consumer_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._consumer_task
        if self.consumer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.consumer.close(), 10)

    def mask(self, text: str) -> str:
        """`text` with the service's secret values masked, for anything a person may read."""
        return mask_secrets(text, list(self.service.secrets.values()))

    async def _fail(self, message: str, detail: str = "") -> None:
        message, detail = self.mask(message), self.mask(detail)
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
            info = await self.worker.runtime.exit_info(self.handle)
            if info is not None:
                head = "OOMKilled" if info.oom_killed else f"exit code {info.exit_code}"
                return f"{head}\n{info.detail}".strip()
        return ""

    async def _monitor(self) -> None:
        """Notice a dead or hung agent; its executions then resolve as crashed."""
        stale_after = 10.0  # the agent sends a heartbeat every ReplicaSpec.heartbeat_s (3 s)
        while self.status in ("ready", "draining"):
            # Woken at once when the connection is lost; the staleness check every 2 s.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.agent.lost.wait(), 2.0)
            if self.status not in ("ready", "draining"):
                return
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
        if self.status != "ready" or self.agent.closed:
            # This replica is going away (or its agent is already gone, which its monitor
            # has yet to notice): put the job back for another one, without an attempt.
            self._wake_consumers_later()
            raise Retry(defer=0.05)
        if not self.worker.heartbeat.can_renew_leases():
            # Its worker cannot renew leases now: a claim would be lost, with an attempt.
            self._wake_consumers_later()
            raise Retry(defer=0.5)
        if await self.run(execution_id):
            # Handed back for another attempt: arq queues the same job again.
            self._wake_consumers_later()
            raise Retry(defer=0.05)

    async def stop_execution(self, execution_id: str) -> None:
        """Have the agent stop one execution (lost lease, or termination asked)."""
        await self.agent.stop(execution_id)

    def _wake_consumers_later(self) -> None:
        """A job put back with a delay: wake the service's consumers (on any worker) when it
        is due, rather than at their next fallback poll."""

        async def wake() -> None:
            await asyncio.sleep(0.1)
            with contextlib.suppress(Exception):
                await queue.wake_consumers(self.worker.redis, self.service.id)

        self.worker.spawn(wake(), f"wake {self.service.id}")

    async def run(self, execution_id: str) -> bool:
        """Claim and run one execution; True when it was handed back for a retry."""
        worker = self.worker
        log_context.execution_id.set(execution_id)  # this job's task: its log lines carry it
        row = await worker.claims.claim(execution_id, self.id)  # grouped with others under load
        if row is None:
            return False  # finished, terminated, or taken by another worker already
        attempt = row["attempt"]
        worker.metrics.claimed(row)
        self.running[execution_id] = attempt
        worker.running[execution_id] = self
        worker.note_activity(self.service.id)
        try:
            worker.publisher.submit(states.row_events(row))
            sink = LogSink(
                worker.pool,
                worker.redis,
                row,
                secrets=list(self.service.secrets.values()),
                max_lines=worker.settings.log_max_lines,
                max_bytes=worker.settings.log_max_bytes,
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
                "pipeline_node": row["pipeline_node"],
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
                    self.worker.spawn(
                        self._fail(f"the agent did not stop {execution_id} at its timeout"),
                        f"fail {self.id}",
                    )
            if outcome.status == "crashed" and (outcome.error or {}).get("type") == "AgentLost":
                await self._agent_lost_detail(outcome)
            await sink.close()
            finished = await worker.recorder.record(row, outcome, self.service, self.id)
            return finished is not None and finished["status"] == ExecutionStatus.in_progress
        finally:
            self.running.pop(execution_id, None)
            worker.running.pop(execution_id, None)

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
