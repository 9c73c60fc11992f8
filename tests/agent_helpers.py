"""Helpers shared by the agent and runtime tests: sample codebases and a started replica."""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worker.agent_client import AgentConnection, ExecutionOutcome
from worker.runtimes import ReplicaHandle, ReplicaSpec, Runtime

FIXTURES = Path(__file__).parent / "agent_fixtures"
RUNNER_IMAGE = "ferry/runner:py3"

# The functions of agent_fixtures/basic/main.py, as a manifest would declare them.
BASIC_FUNCTIONS: dict[str, dict[str, Any]] = {
    name: {"inputs": [], "outputs": outputs}
    for name, outputs in {
        "echo": [],
        "add": ["sum"],
        "identity": ["value"],
        "pair": ["sum", "product"],
        "bad_pair": ["a", "b"],
        "no_outputs": [],
        "not_json": [],
        "nan": [],
        "big": [],
        "report": [],
        "chatter": [],
        "long_line": [],
        "fail": [],
        "sleep": [],
        "async_add": ["sum"],
        "exit_hard": [],
        "kill_self": [],
        "segfault": [],
        "pids": [],
        "allocate": [],
        "fork_bomb": [],
        "connect": [],
        "write_file": [],
        "environment": [],
        "background": [],
        "fork_and_return": [],
        "flood": [],
        "stubborn_fork_bomb": [],
    }.items()
}

_ids = itertools.count()


def new_id(prefix: str = "ex") -> str:
    return f"{prefix}-{next(_ids)}-{time.monotonic_ns() % 10**6}"


def make_spec(run_dir: Path, codebase: str = "basic", **overrides: Any) -> ReplicaSpec:
    values: dict[str, Any] = {
        "replica_id": new_id("rep"),
        "service_id": "svc-test",
        "image": RUNNER_IMAGE,
        "codebase_dir": FIXTURES / codebase,
        "run_dir": run_dir,
        "entry_point": "main.py",
        "class_name": None,
        "init_inputs": {},
        "functions": BASIC_FUNCTIONS,
        "concurrency": 4,
        "env": {},
        "cpu": 1.0,
        "memory_mb": 256,
        "heartbeat_s": 0.2,
        "connect_timeout_s": 20.0,
    }
    values.update(overrides)
    return ReplicaSpec(**values)


@dataclass
class Replica:
    """A started replica with its connection; `call` runs one execution and collects output."""

    runtime: Runtime
    handle: ReplicaHandle
    conn: AgentConnection
    ready: dict[str, Any]
    start_to_ready_ms: float

    async def call(self, function: str, timeout_s: float | None = None, **input: Any) -> Call:
        result = Call()
        result.outcome = await self.conn.execute(
            new_id(),
            function,
            input,
            context={"attempt": 1, "service_id": self.handle.service_id},
            timeout_s=timeout_s,
            on_log=result.on_log,
            on_progress=result.on_progress,
        )
        return result

    async def wait_exit(self, timeout_s: float = 5.0):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            info = await self.runtime.exit_info(self.handle)
            if info is not None:
                return info
            await asyncio.sleep(0.02)
        raise AssertionError(f"replica {self.handle.replica_id} still runs after {timeout_s} s")

    async def close(self) -> None:
        self.conn.close()
        await self.runtime.stop(self.handle, grace_s=2.0)


@dataclass
class Call:
    outcome: ExecutionOutcome | None = None
    logs: list[tuple[str, str, float]] = field(default_factory=list)
    progress: list[tuple[float, str | None]] = field(default_factory=list)

    def on_log(self, stream: str, text: str, at: float) -> None:
        self.logs.append((stream, text, at))

    def on_progress(self, percent: float, message: str | None) -> None:
        self.progress.append((percent, message))

    def lines(self, stream: str) -> list[str]:
        return [text for s, text, _ in self.logs if s == stream]


async def start_replica(runtime: Runtime, spec: ReplicaSpec, timeout_s: float = 20.0) -> Replica:
    started = time.perf_counter()
    handle = await runtime.start(spec)
    conn = AgentConnection()
    try:
        await conn.connect(runtime.socket_path(handle), timeout_s)
        ready = await asyncio.wait_for(conn.wait_ready(), timeout_s)
    except BaseException:
        conn.close()
        await runtime.stop(handle, grace_s=0)
        raise
    elapsed_ms = (time.perf_counter() - started) * 1000
    return Replica(runtime, handle, conn, ready, elapsed_ms)
