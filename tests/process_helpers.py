"""Ferry's own programs as subprocesses (`python -m ferry worker|scheduler`), each in its
own session so that its whole process group can be killed like a host dying."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LEASE_S = 3.0
HEARTBEAT_S = 0.5


class WorkerProcess:
    """`python -m ferry worker` (or another command) in its own session."""

    def __init__(
        self,
        settings,
        log_dir: Path,
        name: str,
        command: str = "worker",
        *,
        lease_s: float | None = LEASE_S,
        heartbeat_s: float | None = HEARTBEAT_S,
        env: dict[str, str] | None = None,
    ) -> None:
        """`lease_s` / `heartbeat_s` None: Ferry's defaults (15 s / 3 s)."""
        self.command = command
        self.id = f"{name}-{uuid.uuid4().hex[:6]}"
        self.log_path = log_dir / f"{self.id}.log"
        self.env = {
            **os.environ,
            "FERRY_DATABASE_URL": settings.database_url,
            "FERRY_REDIS_URL": settings.redis_url,
            "FERRY_DATA_DIR": str(settings.data_dir),
            "FERRY_SECRET_KEY": settings.secret_key,
            "FERRY_RUNTIME": "process",
            "FERRY_WORKER_ID": self.id,
            "FERRY_METRICS_PORT_WORKER": "0",
            "FERRY_METRICS_PORT_SCHEDULER": "0",
            "FERRY_LOG_FORMAT": "text",
            **(env or {}),
        }
        for key in ("FERRY_LEASE_S", "FERRY_HEARTBEAT_S"):
            self.env.pop(key, None)
        if lease_s is not None:
            self.env["FERRY_LEASE_S"] = str(lease_s)
        if heartbeat_s is not None:
            self.env["FERRY_HEARTBEAT_S"] = str(heartbeat_s)
        self.env.update(env or {})
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "ferry", self.command],
                cwd=REPO,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    async def wait_up(self, pool, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while not await pool.fetchval("SELECT 1 FROM workers WHERE id = $1", self.id):
            assert self.process is not None and self.process.poll() is None, self.output()
            assert time.monotonic() < deadline, f"worker {self.id} did not come up\n{self.output()}"
            await asyncio.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL the worker's process group: the host died, nothing cleans up."""
        assert self.process is not None
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def terminate(self) -> None:
        """SIGTERM, as a service manager stopping the worker; `wait_exit` waits for it."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGTERM)

    async def wait_exit(self, timeout_s: float = 30) -> int:
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while (code := self.process.poll()) is None:
            assert time.monotonic() < deadline, f"{self.id} did not exit\n{self.output()}"
            await asyncio.sleep(0.05)
        return code

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""


@pytest.fixture
def workers(settings, tmp_path):
    """Start workers with `workers("a")` (a scheduler with `workers("s", "scheduler")`; `env`
    adds FERRY_ settings); every one is stopped (or killed) at the end."""
    started: list[WorkerProcess] = []

    def start(name: str, command: str = "worker", **kwargs) -> WorkerProcess:
        worker = WorkerProcess(settings, tmp_path, name, command, **kwargs).start()
        started.append(worker)
        return worker

    yield start
    for worker in started:
        try:
            worker.stop()
        finally:
            if worker.process is not None and worker.process.poll() is None:
                os.killpg(worker.process.pid, signal.SIGKILL)
