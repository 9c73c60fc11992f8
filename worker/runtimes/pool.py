"""A warm pool of runner containers: started ahead of any service, each taken by one replica.

Starting a container costs about 300 ms (the engine's create and start, the interpreter's
start); a replica that takes over one already running only pays for the hand-over. A pool
container is started like a replica's (the same lock-down and limits) with the agent
waiting in `--pool` mode, and two host directories of its own bind-mounted: its code
directory (read-only inside) and its run directory. Taking it over:

1. its `replica` file (beside those two, out of the container's reach) names the replica,
   so a worker's start-up clean-up keeps it as long as that replica lives;
2. the replica's codebase is hard-linked (copied across file systems) into its code
   directory, and `config.json` (with the service's environment) into its run directory;
3. the worker connects, and the agent imports the module as any replica's does.

A pool container is never given back: it is that replica's until it is stopped and
removed with it. What can differ between services and cannot change in a running
container (image, network, memory, cpu, pids) is its `ContainerShape`; only a replica of
the same shape takes one, and only when its environment names nothing the interpreter
reads as it starts (those must be in the process's environment from its first instant).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from worker.runtimes.base import SOCKET_NAME, ReplicaSpec, ReplicaStartError, write_config

log = logging.getLogger(__name__)

CHECK_S = 5.0  # how often the waiting containers are looked at (one engine call)
# A taken container is replaced this long after: its replica's cold start, which it served,
# does not share the cores with the start of the next one.
REFILL_DELAY_S = 1.0
FAILED_FILL_BACKOFF_S = 30.0  # after a pool container failed to start (a missing image)
MARKER_NAME = "replica"
# Environment variables the interpreter (or the C library) reads as the process starts: a
# pool container's agent started without them, so a service naming one starts its own.
_READ_AT_START = ("PYTHON", "LD_", "LC_", "LANG", "MALLOC_", "GLIBC_TUNABLES", "TZ")


@dataclass(frozen=True)
class ContainerShape:
    """What a container is created with and keeps for life: replicas of one shape can
    take each other's pool containers."""

    image: str
    network: bool
    memory_mb: int
    cpu: float
    pids_limit: int

    @classmethod
    def of(cls, spec: ReplicaSpec) -> ContainerShape:
        return cls(spec.image, spec.network, spec.memory_mb, spec.cpu, spec.pids_limit)


@dataclass
class PooledContainer:
    """One pool container: its engine id and its directory on this host."""

    id: str
    name: str
    shape: ContainerShape
    directory: Path

    @property
    def code_dir(self) -> Path:
        return self.directory / "code"

    @property
    def run_dir(self) -> Path:
        return self.directory / "run"

    def listening(self) -> bool:
        return (self.run_dir / SOCKET_NAME).exists()

    def hand_over(self, spec: ReplicaSpec, config: dict[str, Any]) -> None:
        """Makes it `spec`'s replica: marks it taken, then gives it the codebase and config."""
        (self.directory / MARKER_NAME).write_text(spec.replica_id)
        link_tree(spec.codebase_dir, self.code_dir)
        write_config(self.run_dir, config)


def taken_by(directory: Path) -> str | None:
    """The replica that took the pool container of `directory`; None while it waits."""
    try:
        return (directory / MARKER_NAME).read_text().strip() or None
    except OSError:
        return None


def starts_generic(spec: ReplicaSpec) -> bool:
    """Whether `spec` may take a container whose agent started without its environment."""
    return not any(name.startswith(_READ_AT_START) for name in spec.env)


def link_tree(source: Path, target: Path) -> None:
    """Hard links of `source`'s files under `target` (copies where links cannot be made).

    Codebases are extracted once and never changed (worker/codebases.py), so a link shares
    the file safely; directories are made readable to the container's user."""
    for directory, _, files in os.walk(source):
        into = target / os.path.relpath(directory, source)
        into.mkdir(exist_ok=True)
        into.chmod(0o755)
        for name in files:
            src = os.path.join(directory, name)
            try:
                os.link(src, into / name)
            except OSError:  # another file system, or links refused
                shutil.copy2(src, into / name)


class ContainerEngine(Protocol):
    """What the pool needs of its runtime (the docker one), named here so the two modules
    do not import each other."""

    def is_running(self, container_id: str) -> bool: ...

    def running_ids(self, container_ids: list[str]) -> set[str]: ...

    def run_pool_container(self, container: PooledContainer) -> str: ...

    def remove_container(self, container_id: str) -> None: ...


class WarmPool:
    """Keeps `targets[shape]` containers of each shape started and waiting."""

    def __init__(self, runtime: ContainerEngine, root: Path, targets: dict[ContainerShape, int]):
        self.runtime = runtime
        self.root = root
        self.targets = {shape: n for shape, n in targets.items() if n > 0}
        self.waiting: dict[ContainerShape, list[PooledContainer]] = {s: [] for s in self.targets}
        self._fill_after: dict[ContainerShape, float] = {}
        self._wake = asyncio.Event()
        self._closed = False
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Starts the pool's upkeep: the containers come in the background, one at a time."""
        self._task = asyncio.create_task(self._maintain(), name="warm pool")

    async def take(self, shape: ContainerShape) -> PooledContainer | None:
        """A waiting container of `shape` whose agent listens and which still runs, now
        taken out of the pool for good; None when there is none."""
        waiting = self.waiting.get(shape, [])
        for container in list(waiting):
            if not container.listening():  # still starting: a fresh start is no slower
                continue
            waiting.remove(container)  # before any await: no two replicas get it
            self._wake.set()  # the upkeep replaces it, REFILL_DELAY_S from now
            if await asyncio.to_thread(self.runtime.is_running, container.id):
                return container
            log.warning("pool container %s died while waiting; replacing it", container.name)
            await asyncio.to_thread(self._remove, container)
        return None

    async def close(self) -> None:
        """Removes the waiting containers; those taken belong to their replicas."""
        self._closed = True
        self._wake.set()
        if self._task is not None:
            try:  # a container being started finishes starting, then is removed too
                await asyncio.wait_for(self._task, 60)
            except (TimeoutError, asyncio.CancelledError):
                pass
        containers = [c for waiting in self.waiting.values() for c in waiting]
        for waiting in self.waiting.values():
            waiting.clear()
        await asyncio.gather(*(asyncio.to_thread(self._remove, c) for c in containers))

    async def _maintain(self) -> None:
        while not self._closed:
            try:
                await self._drop_dead()
                await self._fill()
            except Exception:
                log.exception("looking after the warm pool failed; trying again")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), CHECK_S)
            if self._wake.is_set() and not self._closed:
                self._wake.clear()
                await asyncio.sleep(REFILL_DELAY_S)

    async def _drop_dead(self) -> None:
        """Removes waiting containers that stopped (killed, or their agent died)."""
        looked_at = [c for waiting in self.waiting.values() for c in waiting]
        if not looked_at:
            return
        running = await asyncio.to_thread(self.runtime.running_ids, [c.id for c in looked_at])
        for container in looked_at:
            waiting = self.waiting[container.shape]
            if container.id not in running and container in waiting:
                log.warning("pool container %s died while waiting; replacing it", container.name)
                waiting.remove(container)
                await asyncio.to_thread(self._remove, container)

    async def _fill(self) -> None:
        for shape, target in self.targets.items():
            while not self._closed and len(self.waiting[shape]) < target:
                if time.monotonic() < self._fill_after.get(shape, 0.0):
                    break
                try:
                    container = await asyncio.to_thread(self._create, shape)
                except ReplicaStartError as exc:
                    log.warning(
                        "could not start a warm pool container (%s); trying again in %g s",
                        exc,
                        FAILED_FILL_BACKOFF_S,
                    )
                    self._fill_after[shape] = time.monotonic() + FAILED_FILL_BACKOFF_S
                    break
                if self._closed:
                    await asyncio.to_thread(self._remove, container)
                    break
                self.waiting[shape].append(container)

    def _create(self, shape: ContainerShape) -> PooledContainer:
        name = f"pool-{secrets.token_hex(6)}"
        directory = self.root / name
        container = PooledContainer(id="", name=name, shape=shape, directory=directory)
        container.code_dir.mkdir(parents=True)
        container.code_dir.chmod(0o755)
        container.run_dir.mkdir()
        try:
            container.id = self.runtime.run_pool_container(container)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        return container

    def _remove(self, container: PooledContainer) -> None:
        self.runtime.remove_container(container.id)
        shutil.rmtree(container.directory, ignore_errors=True)
