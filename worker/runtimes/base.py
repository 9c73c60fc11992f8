"""What every runtime does the same way; backends (docker, process, later kubernetes) add hooks.

A runtime starts a replica's agent with a run directory holding `config.json` (written
here) and, once the agent listens, `agent.sock`. It does not wait for the agent to be
ready: the worker connects to `socket_path(handle)` and waits for the ready frame.
"""

from __future__ import annotations

import json
import logging
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

log = logging.getLogger(__name__)

AGENT_PATH = Path(__file__).resolve().parent.parent / "agent.py"
SOCKET_NAME = "agent.sock"
CONFIG_NAME = "config.json"
DETAIL_LINES = 50
# Each execution's process may use its replica's memory less this reserve, which is the
# agent's and its siblings' (and, in a container, the page cache's): a function that
# allocates too much fails alone (`oom`) before the replica as a whole runs out and the
# kernel kills whatever it picks. A quarter of the replica, at least 64 MB.
EXECUTION_MEMORY_RESERVE_MB = 64
MIN_EXECUTION_MEMORY_MB = 24  # a forked Python needs about this much to report an error


def execution_memory_mb(memory_mb: int) -> int:
    """The memory bound of one execution's process in a replica of `memory_mb`."""
    reserve = max(EXECUTION_MEMORY_RESERVE_MB, memory_mb // 4)
    return max(MIN_EXECUTION_MEMORY_MB, memory_mb - reserve)


def write_config(run_dir: Path, config: dict[str, Any]) -> None:
    """Writes `config.json` whole (an agent never reads half of it)."""
    tmp = run_dir / f".{CONFIG_NAME}.tmp"
    tmp.write_text(json.dumps(config))
    os.chmod(tmp, 0o644)  # the container's user reads it
    tmp.replace(run_dir / CONFIG_NAME)


class RuntimeUnavailable(Exception):
    """The runtime asked for cannot be used on this host (e.g. no Docker engine answers)."""


class ReplicaStartError(Exception):
    """The backend refused to launch a replica (missing image, bad mount, name clash, ...)."""


@dataclass
class ReplicaSpec:
    """Everything needed to launch one replica of a service."""

    replica_id: str
    service_id: str
    image: str  # ignored by the process runtime
    codebase_dir: Path  # extracted codebase on this host; the agent imports from it
    run_dir: Path  # host dir for config.json and agent.sock
    entry_point: str
    class_name: str | None
    init_inputs: dict[str, Any]
    functions: dict[str, dict[str, Any]]  # {"name": {"inputs": [...], "outputs": [...]}}
    concurrency: int
    env: dict[str, str]
    cpu: float
    memory_mb: int
    pids_limit: int = 256
    network: bool = True
    executions_per_process: int = 1  # 1: a fresh process per execution
    heartbeat_s: float = 3.0  # the worker calls an agent silent for 10 s hung
    connect_timeout_s: float = 60.0  # the agent exits if no worker connects within this


@dataclass
class ReplicaHandle:
    """A launched replica. `ref` is the backend's name for it (container id, pid, pod)."""

    replica_id: str
    service_id: str
    runtime: str
    run_dir: Path
    ref: str
    started_at: float = field(default_factory=time.time)
    stopped: bool = False
    warm: bool = False  # taken over from a warm pool: started before the replica was
    backend: Any = field(default=None, repr=False)  # backend-private state


@dataclass
class ExitInfo:
    """How a replica's agent ended; `detail` is the tail of its own output."""

    exit_code: int | None
    oom_killed: bool
    detail: str


class Runtime(ABC):
    """Launches and stops replicas. Backends implement the underscored hooks below."""

    name: ClassVar[str]
    isolated: ClassVar[bool]  # False: the function can touch this host

    async def start(self, spec: ReplicaSpec) -> ReplicaHandle:
        """Writes the agent's config and launches it; returns before the agent is ready."""
        config = self.agent_config(spec)
        handle = await self._take_warm(spec, config)
        if handle is not None:
            return handle
        spec.run_dir.mkdir(parents=True, exist_ok=True)
        (spec.run_dir / SOCKET_NAME).unlink(missing_ok=True)
        write_config(spec.run_dir, config)
        return await self._launch(spec)

    def agent_config(self, spec: ReplicaSpec) -> dict[str, Any]:
        """What the agent reads from `config.json` (see worker/agent.py)."""
        return {
            "code_dir": self._code_dir(spec),
            "entry_point": spec.entry_point,
            "class_name": spec.class_name,
            "init_inputs": spec.init_inputs,
            "functions": spec.functions,
            "concurrency": spec.concurrency,
            "replica_id": spec.replica_id,
            "service_id": spec.service_id,
            "heartbeat_s": spec.heartbeat_s,
            "execution_memory_mb": execution_memory_mb(spec.memory_mb),
            "connect_timeout_s": spec.connect_timeout_s,
            "executions_per_process": spec.executions_per_process,
            # Also in the process's environment when it starts; an agent started ahead of
            # its service (a warm pool's) only gets it from here.
            "env": spec.env,
        }

    async def start_warm_pool(self, size: int, runner_image: str, root: Path) -> None:  # noqa: B027
        """Pre-starts `size` generic replicas for new ones to take over; most runtimes have none."""

    async def _take_warm(self, spec: ReplicaSpec, config: dict[str, Any]) -> ReplicaHandle | None:
        """A pre-started replica handed `spec`'s codebase and `config`, or None to launch one."""
        return None

    async def stop(self, handle: ReplicaHandle, grace_s: float = 5.0) -> None:
        """Stops the replica (SIGTERM, SIGKILL after grace_s) and releases it; idempotent."""
        if handle.stopped:
            return
        handle.stopped = True
        await self._stop(handle, grace_s)

    async def exit_info(self, handle: ReplicaHandle) -> ExitInfo | None:
        """None while the agent runs; how it ended otherwise."""
        return await self._exit_info(handle)

    def socket_path(self, handle: ReplicaHandle) -> Path:
        return handle.run_dir / SOCKET_NAME

    async def cleanup_orphans(self, keep: set[str]) -> list[str]:
        """Removes replicas this runtime left behind (ids not in keep); returns their ids."""
        return []

    async def close(self) -> None:  # noqa: B027 - optional for backends
        """Releases the runtime's own resources (engine clients); replicas are left alone."""

    async def prepare(self, installation_id: str, data_dir: Path) -> None:  # noqa: B027
        """Called once as the worker starts, before `cleanup_orphans`.

        `installation_id` names this Ferry among others that may share an engine;
        `data_dir` is the worker's data directory."""

    @abstractmethod
    async def image_for(
        self,
        own_image: str | None,
        runner_image: str,
        requirements: list[str],
        report_step: Callable[[str], Awaitable[None]],
    ) -> str:
        """The image a replica of a service runs (`ReplicaSpec.image`): the service's own
        image or else `runner_image`, with the package's `requirements` installed.
        `report_step` tells the replica's viewers about a slow step (an image build)."""

    @abstractmethod
    def _code_dir(self, spec: ReplicaSpec) -> str:
        """Where the agent sees the codebase."""

    @abstractmethod
    async def _launch(self, spec: ReplicaSpec) -> ReplicaHandle: ...

    @abstractmethod
    async def _stop(self, handle: ReplicaHandle, grace_s: float) -> None: ...

    @abstractmethod
    async def _exit_info(self, handle: ReplicaHandle) -> ExitInfo | None: ...
