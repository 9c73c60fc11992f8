"""The docker runtime: one locked-down container per replica, the agent as its PID 1.

The container gets the agent (read-only), the codebase (read-only) and the run directory
(read-write, holds the socket) as bind mounts; a read-only root filesystem with a tmpfs at
/tmp; a non-root user; no capabilities; memory (no swap), cpu and pids limits; and no
network at all when the service asks for none. Blocking SDK calls run in threads.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from pathlib import Path

import docker
import docker.errors

from worker.runtimes.base import (
    AGENT_PATH,
    DETAIL_LINES,
    ExitInfo,
    ReplicaHandle,
    ReplicaSpec,
    ReplicaStartError,
    Runtime,
)

log = logging.getLogger(__name__)

AGENT_IN_CONTAINER = "/ferry/agent.py"
CODE_IN_CONTAINER = "/ferry/code"
RUN_IN_CONTAINER = "/ferry/run"
LABEL_MANAGED = "ferry.managed"
LABEL_REPLICA = "ferry.replica"
LABEL_SERVICE = "ferry.service"
LABEL_OWNER = "ferry.owner"


class DockerRuntime(Runtime):
    """Replicas as containers of a local (or `DOCKER_HOST`) engine that sees this host's paths."""

    name = "docker"
    isolated = True

    def __init__(
        self,
        client: docker.DockerClient | None = None,
        user: str = "1000:1000",
        owner: str | None = None,
    ) -> None:
        """`owner` labels the containers; `cleanup_orphans` only touches its owner's."""
        self.client = client or docker.from_env()
        self.user = user
        self.owner = owner

    def _code_dir(self, spec: ReplicaSpec) -> str:
        return CODE_IN_CONTAINER

    async def _launch(self, spec: ReplicaSpec) -> ReplicaHandle:
        container_id = await asyncio.to_thread(self._create_and_start, spec)
        return ReplicaHandle(
            replica_id=spec.replica_id,
            service_id=spec.service_id,
            runtime=self.name,
            run_dir=spec.run_dir,
            ref=container_id,
        )

    def _create_and_start(self, spec: ReplicaSpec) -> str:
        self._give_run_dir_to_user(spec.run_dir)
        api = self.client.api
        host_config = api.create_host_config(
            binds={
                str(AGENT_PATH): {"bind": AGENT_IN_CONTAINER, "mode": "ro"},
                str(spec.codebase_dir.resolve()): {"bind": CODE_IN_CONTAINER, "mode": "ro"},
                str(spec.run_dir.resolve()): {"bind": RUN_IN_CONTAINER, "mode": "rw"},
            },
            mem_limit=f"{spec.memory_mb}m",
            memswap_limit=f"{spec.memory_mb}m",  # equal to the memory limit: no swap
            nano_cpus=int(spec.cpu * 1e9) if spec.cpu > 0 else None,
            pids_limit=spec.pids_limit,
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            network_mode=None if spec.network else "none",
            read_only=True,
            tmpfs={"/tmp": f"rw,nosuid,nodev,size={spec.memory_mb}m"},
            auto_remove=False,  # its exit code and OOMKilled are read before removal
        )
        env = {
            "HOME": "/tmp",
            "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1",
            **spec.env,
        }
        try:
            created = api.create_container(
                image=spec.image,
                command=["python3", "-u", AGENT_IN_CONTAINER, RUN_IN_CONTAINER],
                name=f"ferry-{spec.replica_id}",
                user=self.user,
                working_dir=CODE_IN_CONTAINER,
                environment=env,
                labels=self._labels(spec),
                host_config=host_config,
            )
        except docker.errors.ImageNotFound as exc:
            raise ReplicaStartError(
                f"image {spec.image} is not on this Docker engine (Ferry never pulls at "
                "replica start: build or pull it first)"
            ) from exc
        except docker.errors.APIError as exc:
            raise ReplicaStartError(f"could not create the container: {exc.explanation}") from exc
        try:
            api.start(created["Id"])
        except docker.errors.APIError as exc:
            self._remove(created["Id"])
            raise ReplicaStartError(f"could not start the container: {exc.explanation}") from exc
        return created["Id"]

    def _labels(self, spec: ReplicaSpec) -> dict[str, str]:
        labels = {
            LABEL_MANAGED: "1",
            LABEL_REPLICA: spec.replica_id,
            LABEL_SERVICE: spec.service_id,
        }
        if self.owner is not None:
            labels[LABEL_OWNER] = self.owner
        return labels

    def _give_run_dir_to_user(self, run_dir: Path) -> None:
        # The agent (the container's user) creates its socket there.
        uid, _, gid = self.user.partition(":")
        try:
            os.chown(run_dir, int(uid), int(gid or uid))
        except (PermissionError, ValueError):  # not root, or a user name: open it up instead
            os.chmod(run_dir, 0o777)

    async def _stop(self, handle: ReplicaHandle, grace_s: float) -> None:
        await asyncio.to_thread(self._stop_and_remove, handle.ref, grace_s)

    def _stop_and_remove(self, container_id: str, grace_s: float) -> None:
        try:
            # SIGTERM: the agent kills its executions and exits; SIGKILL after the grace.
            self.client.api.stop(container_id, timeout=math.ceil(grace_s))
        except docker.errors.NotFound:
            return
        except docker.errors.APIError as exc:
            log.warning("stopping container %s failed (%s); removing it", container_id, exc)
        self._remove(container_id)

    def _remove(self, container_id: str) -> None:
        try:
            self.client.api.remove_container(container_id, force=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            if exc.status_code != 409:  # 409: a removal is already in progress
                raise

    async def _exit_info(self, handle: ReplicaHandle) -> ExitInfo | None:
        return await asyncio.to_thread(self._read_exit_info, handle.ref)

    def _read_exit_info(self, container_id: str) -> ExitInfo | None:
        api = self.client.api
        try:
            state = api.inspect_container(container_id)["State"]
            if state.get("Running"):
                return None
            logs = api.logs(container_id, stdout=True, stderr=True, tail=DETAIL_LINES)
        except docker.errors.NotFound:
            return ExitInfo(exit_code=None, oom_killed=False, detail="the container is gone")
        detail = logs.decode("utf-8", "replace")
        if state.get("Error"):
            detail += f"\n[docker] {state['Error']}"
        return ExitInfo(
            exit_code=state.get("ExitCode"),
            oom_killed=bool(state.get("OOMKilled")),
            detail=detail,
        )

    async def cleanup_orphans(self, keep: set[str]) -> list[str]:
        """Removes this owner's Ferry containers whose replica id is not in keep.

        A runtime without an owner only touches containers without an owner label; such
        workers sharing one engine must pass every live replica id, not only their own.
        """
        return await asyncio.to_thread(self._cleanup_orphans, keep)

    def _cleanup_orphans(self, keep: set[str]) -> list[str]:
        removed = []
        filters = {"label": [f"{LABEL_MANAGED}=1"]}
        if self.owner is not None:
            filters["label"].append(f"{LABEL_OWNER}={self.owner}")
        for container in self.client.api.containers(all=True, filters=filters):
            labels = container.get("Labels") or {}
            if labels.get(LABEL_OWNER) != self.owner:  # without an owner: unowned ones only
                continue
            replica_id = labels.get(LABEL_REPLICA, "")
            if replica_id not in keep:
                self._remove(container["Id"])
                removed.append(replica_id)
        if removed:
            log.info("removed %d orphaned replica container(s): %s", len(removed), removed)
        return removed

    async def close(self) -> None:
        await asyncio.to_thread(self.client.close)
