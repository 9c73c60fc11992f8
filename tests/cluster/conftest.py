"""The cluster suite's stack: deploy/compose.yaml brought up under a unique project name.

The images are built first (offline, cached by content: `worker/server_images.py`), then
PostgreSQL, Redis, `ferry migrate`, two API processes behind the proxy, two schedulers and
two workers run as containers on the compose project's own network; the tests drive the
API from this host through the one published port (on 127.0.0.1) and read what PostgreSQL
recorded with `psql` inside its container. Leases and heartbeats are short (the env file
below) so faults resolve in seconds. Everything is torn down at the end, replica containers
included (they carry the installation's id as their owner label).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "deploy" / "compose.yaml"
# Short on purpose: a fault is noticed after a lease, not after the production default.
LEASE_S = 3.0
SETTINGS = {
    "FERRY_LEASE_S": str(LEASE_S),
    "FERRY_HEARTBEAT_S": "1",
    "FERRY_RECONCILE_INTERVAL_S": "0.5",
    "FERRY_SHUTDOWN_GRACE_S": "10",
    "FERRY_RUNTIME": "docker",
    "FERRY_WORKER_CAPACITY": "2",  # 2 replicas a worker: the 4 of the service span both
    "FERRY_LOG_FORMAT": "text",
}

PACKAGE_YAML = """\
name: cluster
modules:
  - name: main
    entry_point: main.py
    functions:
      - name: work
        inputs:
          - {name: seconds, type: number, default: 0}
          - {name: batch, type: string, default: ""}
        outputs:
          - {name: slept, type: number}
"""

PACKAGE_MAIN = """\
import time


def work(seconds=0, batch=""):
    time.sleep(seconds)
    return seconds
"""


def _compose_command() -> list[str] | None:
    for command in (["docker", "compose"], ["docker-compose"]):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            if (
                subprocess.run([*command, "version"], capture_output=True, timeout=30).returncode
                == 0
            ):
                return command
    return None


def _skip_reason() -> str | None:
    if shutil.which("docker") is None:
        return "docker: no docker CLI on this machine"
    probe = subprocess.run(["docker", "info"], capture_output=True, timeout=60)
    if probe.returncode != 0:
        return "docker: no Docker engine answers"
    if _compose_command() is None:
        return "docker: neither `docker compose` nor `docker-compose` is installed"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Stack:
    """One compose project: run compose and docker against it, read its PostgreSQL."""

    def __init__(self, name: str, workdir: Path, port: int) -> None:
        self.name = name
        self.workdir = workdir
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.compose_cmd = _compose_command() or []
        self.env = {
            **os.environ,
            "FERRY_HOST_DATA_DIR": str(workdir / "data"),
            "FERRY_PORT": str(port),
            "FERRY_ENV_FILE": str(workdir / "ferry.env"),
        }
        self.token = ""
        self.installation = ""

    def compose(self, *args: str, timeout: float = 300, check: bool = True) -> str:
        result = subprocess.run(
            [*self.compose_cmd, "-p", self.name, "-f", str(COMPOSE_FILE), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"compose {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
            )
        return result.stdout

    def docker(self, *args: str, timeout: float = 120, check: bool = True) -> str:
        result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} failed: {result.stderr}")
        return result.stdout

    def container(self, service: str) -> str:
        found = self.compose("ps", "-q", service).split()
        assert found, f"no container for {service}"
        return found[0]

    def network(self) -> str:
        nets = json.loads(
            self.docker(
                "inspect", "-f", "{{json .NetworkSettings.Networks}}", self.container("api-1")
            )
        )
        (name,) = nets
        return str(name)

    def sql(self, query: str, timeout: float = 60) -> list[list[str]]:
        out = self.docker(
            "exec", "-i", self.container("postgres"),
            "psql", "-X", "-q", "-U", "ferry", "-d", "ferry", "-tA", "-F", "\t",
            "-v", "ON_ERROR_STOP=1", "-c", query,
            timeout=timeout,
        )  # fmt: skip
        return [line.split("\t") for line in out.splitlines() if line]

    def scalar(self, query: str) -> str:
        rows = self.sql(query)
        return rows[0][0] if rows else ""

    def worker_ids(self, service: str) -> list[str]:
        """Worker ids (hostname-pid-…) of the processes that ran as compose service `service`."""
        return [
            r[0]
            for r in self.sql(
                f"SELECT id FROM workers WHERE host = '{service}' ORDER BY started_at"
            )
        ]

    def wait_ready(self, timeout: float = 120) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                response = httpx.get(f"{self.url}/readyz", timeout=3)
                if response.status_code == 200:
                    return
                last = response.text
            time.sleep(0.5)
        raise AssertionError(
            f"Ferry at {self.url} not ready: {last}\n{self.compose('logs', '--tail', '40', check=False)}"
        )


@pytest.fixture(scope="session")
def cluster_images() -> dict[str, float]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    from worker.images import ImageBuildError
    from worker.server_images import build_all

    started = time.monotonic()
    try:
        built = build_all(progress=lambda line: None)
    except ImageBuildError as exc:
        pytest.skip(f"docker: the cluster images cannot be built here: {str(exc).splitlines()[0]}")
    seconds = time.monotonic() - started
    for item in built:
        print(f"\n{item.tag}: {'cached' if item.cached else 'built'} in {item.seconds:.0f}s")
    return {"seconds": seconds}


@pytest.fixture(scope="session")
def stack(cluster_images: dict[str, float]) -> Iterator[Stack]:
    name = f"ferrycl{uuid.uuid4().hex[:8]}"
    workdir = Path("/tmp") / name  # short: replica socket paths are limited to 107 bytes
    (workdir / "data" / "worker-1").mkdir(parents=True)
    (workdir / "data" / "worker-2").mkdir(parents=True)
    env_file = subprocess.run(
        ["python3", str(REPO / "deploy" / "make-env.py")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    env_file += "".join(f"{key}={value}\n" for key, value in SETTINGS.items())
    (workdir / "ferry.env").write_text(env_file)
    (workdir / "ferry.env").chmod(0o600)
    stack = Stack(name, workdir, _free_port())
    started = time.monotonic()
    try:
        stack.compose("up", "-d", timeout=300)
        stack.wait_ready()
        stack.token = (
            stack.compose("exec", "-T", "api-1", "ferry", "token", "create", "--name", "cluster")
            .strip()
            .splitlines()[-1]
        )
        stack.installation = stack.scalar("SELECT id FROM installation")
        print(f"\nstack {name} up in {time.monotonic() - started:.0f}s on {stack.url}")
        yield stack
    finally:
        with contextlib.suppress(Exception):
            logs = stack.compose("logs", "--no-color", "--tail", "200", check=False, timeout=60)
            (workdir / "compose.log").write_text(logs)
            if os.environ.get("FERRY_CLUSTER_KEEP_LOGS"):
                shutil.copy(workdir / "compose.log", os.environ["FERRY_CLUSTER_KEEP_LOGS"])
        stack.compose("down", "-v", "--remove-orphans", "-t", "5", check=False, timeout=300)
        if stack.installation:  # the replica containers the workers started on this engine
            ids = stack.docker(
                "ps", "-aq", "--filter", f"label=ferry.owner={stack.installation}", check=False
            ).split()
            if ids:
                stack.docker("rm", "-f", *ids, check=False)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def client(stack: Stack):  # type: ignore[no-untyped-def]
    from ferry import Client

    return Client(stack.url, stack.token, timeout=60)


@pytest.fixture(scope="session")
def service_id(client, tmp_path_factory) -> str:  # type: ignore[no-untyped-def]
    folder = tmp_path_factory.mktemp("cluster-package")
    (folder / "ferry.yaml").write_text(PACKAGE_YAML)
    (folder / "main.py").write_text(PACKAGE_MAIN)
    project = client.projects.ensure("cluster")
    package = project.packages.push(folder)
    service = package.deploy(
        "work",
        runtime={"min_replicas": 4, "max_replicas": 4, "concurrency": 8},
        max_attempts=3,
    )
    service.wait_ready(timeout=240)
    return str(service.id)
