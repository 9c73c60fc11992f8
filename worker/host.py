"""A worker process: hosts replicas of any service, up to its capacity.

Every worker runs the same loops, so any number of them on any number of hosts share the
work through PostgreSQL and Redis alone. `WorkerHost` owns the worker's replicas and the
executions they run, and wires the parts that do the work:

- placement (`worker/placement.py`): works out each service's desired replica count from
  its queue, claims missing replicas and drains surplus, rolled-over and paused ones;
- heartbeat (`worker/heartbeat.py`): the `workers` row and the leases of what runs here,
  renewed every `heartbeat_s`; an execution whose lease was lost is stopped;
- control channel (`worker/control.py`): enqueues, wake-ups and termination requests over
  Redis pub/sub;
- replicas (`worker/replica.py`): a container or process running the agent, consuming its
  service's queue (`worker/consumer.py`); given `ReplicaCollaborators`, never the host;
- the runtime (`worker/runtimes/`): docker or process, and what differs between them;
- metrics (`worker/metrics.py`), served on `metrics_port_worker`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Coroutine
from typing import Any

import asyncpg
from arq.connections import ArqRedis

from core import outbox, replica_store
from core.ids import new_id
from core.metrics_server import serve_metrics
from core.secrets import SecretBox
from core.settings import Settings
from worker.claims import ClaimBatcher, SuccessBatcher
from worker.codebases import CodebaseCache
from worker.control import ControlChannel, QueueWakes
from worker.heartbeat import Heartbeat
from worker.metrics import WorkerMetrics
from worker.placement import Placement
from worker.recording import OutcomeRecorder
from worker.replica import Replica, ReplicaCollaborators
from worker.runtimes import Runtime, detect_runtime
from worker.service_config import ServiceConfig

log = logging.getLogger(__name__)


class WorkerHost:
    def __init__(
        self,
        settings: Settings,
        pool: asyncpg.Pool,
        redis: ArqRedis,
        runtime: Runtime | None = None,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.redis = redis
        self.runtime = runtime or detect_runtime(settings.runtime)
        self.hostname = socket.gethostname()
        self.id = settings.worker_id or f"{self.hostname}-{os.getpid()}-{new_id()[-6:]}"
        self.replicas: dict[str, Replica] = {}
        self.running: dict[str, Replica] = {}  # execution id -> replica running it
        self._tasks: list[asyncio.Task[Any]] = []
        self._background: set[asyncio.Task[Any]] = set()
        self.metrics = WorkerMetrics(
            settings.worker_capacity, self._replica_states, lambda: len(self.running)
        )
        self._stop_metrics = lambda: None
        self.heartbeat = Heartbeat(
            pool,
            settings,
            worker_id=self.id,
            hostname=self.hostname,
            runtime_name=self.runtime.name,
            running=self.running,
        )
        self.placement = Placement(
            settings,
            pool,
            redis,
            worker_id=self.id,
            hostname=self.hostname,
            secret_box=SecretBox.from_settings(settings),
            replicas=self.replicas,
            new_replica=self._new_replica,
            spawn=self.spawn,
            finished=self.metrics.finished,
        )
        self.queue_wakes = QueueWakes()
        self.control = ControlChannel(redis, self.queue_wakes, self.placement.wake, self.running)
        # The events of claims and finishes: published after their commits, several per
        # round trip under load.
        self.publisher = outbox.Publisher(pool, redis)
        self.replica_collaborators = ReplicaCollaborators(
            settings=settings,
            pool=pool,
            redis=redis,
            runtime=self.runtime,
            hostname=self.hostname,
            codebases=CodebaseCache(settings, pool),
            claims=ClaimBatcher(pool, self.id, settings.lease_s),
            recorder=OutcomeRecorder(
                pool, redis, SuccessBatcher(pool), self.publisher, self.metrics.finished
            ),
            publisher=self.publisher,
            metrics=self.metrics,
            heartbeat=self.heartbeat,
            queue_wakes=self.queue_wakes,
            running=self.running,
            note_activity=self.placement.note_activity,
            spawn=self.spawn,
        )

    async def run(self, stop: asyncio.Event) -> None:
        await self.heartbeat.register()
        self._stop_metrics = serve_metrics(
            self.metrics.registry,
            self.settings.metrics_host,
            self.settings.metrics_port_worker,
            "worker",
            token=self.settings.metrics_token,
        )
        installation_id = await self.pool.fetchval("SELECT id FROM installation")
        await self.runtime.prepare(installation_id, self.settings.data_dir)
        # Other worker processes on this host keep theirs: only ids no live replica row has go.
        live = await replica_store.live_replica_ids(self.pool)
        removed = await self.runtime.cleanup_orphans(live)
        if removed:
            log.info("removed %d replicas left over from an earlier run", len(removed))
        await self.runtime.start_warm_pool(
            self.settings.warm_pool_size, self.settings.runner_image, self.settings.runtime_dir
        )
        log.info(
            "worker %s up: runtime %s, capacity %d",
            self.id,
            self.runtime.name,
            self.settings.worker_capacity,
        )
        self._tasks = [
            asyncio.create_task(self.heartbeat.run(), name="heartbeat"),
            asyncio.create_task(self.placement.run(), name="placement"),
            asyncio.create_task(self.control.listen(), name="control"),
        ]
        await stop.wait()
        await self.shutdown()

    async def shutdown(self, grace_s: float | None = None) -> None:
        """Stop taking work, give running executions `grace_s` (the `shutdown_grace_s`
        setting by default), hand the rest back."""
        if grace_s is None:
            grace_s = self.settings.shutdown_grace_s
        self.placement.shutting_down = True
        # Placement stops now; heartbeat (the leases of what still runs) and termination
        # requests go on until every replica is down, so the reconciler never takes back
        # an execution this worker is still running.
        for task in self._tasks:
            if task.get_name() == "placement":
                task.cancel()
        replicas = list(self.replicas.values())
        await asyncio.gather(
            *(r.drain("worker shutting down", timeout_s=grace_s) for r in replicas),
            return_exceptions=True,
        )
        await asyncio.gather(
            *(
                r.stop("stopped", "worker shut down")
                for r in replicas
                if r.status not in ("stopped", "failed")
            ),
            return_exceptions=True,
        )
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(Exception):  # what is not published is left to the relay
            await asyncio.wait_for(self.publisher.flush(), 10)
        await self.heartbeat.unregister()
        await self.runtime.close()
        await asyncio.to_thread(self._stop_metrics)

    def spawn(self, coroutine: Coroutine[Any, Any, Any], name: str) -> None:
        """Run a replica action in the background, keeping a reference until it ends."""
        task = asyncio.create_task(coroutine, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _new_replica(self, replica_id: str, config: ServiceConfig) -> Replica:
        return Replica(self.replica_collaborators, replica_id, config)

    def _replica_states(self) -> list[tuple[str, str]]:
        # Called at scrape time, possibly from the metrics server's thread: the table is
        # copied before it is walked.
        return [(r.service.id, r.status) for r in list(self.replicas.values())]
