"""The docker runtime: one locked-down container per replica, the agent as its PID 1.

The container gets the agent (read-only), the codebase (read-only) and the run directory
(read-write, holds the socket) as bind mounts; a read-only root filesystem with a tmpfs at
/tmp; a non-root user; no capabilities; memory (no swap), cpu and pids limits; and no
network at all when the service asks for none. Blocking SDK calls run in threads.

With a warm pool (`start_warm_pool`, worker/runtimes/pool.py) a new replica takes over a
container started ahead, when one of its shape waits, instead of starting its own.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import docker
import docker.errors

from worker import images
from worker.runtimes.base import (
    AGENT_PATH,
    DETAIL_LINES,
    ExitInfo,
    ReplicaHandle,
    ReplicaSpec,
    ReplicaStartError,
    Runtime,
)
from worker.runtimes.pool import ContainerShape, PooledContainer, WarmPool, starts_generic, taken_by

log = logging.getLogger(__name__)

AGENT_IN_CONTAINER = "/ferry/agent.py"
CODE_IN_CONTAINER = "/ferry/code"
RUN_IN_CONTAINER = "/ferry/run"
LABEL_MANAGED = "ferry.managed"
LABEL_REPLICA = "ferry.replica"
LABEL_SERVICE = "ferry.service"
LABEL_OWNER = "ferry.owner"
LABEL_POOL = "ferry.pool"
LABEL_POOL_DIR = "ferry.pool-dir"  # its directory on the worker's host (pool.py)


def publish_agent(data_dir: Path) -> Path:
    """A copy of the agent under `data_dir`, named by its content; returns its path.

    Replica containers bind-mount the agent from a path the Docker engine's host must have.
    The data directory is such a path even when the worker itself runs in a container (it is
    mounted at the same path inside and outside); the installed package is not.
    """
    data = AGENT_PATH.read_bytes()
    directory = data_dir / "agent"
    target = directory / f"agent-{hashlib.sha256(data).hexdigest()[:12]}.py"
    if target.exists() and target.read_bytes() == data:
        return target
    directory.mkdir(parents=True, exist_ok=True)
    partial = directory / f".{target.name}.{os.getpid()}"
    partial.write_bytes(data)
    partial.chmod(0o644)
    os.replace(partial, target)  # atomic: workers sharing the directory never see half a file
    return target


class DockerRuntime(Runtime):
    """Replicas as containers of a local (or `DOCKER_HOST`) engine that sees this host's paths."""

    name = "docker"
    isolated = True
    _build_client: docker.DockerClient | None = None  # made on the first image_for

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
        # The engine resolves bind-mount sources on its own host: a worker that runs in a
        # container sets this to a copy in its data directory (`publish_agent`).
        self.agent_path = AGENT_PATH
        self.pool: WarmPool | None = None

    def _code_dir(self, spec: ReplicaSpec) -> str:
        return CODE_IN_CONTAINER

    async def start_warm_pool(self, size: int, runner_image: str, root: Path) -> None:
        """Keeps `size` containers of a new service's default shape waiting (0: none)."""
        from core.service_spec import Runtime as ServiceRuntime

        if size <= 0 or self.pool is not None:
            return
        default = ServiceRuntime()
        shape = ContainerShape(
            image=runner_image,
            network=default.network,
            memory_mb=default.memory_mb,
            cpu=default.cpu,
            pids_limit=default.pids_limit,
        )
        self.pool = WarmPool(self, root, {shape: size})
        await self.pool.start()

    async def _take_warm(self, spec: ReplicaSpec, config: dict[str, Any]) -> ReplicaHandle | None:
        if self.pool is None or not starts_generic(spec):
            return None
        container = await self.pool.take(ContainerShape.of(spec))
        if container is None:
            return None
        try:
            await asyncio.to_thread(container.hand_over, spec, config)
        except OSError as exc:
            log.warning("could not hand pool container %s over (%s)", container.name, exc)
            await self._stop_pooled(container, grace_s=0)
            return None
        return ReplicaHandle(
            replica_id=spec.replica_id,
            service_id=spec.service_id,
            runtime=self.name,
            run_dir=container.run_dir,
            ref=container.id,
            warm=True,
            backend=container,
        )

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
        return self._run_container(
            name=f"ferry-{spec.replica_id}",
            shape=ContainerShape.of(spec),
            code_dir=spec.codebase_dir,
            run_dir=spec.run_dir,
            env=spec.env,
            labels=self._labels(spec),
        )

    def run_pool_container(self, container: PooledContainer) -> str:
        """Starts a pool container (its agent waiting to be taken over); returns its id."""
        self._give_run_dir_to_user(container.run_dir)
        labels = {
            LABEL_MANAGED: "1",
            LABEL_POOL: "1",
            LABEL_POOL_DIR: str(container.directory.resolve()),
            LABEL_REPLICA: container.name,  # until taken: then its `replica` file says
        }
        if self.owner is not None:
            labels[LABEL_OWNER] = self.owner
        return self._run_container(
            name=f"ferry-{container.name}",
            shape=container.shape,
            code_dir=container.code_dir,
            run_dir=container.run_dir,
            env={},
            labels=labels,
            pooled=True,
        )

    def _run_container(
        self,
        *,
        name: str,
        shape: ContainerShape,
        code_dir: Path,
        run_dir: Path,
        env: dict[str, str],
        labels: dict[str, str],
        pooled: bool = False,
    ) -> str:
        api = self.client.api
        host_config = api.create_host_config(
            binds={
                str(self.agent_path): {"bind": AGENT_IN_CONTAINER, "mode": "ro"},
                str(code_dir.resolve()): {"bind": CODE_IN_CONTAINER, "mode": "ro"},
                str(run_dir.resolve()): {"bind": RUN_IN_CONTAINER, "mode": "rw"},
            },
            mem_limit=f"{shape.memory_mb}m",
            memswap_limit=f"{shape.memory_mb}m",  # equal to the memory limit: no swap
            nano_cpus=int(shape.cpu * 1e9) if shape.cpu > 0 else None,
            pids_limit=shape.pids_limit,
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            network_mode=None if shape.network else "none",
            read_only=True,
            tmpfs={"/tmp": f"rw,nosuid,nodev,size={shape.memory_mb}m"},
            auto_remove=False,  # its exit code and OOMKilled are read before removal
        )
        command = ["python3", "-u", AGENT_IN_CONTAINER, RUN_IN_CONTAINER]
        try:
            created = api.create_container(
                image=shape.image,
                command=[*command, "--pool"] if pooled else command,
                name=name,
                user=self.user,
                working_dir=CODE_IN_CONTAINER,
                environment={
                    "HOME": "/tmp",
                    "LANG": "C.UTF-8",
                    "PYTHONDONTWRITEBYTECODE": "1",
                    **env,
                },
                labels=labels,
                host_config=host_config,
            )
        except docker.errors.ImageNotFound as exc:
            raise ReplicaStartError(
                f"image {shape.image} is not on this Docker engine (Ferry never pulls at "
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

    def is_running(self, container_id: str) -> bool:
        try:
            return bool(self.client.api.inspect_container(container_id)["State"].get("Running"))
        except docker.errors.NotFound:
            return False

    def running_ids(self, container_ids: list[str]) -> set[str]:
        """Those of `container_ids` that run, in one call to the engine."""
        running = self.client.api.containers(filters={"id": container_ids})
        return {c["Id"] for c in running}

    def remove_container(self, container_id: str) -> None:
        """Removes a container at once (SIGKILL), running or not."""
        self._remove(container_id)

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
        if isinstance(handle.backend, PooledContainer):
            await self._stop_pooled(handle.backend, grace_s)
        else:
            await asyncio.to_thread(self._stop_and_remove, handle.ref, grace_s)

    async def _stop_pooled(self, container: PooledContainer, grace_s: float) -> None:
        await asyncio.to_thread(self._stop_and_remove, container.id, grace_s)
        # Its codebase links and run directory go with it (nothing else will use them).
        await asyncio.to_thread(shutil.rmtree, container.directory, True)

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

    async def prepare(self, installation_id: str, data_dir: Path) -> None:
        # Containers are labelled with this installation's id, so clean-up never touches
        # another Ferry's containers on a shared engine.
        self.owner = installation_id
        self.agent_path = await asyncio.to_thread(publish_agent, data_dir)

    async def image_for(
        self,
        own_image: str | None,
        runner_image: str,
        requirements: list[str],
        report_step: Callable[[str], Awaitable[None]],
    ) -> str:
        """The service's own image or the runner image (built on first need), layered with
        the package's requirements when it has any."""
        if self._build_client is None:
            # Its own client: a build streams for minutes, past the engine ping's timeout.
            self._build_client = docker.from_env()
        client = self._build_client
        base = own_image or runner_image
        if not own_image and not await asyncio.to_thread(images.runner_image_exists, client, base):
            log.warning(
                "runner image %s is missing: building it now (about a minute; "
                "`ferry image build` does this ahead of time)",
                base,
            )
            await report_step(f"building the runner image {base}")
            await asyncio.to_thread(
                images.ensure_runner_image,
                client,
                base,
                lambda line: log.info("runner image: %s", line),
            )
        if not requirements:
            return base
        # On the service's own image as on the runner image: a function never runs without
        # the requirements its package declares.
        await report_step(f"installing requirements on {base}")
        try:
            return await asyncio.to_thread(
                images.ensure_revision_image,
                client,
                base,
                requirements,
                lambda line: log.info("revision image: %s", line),
            )
        except images.ImageBuildError as exc:
            if any("No module named pip" in line for line in exc.output):
                raise images.ImageBuildError(
                    f"image {base} has no pip (`python3 -m pip` fails), so the package's "
                    "requirements cannot be installed on it: add pip to the image, or install "
                    "the requirements in it and drop them from the package"
                ) from None
            raise

    async def cleanup_orphans(self, keep: set[str]) -> list[str]:
        """Removes this owner's Ferry containers whose replica id is not in keep.

        A warm pool container counts as the replica that took it (its `replica` file), and
        one still waiting as no replica: it goes.

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
            pool_dir = Path(labels[LABEL_POOL_DIR]) if labels.get(LABEL_POOL) == "1" else None
            if pool_dir is not None:  # a pool container: its replica, if it was taken
                if not pool_dir.is_dir():
                    continue  # a worker's whose files this one cannot see: not to judge here
                replica_id = taken_by(pool_dir) or replica_id
            if replica_id not in keep:
                self._remove(container["Id"])
                if pool_dir is not None:
                    shutil.rmtree(pool_dir, ignore_errors=True)
                removed.append(replica_id)
        if removed:
            log.info("removed %d orphaned replica container(s): %s", len(removed), removed)
        return removed

    async def close(self) -> None:
        """Removes the warm pool's waiting containers too (those taken are replicas)."""
        if self.pool is not None:
            await self.pool.close()
            self.pool = None
        await asyncio.to_thread(self.client.close)
