"""Where replicas run: `docker` (isolated containers) or `process` (plain subprocesses)."""

from __future__ import annotations

import logging
from typing import Literal

from worker.runtimes.base import (
    AGENT_PATH,
    ExitInfo,
    ReplicaHandle,
    ReplicaSpec,
    ReplicaStartError,
    Runtime,
    RuntimeUnavailable,
)
from worker.runtimes.process import ProcessRuntime

log = logging.getLogger(__name__)

__all__ = [
    "AGENT_PATH",
    "ExitInfo",
    "ProcessRuntime",
    "ReplicaHandle",
    "ReplicaSpec",
    "ReplicaStartError",
    "Runtime",
    "RuntimeUnavailable",
    "detect_runtime",
]


def detect_runtime(preference: Literal["auto", "docker", "process"] = "auto") -> Runtime:
    """The runtime to use: `auto` is docker when an engine answers a ping, else process."""
    if preference == "process":
        return ProcessRuntime()
    import docker  # the SDK is only needed when an engine may be used
    import docker.errors

    from worker.runtimes.docker import DockerRuntime

    try:
        client = docker.from_env(timeout=10)
        client.ping()
    except (docker.errors.DockerException, OSError) as exc:  # requests' errors are OSErrors
        if preference == "docker":
            raise RuntimeUnavailable(f"no Docker engine answered: {exc}") from exc
        log.warning("no Docker engine answered (%s); falling back to the process runtime", exc)
        return ProcessRuntime()
    return DockerRuntime(client)
