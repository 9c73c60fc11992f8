"""The worker's side of the agent protocol: one `AgentConnection` per replica.

Frames are a 4-byte big-endian length then UTF-8 JSON (docs/agent.md). One reader task
demultiplexes the agent's frames by execution id; `execute` awaits the final frame of its
execution, calling `on_log` / `on_progress` on the way, in the order the agent sent them.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

HEADER = struct.Struct(">I")
MAX_FRAME = 64 * 1024 * 1024
MAX_SOCKET_PATH = 107  # sun_path is 108 bytes with the terminating NUL

# Error types for a child that died without returning, or could not be started.
STATUS_BY_ERROR_TYPE = {
    "OutOfMemory": "oom",
    "Crashed": "crashed",
    "ForkFailed": "crashed",
    "AgentLost": "crashed",
}

# Why the agent stopped an execution (a `stopped` frame's reason) -> outcome status.
_STOPPED_STATUS = {"timeout": "timeout", "shutdown": "shutdown", "terminated": "terminated"}

LogCallback = Callable[[str, str, float], Awaitable[None] | None]
ProgressCallback = Callable[[float, str | None], Awaitable[None] | None]


class AgentError(Exception):
    """Base of the errors raised by `AgentConnection`."""


class AgentStartError(AgentError):
    """The agent's socket did not accept a connection in time."""


class AgentInitError(AgentError):
    """The agent could not load the module (or died before it was ready)."""

    def __init__(self, error: dict[str, Any]) -> None:
        self.error = error
        super().__init__(f"{error.get('type')}: {error.get('message')}")


@dataclass
class ExecutionOutcome:
    """How an execution ended: `status` is success, failed, terminated, timeout, crashed, oom,
    or shutdown (the agent stopped it because the replica is going away: hand it back)."""

    status: str
    output: Any = None
    error: dict[str, Any] | None = None
    duration_ms: float | None = None

    @classmethod
    def from_frame(cls, frame: dict[str, Any]) -> ExecutionOutcome:
        duration_ms = frame.get("duration_ms")
        if frame["type"] == "result":
            return cls("success", output=frame.get("output"), duration_ms=duration_ms)
        if frame["type"] == "stopped":
            status = _STOPPED_STATUS.get(frame.get("reason"), "terminated")
            return cls(status, duration_ms=duration_ms)
        error = frame.get("error") or {}
        status = STATUS_BY_ERROR_TYPE.get(error.get("type"), "failed")
        return cls(status, error=error, duration_ms=duration_ms)


@dataclass
class _Pending:
    future: asyncio.Future[ExecutionOutcome]
    on_log: LogCallback | None
    on_progress: ProgressCallback | None


def encode_frame(frame: dict[str, Any]) -> bytes:
    body = json.dumps(frame, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise ValueError(f"frame of {len(body)} bytes is over the {MAX_FRAME}-byte limit")
    return HEADER.pack(len(body)) + body


async def _call(callback: Callable[..., Any] | None, *args: Any) -> None:
    if callback is None:
        return
    try:
        result = callback(*args)
        if inspect.isawaitable(result):
            await result
    except Exception:
        log.exception("agent callback %r failed", callback)


class AgentConnection:
    """A connection to one replica's agent.

    `last_heartbeat` is the monotonic time of the last frame received (the agent sends a
    heartbeat every `heartbeat_s`, so a stale value means a hung agent); `running` holds
    the execution ids of the last heartbeat; `ready` the agent's ready frame.
    """

    def __init__(self) -> None:
        self.last_heartbeat = time.monotonic()
        self.running: list[str] = []
        self.ready: dict[str, Any] | None = None
        self.lost_reason: str | None = None
        self.lost = asyncio.Event()  # set with lost_reason
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._ready_event = asyncio.Event()
        self._init_error: dict[str, Any] | None = None
        self._pending: dict[str, _Pending] = {}

    @property
    def closed(self) -> bool:
        return self.lost_reason is not None

    async def connect(self, socket_path: str | Path, timeout_s: float) -> None:
        """Connects, retrying while the agent is starting; `AgentStartError` after timeout_s."""
        path = str(socket_path)
        if len(os.fsencode(path)) > MAX_SOCKET_PATH:
            raise AgentStartError(f"socket path {path} is over {MAX_SOCKET_PATH} bytes")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        delay = 0.002
        while True:
            try:
                self._reader, self._writer = await asyncio.open_unix_connection(path)
                break
            except OSError as exc:  # not there yet, not listening yet, not chmod-ed yet
                if loop.time() + delay > deadline:
                    raise AgentStartError(
                        f"the agent did not accept a connection on {path} within "
                        f"{timeout_s:g} s (last error: {exc})"
                    ) from exc
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
        self.last_heartbeat = time.monotonic()
        self._reader_task = asyncio.create_task(self._read_frames(), name=f"agent-reader {path}")

    async def wait_ready(self) -> dict[str, Any]:
        """Returns the agent's ready frame; raises `AgentInitError` if the module failed to load."""
        await self._ready_event.wait()
        if self._init_error is not None:
            raise AgentInitError(self._init_error)
        assert self.ready is not None
        return self.ready

    async def execute(
        self,
        execution_id: str,
        function: str,
        input: dict[str, Any],
        context: dict[str, Any] | None = None,
        timeout_s: float | None = None,
        on_log: LogCallback | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> ExecutionOutcome:
        """Runs one execution on the agent and returns how it ended.

        Never raises for what happens to the function: a lost agent gives status `crashed`
        with error type `AgentLost`. Cancelling the call asks the agent to stop it.
        """
        if execution_id in self._pending:
            raise ValueError(f"execution {execution_id} is already running on this agent")
        future: asyncio.Future[ExecutionOutcome] = asyncio.get_running_loop().create_future()
        self._pending[execution_id] = _Pending(future, on_log, on_progress)
        if self.lost_reason is not None:
            future.set_result(self._lost_outcome())
        message = {
            "type": "execute",
            "id": execution_id,
            "function": function,
            "input": input,
            "context": context or {},
            "timeout_s": timeout_s,
        }
        try:
            if not future.done():
                await self._send(message)
            return await future
        except asyncio.CancelledError:
            if not future.done() and self.lost_reason is None:
                with contextlib.suppress(Exception):
                    self._writer.write(encode_frame({"type": "stop", "id": execution_id}))  # type: ignore[union-attr]
            raise
        finally:
            self._pending.pop(execution_id, None)

    async def send_secrets(self, env: dict[str, str]) -> None:
        """Hands the service's secrets to the agent, which puts them in each execution's
        environment (the forked child's only); send before the first `execute`."""
        await self._send({"type": "secrets", "env": env})

    async def stop(self, execution_id: str) -> None:
        """Asks the agent to kill an execution; its `execute` then returns `terminated`."""
        await self._send({"type": "stop", "id": execution_id})

    async def shutdown(self, timeout_s: float = 5.0) -> None:
        """Asks the agent to stop what runs and exit, waits for it to hang up, then closes.

        Each execution still running ends with status `shutdown` (the agent reports it
        before leaving); one it did not report in time ends as `AgentLost`.
        """
        await self._send({"type": "shutdown"})
        if self._reader_task is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._reader_task), timeout_s)
        self.close()

    def close(self) -> None:
        """Drops the connection (the agent then kills its executions and exits)."""
        if self._reader_task is not None and not self._reader_task.done():
            self._reader_task.cancel()
        if self._writer is not None:
            self._writer.close()
        self._mark_lost("the worker closed the connection")

    # -- internals ------------------------------------------------------------------------
    async def _send(self, frame: dict[str, Any]) -> None:
        if self.lost_reason is not None or self._writer is None:
            return
        try:
            self._writer.write(encode_frame(frame))
            await self._writer.drain()
        except (OSError, RuntimeError) as exc:  # RuntimeError: transport already closing
            self._mark_lost(f"could not write to the agent: {exc}")

    async def _read_frames(self) -> None:
        assert self._reader is not None
        reason = "the agent closed the connection"
        try:
            while True:
                (size,) = HEADER.unpack(await self._reader.readexactly(HEADER.size))
                if size > MAX_FRAME:
                    raise ValueError(f"frame of {size} bytes is over the limit")
                frame = json.loads(await self._reader.readexactly(size))
                self.last_heartbeat = time.monotonic()
                await self._dispatch(frame)
        except asyncio.IncompleteReadError:
            pass
        except Exception as exc:  # a broken socket, or frames that break the protocol
            reason = f"the connection to the agent failed: {exc!r}"
            self._writer.close()  # type: ignore[union-attr]
        self._mark_lost(reason)

    async def _dispatch(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "heartbeat":
            self.running = list(frame.get("running") or [])
        elif kind == "ready":
            self.ready = frame
            self._ready_event.set()
        elif kind == "init_failed":
            self._init_error = frame.get("error") or {"type": "InitFailed", "message": ""}
            self._ready_event.set()
        pending = self._pending.get(frame.get("id"))  # type: ignore[arg-type]
        if pending is None:
            return  # an execution the worker stopped waiting for
        if kind == "log":
            await _call(pending.on_log, frame.get("stream"), frame.get("text"), frame.get("at"))
        elif kind == "progress":
            await _call(pending.on_progress, frame.get("percent"), frame.get("message"))
        elif kind in ("result", "error", "stopped") and not pending.future.done():
            pending.future.set_result(ExecutionOutcome.from_frame(frame))

    def _lost_outcome(self) -> ExecutionOutcome:
        error = {"type": "AgentLost", "message": self.lost_reason or "", "traceback": ""}
        return ExecutionOutcome("crashed", error=error)

    def _mark_lost(self, reason: str) -> None:
        if self.lost_reason is None:
            self.lost_reason = reason
            self.lost.set()
        if not self._ready_event.is_set():
            message = f"the agent exited before it was ready ({self.lost_reason})"
            self._init_error = {"type": "AgentLost", "message": message, "traceback": ""}
            self._ready_event.set()
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_result(self._lost_outcome())
