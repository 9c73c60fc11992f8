"""The process runtime: the agent as a plain subprocess of the worker. Isolates nothing."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path

from worker.runtimes.base import (
    AGENT_PATH,
    DETAIL_LINES,
    ExitInfo,
    ReplicaHandle,
    ReplicaSpec,
    Runtime,
)

log = logging.getLogger(__name__)

LOG_NAME = "agent.log"


class ProcessRuntime(Runtime):
    """Runs `python -u agent.py RUN_DIR` with the worker's interpreter, cwd = the codebase.

    For machines without a Docker engine (laptops, CI). No replica-wide memory, cpu, pids or
    network limit applies (each execution's process keeps its own memory bound, set by the
    agent), and the function runs with the worker's uid and sees its files.
    """

    name = "process"
    isolated = False

    def _code_dir(self, spec: ReplicaSpec) -> str:
        return str(spec.codebase_dir.resolve())

    async def image_for(
        self,
        own_image: str | None,
        runner_image: str,
        requirements: list[str],
        report_step: Callable[[str], Awaitable[None]],
    ) -> str:
        """No image: the agent runs on this host's Python, which must have the requirements."""
        if requirements:
            log.warning(
                "the process runtime does not install requirements (%s); they must "
                "be importable on this host",
                ", ".join(requirements),
            )
        return ""

    async def _launch(self, spec: ReplicaSpec) -> ReplicaHandle:
        log.warning(
            "replica %s runs in the process runtime: no replica memory, cpu, pids or network limit, "
            "and the function runs as the worker's user with access to its files",
            spec.replica_id,
        )
        env = {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", str(spec.run_dir)),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            "PYTHONDONTWRITEBYTECODE": "1",
            **spec.env,
        }
        command = [sys.executable, "-u", str(AGENT_PATH), str(spec.run_dir)]
        process = await asyncio.to_thread(_spawn, command, spec, env)
        return ReplicaHandle(
            replica_id=spec.replica_id,
            service_id=spec.service_id,
            runtime=self.name,
            run_dir=spec.run_dir,
            ref=str(process.pid),
            backend=process,
        )

    async def _stop(self, handle: ReplicaHandle, grace_s: float) -> None:
        process: subprocess.Popen[bytes] = handle.backend
        if process.poll() is not None:
            return
        process.terminate()  # the agent kills its executions, then exits
        try:
            await asyncio.to_thread(process.wait, grace_s)
        except subprocess.TimeoutExpired:
            # Its executions die with it (they asked the kernel for PDEATHSIG).
            os.killpg(process.pid, signal.SIGKILL)
            await asyncio.to_thread(process.wait)

    async def _exit_info(self, handle: ReplicaHandle) -> ExitInfo | None:
        process: subprocess.Popen[bytes] = handle.backend
        code = process.poll()
        if code is None:
            return None
        if code < 0:  # killed by a signal: report it the way a shell (and docker) does
            code = 128 - code
        detail = await asyncio.to_thread(_tail, handle.run_dir / LOG_NAME)
        return ExitInfo(exit_code=code, oom_killed=False, detail=detail)


def _spawn(command: list[str], spec: ReplicaSpec, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with open(spec.run_dir / LOG_NAME, "wb") as output:
        return subprocess.Popen(
            command,
            cwd=spec.codebase_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C on the worker's terminal is not for the agent
        )


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as output:
            return b"".join(deque(output, maxlen=DETAIL_LINES)).decode("utf-8", "replace")
    except OSError:
        return ""
