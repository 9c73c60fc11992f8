"""A worker process: hosts replicas of any service, up to its capacity.

Every worker runs the same loops, so any number of them on any number of hosts share the
work through PostgreSQL and Redis alone:

- placement: each service's desired replica count is worked out from its queue; a worker
  with free capacity claims a missing replica under a per-service advisory lock, and
  drains its own surplus, old-generation (rolled-over) and paused-service replicas;
- leases: the in-progress executions it holds are renewed every `heartbeat_s`; any it lost
  (or whose termination was asked) are stopped;
- heartbeat: its `workers` row, so the reconciler can tell when a host is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from typing import Any

import asyncpg
from arq.connections import ArqRedis

from core import events, queue
from core.ids import new_id
from core.metrics_server import serve_metrics
from core.packages import load_manifest
from core.secrets import SecretBox
from core.settings import Settings
from worker.autoscale import desired_replicas
from worker.codebases import CodebaseCache
from worker.metrics import WorkerMetrics
from worker.replica import Replica, ServiceConfig
from worker.runtimes import Runtime, detect_runtime

log = logging.getLogger(__name__)

PLACEMENT_INTERVAL_S = 0.5
START_BACKOFF_S = (1, 2, 5, 10, 30, 60)


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
        self.host = socket.gethostname()
        self.id = settings.worker_id or f"{self.host}-{os.getpid()}-{new_id()[-6:]}"
        self.codebases = CodebaseCache(settings, pool)
        self.secret_box = SecretBox.from_settings(settings)
        self.replicas: dict[str, Replica] = {}
        self.running: dict[str, Replica] = {}  # execution id -> replica running it
        self._activity: dict[str, float] = {}
        self._failures: dict[str, tuple[int, float]] = {}  # service -> (count, retry after)
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._background: set[asyncio.Task[Any]] = set()
        self._docker_client: Any = None
        self.shutting_down = False
        self.metrics = WorkerMetrics(self)
        self._stop_metrics = lambda: None

    # -- process lifecycle -------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        await self.pool.execute(
            """INSERT INTO workers (id, host, runtime, capacity) VALUES ($1, $2, $3, $4)
               ON CONFLICT (id) DO UPDATE SET heartbeat_at = now()""",
            self.id,
            self.host,
            self.runtime.name,
            self.settings.worker_capacity,
        )
        self._stop_metrics = serve_metrics(
            self.metrics.registry,
            self.settings.api_host,
            self.settings.metrics_port_worker,
            "worker",
        )
        # Containers are labelled with this installation's id, so clean-up never touches
        # another Ferry's containers on a shared engine.
        if hasattr(self.runtime, "owner"):
            self.runtime.owner = await self.pool.fetchval("SELECT id FROM installation")
        removed = await self.runtime.cleanup_orphans(await self._replicas_kept_on_this_host())
        if removed:
            log.info("removed %d replicas left over from an earlier run", len(removed))
        log.info(
            "worker %s up: runtime %s, capacity %d",
            self.id,
            self.runtime.name,
            self.settings.worker_capacity,
        )
        self._tasks = [
            asyncio.create_task(
                self._every(self.settings.heartbeat_s, self._heartbeat), name="heartbeat"
            ),
            asyncio.create_task(self._placement_loop(), name="placement"),
            asyncio.create_task(self._listen_control(), name="control"),
        ]
        await stop.wait()
        await self.shutdown()

    async def shutdown(self, grace_s: float = 10.0) -> None:
        """Stop taking work, give running executions `grace_s`, hand the rest back."""
        self.shutting_down = True
        for task in self._tasks:
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
        await self.pool.execute("DELETE FROM workers WHERE id = $1", self.id)
        await self.runtime.close()
        await asyncio.to_thread(self._stop_metrics)

    async def _replicas_kept_on_this_host(self) -> set[str]:
        # Other worker processes on this host keep theirs: only ids no live replica row has go.
        rows = await self.pool.fetch(
            "SELECT id FROM replicas WHERE status IN ('starting', 'ready', 'draining')"
        )
        return {r["id"] for r in rows}

    async def _every(self, interval: float, action: Any) -> None:
        while True:
            try:
                await action()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s failed; trying again", getattr(action, "__name__", action))
            await asyncio.sleep(interval)

    async def _heartbeat(self) -> None:
        await self.pool.execute("UPDATE workers SET heartbeat_at = now() WHERE id = $1", self.id)
        held = list(self.running)
        if not held:
            return
        rows = await self.pool.fetch(
            """UPDATE executions SET lease_until = clock_timestamp() + make_interval(secs => $3)
               WHERE id = ANY($2::text[]) AND worker_id = $1 AND status = 'in-progress'
                 AND lease_until IS NOT NULL
               RETURNING id, terminate_requested""",
            self.id,
            held,
            self.settings.lease_s,
        )
        renewed = {r["id"]: r["terminate_requested"] for r in rows}
        missing = [i for i in held if i not in renewed and i in self.running]
        if missing:
            # Not renewed: finished a moment ago (fine), or taken back by the reconciler.
            taken = await self.pool.fetch(
                """SELECT id FROM executions WHERE id = ANY($1::text[]) AND status = 'in-progress'
                     AND (worker_id IS DISTINCT FROM $2 OR lease_until IS NULL)""",
                missing,
                self.id,
            )
            for row in taken:
                if (replica := self.running.get(row["id"])) is not None:
                    log.warning("lost the lease of %s; stopping it", row["id"])
                    await replica.agent.stop(row["id"])
        for execution_id, terminate in renewed.items():
            if terminate and (replica := self.running.get(execution_id)) is not None:
                await replica.agent.stop(execution_id)

    async def _listen_control(self) -> None:
        """Termination requests and wake-ups arrive over pub/sub, for sub-second reaction."""
        pubsub = self.redis.pubsub()
        await pubsub.subscribe(events.TERMINATE_CHANNEL, queue.WAKE_CHANNEL)
        try:
            async for message in pubsub.listen():
                if message["type"] != "message":
                    continue
                channel = message["channel"].decode()
                data = message["data"].decode()
                if channel == queue.WAKE_CHANNEL:
                    self._wake.set()
                elif (replica := self.running.get(data)) is not None:
                    log.info("terminating %s on request", data)
                    with contextlib.suppress(Exception):
                        await replica.agent.stop(data)
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    def spawn(self, coroutine: Any, name: str) -> None:
        """Run a replica action in the background, keeping a reference until it ends."""
        task = asyncio.create_task(coroutine, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def note_activity(self, service_id: str) -> None:
        self._activity[service_id] = time.time()

    # -- placement ---------------------------------------------------------------------------

    async def _placement_loop(self) -> None:
        while True:
            try:
                await self.place()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("placement failed; trying again")
            await asyncio.sleep(0.05)  # wake-ups in a burst coalesce into one round
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), PLACEMENT_INTERVAL_S)
            self._wake.clear()

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
        services = await self.pool.fetch(
            """SELECT s.id, s.project_id, s.status, s.generation, s.runtime, s.desired_replicas,
                      extract(epoch FROM now() - s.last_activity_at) AS idle_for_s,
                      (SELECT count(*) FROM executions e
                        WHERE e.service_id = s.id AND e.status = 'in-progress') AS in_progress,
                      (SELECT count(*) FROM replicas r WHERE r.service_id = s.id
                        AND r.generation = s.generation AND r.status IN ('starting', 'ready'))
                        AS live
               FROM services s"""
        )
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
        known = {s["id"] for s in services}
        for replica in list(self.replicas.values()):
            if replica.service.id not in known and replica.status in ("starting", "ready"):
                self.spawn(replica.stop("stopped", "service deleted"), f"stop {replica.id}")
        for service, queue_length in zip(services, queued, strict=True):
            desired = desired_replicas(
                service["runtime"],
                active=service["status"] == "active",
                queued=queue_length,
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
        return [r for r in self.replicas.values() if r.service.id == service_id]

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
            new_ready = await self.pool.fetchval(
                """SELECT count(*) FROM replicas WHERE service_id = $1 AND generation = $2
                   AND status = 'ready'""",
                service_id,
                service["generation"],
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
                replica_id = await self._claim_slot(service, desired)
                if replica_id is not None:
                    await self._start_replica(replica_id, service_id)
        elif service["live"] > desired:
            replica_id = await self._release_slot(service, desired)
            if replica_id is not None and replica_id in self.replicas:
                reason = "service paused" if service["status"] != "active" else "scaled down"
                self.spawn(self.replicas[replica_id].drain(reason), f"drain {replica_id}")

    async def _claim_slot(self, service: asyncpg.Record, desired: int) -> str | None:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", service["id"])
            live = await conn.fetchval(
                """SELECT count(*) FROM replicas WHERE service_id = $1 AND generation = $2
                   AND status IN ('starting', 'ready')""",
                service["id"],
                service["generation"],
            )
            if live >= desired:
                return None
            replica_id = new_id()
            await conn.execute(
                """INSERT INTO replicas (id, service_id, worker_id, host, generation, status)
                   VALUES ($1, $2, $3, $4, $5, 'starting')""",
                replica_id,
                service["id"],
                self.id,
                self.host,
                service["generation"],
            )
            return replica_id

    async def _release_slot(self, service: asyncpg.Record, desired: int) -> str | None:
        """Mark one of this worker's replicas draining if the service has too many."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", service["id"])
            live = await conn.fetchval(
                """SELECT count(*) FROM replicas WHERE service_id = $1 AND generation = $2
                   AND status IN ('starting', 'ready')""",
                service["id"],
                service["generation"],
            )
            if live <= desired:
                return None
            return await conn.fetchval(
                """UPDATE replicas SET status = 'draining', updated_at = now()
                   WHERE id = (SELECT id FROM replicas WHERE service_id = $1 AND worker_id = $2
                               AND generation = $3 AND status = 'ready'
                               ORDER BY running, started_at DESC LIMIT 1)
                   RETURNING id""",
                service["id"],
                self.id,
                service["generation"],
            )

    async def _start_replica(self, replica_id: str, service_id: str) -> None:
        try:
            config = await self._service_config(service_id)
        except Exception as exc:
            log.exception("cannot prepare service %s", service_id)
            await self.pool.execute(
                "UPDATE replicas SET status = 'failed', message = $2, stopped_at = now() WHERE id = $1",
                replica_id,
                f"cannot prepare the service: {exc}",
            )
            return
        replica = Replica(self, replica_id, config)
        self.replicas[replica_id] = replica
        await events.publish(
            self.redis,
            "replica.starting",
            config.project_id,
            "replica",
            replica_id,
            {"service": service_id, "host": self.host},
        )

        async def start() -> None:
            try:
                await replica.start()
                self._failures.pop(service_id, None)
            except Exception:
                pass  # recorded on the replica row by Replica.start; placement backs off

        self.spawn(start(), f"start {replica_id}")

    async def _service_config(self, service_id: str) -> ServiceConfig:
        row = await self.pool.fetchrow("SELECT * FROM services WHERE id = $1", service_id)
        manifest = await load_manifest(self.pool, row["package_id"], row["package_revision"])
        return ServiceConfig(
            id=row["id"],
            project_id=row["project_id"],
            generation=row["generation"],
            runtime=row["runtime"],
            on_reset=row["on_reset"],
            manifest=manifest,
            module=row["module"],
            env=row["env"],
            secrets={k: self.secret_box.decrypt(v) for k, v in row["secrets"].items()},
            init_inputs=row["init_inputs"],
            package_id=row["package_id"],
            package_revision=row["package_revision"],
        )

    async def set_replica_status(
        self, replica: Replica, status: str, message: str | None, cold_start_ms: int | None = None
    ) -> None:
        await self.pool.execute(
            """UPDATE replicas SET status = $2, message = $3, updated_at = now(),
                   cold_start_ms = coalesce($4, cold_start_ms), running = $5,
                   stopped_at = CASE WHEN $2 IN ('stopped', 'failed') THEN now() END
               WHERE id = $1""",
            replica.id,
            status,
            message,
            cold_start_ms,
            len(replica.running),
        )
        await events.publish(
            self.redis,
            f"replica.{status}",
            replica.service.project_id,
            "replica",
            replica.id,
            {"service": replica.service.id, "message": message, "host": self.host},
        )
        await events.service_lifecycle(self.redis, replica.service.id, replica.id, status, message)

    # -- images ------------------------------------------------------------------------------

    async def image_for(self, replica: Replica, service: ServiceConfig) -> str:
        """The image a replica runs: the service's own, or the runner image (built on first
        need) layered with the package's requirements."""
        if self.runtime.name != "docker":
            if service.manifest.requirements:
                log.warning(
                    "the process runtime does not install requirements (%s); they must "
                    "be importable on this host",
                    ", ".join(service.manifest.requirements),
                )
            return ""
        import docker

        from worker import images

        if self._docker_client is None:
            self._docker_client = docker.from_env()
        client = self._docker_client
        if service.runtime.get("image"):
            return service.runtime["image"]
        base = self.settings.runner_image
        if not await asyncio.to_thread(images.runner_image_exists, client, base):
            log.warning(
                "runner image %s is missing: building it now (about a minute; "
                "`ferry image build` does this ahead of time)",
                base,
            )
            await self.set_replica_status(replica, "starting", f"building the runner image {base}")
            await asyncio.to_thread(
                images.ensure_runner_image,
                client,
                base,
                lambda line: log.info("runner image: %s", line),
            )
        if not service.manifest.requirements:
            return base
        await self.set_replica_status(replica, "starting", "installing requirements")
        return await asyncio.to_thread(
            images.ensure_revision_image,
            client,
            base,
            service.manifest.requirements,
            lambda line: log.info("revision image: %s", line),
        )
