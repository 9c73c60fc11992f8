"""A throw-away Ferry for the benchmark: embedded PostgreSQL + Redis in a temp dir, then the
API, one worker and one scheduler as separate processes, exactly as `ferry api|worker|
scheduler` run them. Everything listens on 127.0.0.1 or unix sockets; `stop()` tears it
all down (processes, leftover replica containers, the servers, the directory)."""

from __future__ import annotations

import asyncio
import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.cpu import CpuMeter

REPO = Path(__file__).resolve().parent.parent
ROLES = ("api", "scheduler", "worker")


def _private_runtime_dir() -> None:
    """Give this process an XDG_RUNTIME_DIR of its own, removed when it exits.

    pgserver keeps a lock file there and touches it again from an atexit handler; left to
    core.embedded, that dir would sit inside the temp dir `stop()` removes, and be created
    anew at exit. Registered before pgserver is imported, this handler runs after its own.
    """
    if os.environ.get("XDG_RUNTIME_DIR"):
        return
    path = tempfile.mkdtemp(prefix="ferry-bx-")  # mode 0700
    os.environ["XDG_RUNTIME_DIR"] = path
    atexit.register(shutil.rmtree, path, True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no output)"


@dataclass
class Child:
    role: str
    process: subprocess.Popen[bytes]
    log_path: Path


@dataclass
class FerryStack:
    runtime: str  # docker | process
    worker_capacity: int = 16
    keep_dir: bool = False
    api_workers: int = 1  # `ferry api --workers N`
    dir: Path | None = None
    dsn: str = ""
    redis_url: str = ""
    url: str = ""
    token: str = ""
    owner: str = ""
    env: dict[str, str] = field(default_factory=dict)
    children: list[Child] = field(default_factory=list)
    _embedded: object | None = None

    # -- start ---------------------------------------------------------------------------------

    def start(self, ready_timeout_s: float = 90.0) -> None:
        from cryptography.fernet import Fernet

        from core.embedded import EmbeddedStack

        _private_runtime_dir()
        # Short: replica sockets live under it and unix socket paths are capped at 107 bytes.
        self.dir = Path(tempfile.mkdtemp(prefix="ferry-b-"))
        data_dir = self.dir / "data"
        data_dir.mkdir(mode=0o700)
        stack = EmbeddedStack(data_dir)
        self._embedded = stack
        self.dsn, self.redis_url = stack.start(None, None)
        self.token, self.owner = asyncio.run(_bootstrap(self.dsn))
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("FERRY_")},
            "FERRY_DATABASE_URL": self.dsn,
            "FERRY_REDIS_URL": self.redis_url,
            "FERRY_DATA_DIR": str(data_dir),
            "FERRY_API_HOST": "127.0.0.1",
            "FERRY_API_PORT": str(port),
            "FERRY_SECRET_KEY": Fernet.generate_key().decode(),
            "FERRY_RUNTIME": self.runtime,
            "FERRY_LOG_LEVEL": "warning",
            "FERRY_LOG_FORMAT": "text",
            "FERRY_WORKER_CAPACITY": str(self.worker_capacity),
            # No fixed metrics ports: another Ferry on this machine may hold them.
            "FERRY_METRICS_PORT_WORKER": "0",
            "FERRY_METRICS_PORT_SCHEDULER": "0",
            "XDG_CONFIG_HOME": str(self.dir / "config"),
            "PYTHONUNBUFFERED": "1",
        }
        for role in ROLES:
            self.children.append(self._spawn(role))
        self._wait_ready(ready_timeout_s)

    def add(self, role: str) -> Child:
        """One more process of `role` (a second scheduler, say), stopped with the rest."""
        child = self._spawn(role, f"{role}-{sum(c.role == role for c in self.children) + 1}")
        self.children.append(child)
        return child

    def pids(self, role: str) -> list[int]:
        return [c.process.pid for c in self.children if c.role == role]

    def _spawn(self, role: str, name: str | None = None) -> Child:
        assert self.dir is not None
        command = [sys.executable, "-m", "ferry", role]
        if role == "api" and self.api_workers > 1:
            command += ["--workers", str(self.api_workers)]
        log_path = self.dir / f"{name or role}.log"
        with open(log_path, "wb") as out:
            process = subprocess.Popen(
                command,
                env=self.env,
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return Child(role, process, log_path)

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for child in self.children:
                if child.process.poll() is not None:
                    raise RuntimeError(
                        f"ferry {child.role} exited with {child.process.returncode}:\n"
                        f"{tail(child.log_path)}"
                    )
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the Ferry API did not become ready in {timeout_s:g} s")

    def check_alive(self) -> None:
        for child in self.children:
            if child.process.poll() is not None:
                raise RuntimeError(
                    f"ferry {child.role} died (exit {child.process.returncode}):\n"
                    f"{tail(child.log_path)}"
                )

    def pid(self, role: str) -> int:
        return next(c.process.pid for c in self.children if c.role == role)

    def cpu_meter(self) -> CpuMeter:
        """Charges CPU to api, worker, scheduler, agents, postgres and redis."""
        roots = {c.process.pid: c.role for c in self.children}
        embedded = self._embedded
        redis = getattr(embedded, "redis", None)
        if redis is not None and redis._process is not None:
            roots[redis._process.pid] = "redis"
        postgres = getattr(embedded, "postgres", None)
        if postgres is not None:
            pid_file = postgres.data_dir / "postmaster.pid"
            try:
                roots[int(pid_file.read_text().split()[0])] = "postgres"
            except (OSError, ValueError, IndexError):
                pass
        return CpuMeter(roots, self.owner if self.runtime == "docker" else None)

    # -- stop ----------------------------------------------------------------------------------

    def stop(self) -> None:
        replica_ids = self._replica_ids()
        # The worker first: it drains and stops its replicas.
        order = sorted(self.children, key=lambda c: c.role != "worker")
        for child in order:
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        for child in order:
            try:
                child.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait(10)
        self.children.clear()
        if self.runtime == "docker":
            self._remove_containers(replica_ids)
        if self._embedded is not None:
            self._embedded.stop()  # type: ignore[attr-defined]
            self._embedded = None
        if self.dir is not None and not self.keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _replica_ids(self) -> list[str]:
        if not self.dsn:
            return []

        async def fetch() -> list[str]:
            import asyncpg

            conn = await asyncpg.connect(self.dsn, timeout=5)
            try:
                return [r["id"] for r in await conn.fetch("SELECT id FROM replicas")]
            finally:
                await conn.close()

        try:
            return asyncio.run(asyncio.wait_for(fetch(), 10))
        except Exception:
            return []

    def _remove_containers(self, replica_ids: list[str]) -> None:
        """Containers of this run's replicas that the worker did not remove (it was killed)."""
        names = [f"ferry-{rid}" for rid in replica_ids]
        if not names:
            return
        found = subprocess.run(
            ["docker", "ps", "-aq", *[arg for n in names for arg in ("--filter", f"name=^{n}$")]],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout.split()
        if found:
            subprocess.run(
                ["docker", "rm", "-f", *found], capture_output=True, timeout=60, check=False
            )


async def _bootstrap(dsn: str) -> tuple[str, str]:
    """Migrate and create an admin token; returns its secret and the installation id (the
    owner label of this Ferry's replica containers)."""
    from core import auth, db

    conn = await db.connect(dsn)
    try:
        await db.migrate(conn)
        created = await auth.create_token(
            conn, auth.TokenCreate(name="bench admin", role=auth.Role.admin), by=None
        )
        return created.token, await conn.fetchval("SELECT id FROM installation")
    finally:
        await conn.close()
