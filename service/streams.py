"""Live streams for the API: one Redis reader per process fanned out to every follower, and
the response writer for Server-Sent Events and plain text.

`StreamHub` runs ONE task per API process that `XREAD BLOCK`s, on one dedicated connection,
every Redis stream some client follows (an execution's log, a service's log, the event
stream), and hands each new entry to the subscribers of that stream. 200 followers of one
execution cost one blocking read, not 200; a new stream joins the read at once (the reader
is woken with `CLIENT UNBLOCK`). A subscriber that falls more than `MAX_BUFFER` entries
behind is told it overflowed and catches up from the durable copy itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import weakref
from collections.abc import Iterable
from typing import Any

import redis.exceptions
from aiohttp import web
from redis.asyncio import Redis

log = logging.getLogger("ferry.api.streams")

MAX_BUFFER = 10_000  # entries a subscriber may lag before it is told to catch up itself
BLOCK_MS = 5_000
IDLE_EXIT_S = 10.0
HEARTBEAT_S = 15.0
READ_COUNT = 1_000

Entry = tuple[str, dict[str, str]]  # (stream id, fields), decoded


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def decode_entries(raw: Iterable[tuple[Any, dict[Any, Any]]]) -> list[Entry]:
    return [(_text(i), {_text(k): _text(v) for k, v in f.items()}) for i, f in raw]


# Redis stream ids are two unsigned 64-bit numbers; anything else makes Redis refuse the command.
_STREAM_ID = re.compile(r"([0-9]{1,20})(?:-([0-9]{1,20}))?")
_U64_MAX = 2**64 - 1


def parse_stream_id(raw: str) -> str | None:
    """A client's `ms` or `ms-seq` as a full stream id, or None when Redis would refuse it."""
    match = _STREAM_ID.fullmatch(raw)
    if match is None:
        return None
    ms, seq = int(match[1]), int(match[2] or 0)
    if ms > _U64_MAX or seq > _U64_MAX:
        return None
    return f"{ms}-{seq}"


def stream_id_key(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


class Subscription:
    def __init__(self, key: str, start_id: str) -> None:
        self.key = key
        # Every entry after this id reaches the subscriber; what came before it is history
        # the subscriber reads from the durable copy.
        self.start_id = start_id
        self.items: list[Entry] = []
        self.overflow = False
        self.wake = asyncio.Event()

    def push(self, entries: list[Entry]) -> None:
        if self.overflow:
            return
        if len(self.items) + len(entries) > MAX_BUFFER:
            self.overflow, self.items = True, []
        else:
            self.items.extend(entries)
        self.wake.set()

    async def get(self, wait_s: float) -> tuple[list[Entry], bool]:
        if not self.items and not self.overflow:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), wait_s)
        self.wake.clear()
        items, self.items = self.items, []
        overflow, self.overflow = self.overflow, False
        return items, overflow


class _Key:
    __slots__ = ("last_id", "subs")

    def __init__(self, last_id: str) -> None:
        self.last_id = last_id
        self.subs: set[Subscription] = set()


class StreamHub:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.keys: dict[str, _Key] = {}
        self._task: asyncio.Task[None] | None = None
        self._client_id: int | None = None
        self._changed = asyncio.Event()
        self.reads = 0  # XREAD calls, for tests and curiosity

    async def subscribe(self, key: str) -> Subscription:
        state = self.keys.get(key)
        if state is None:
            last = await self.redis.xrevrange(key, count=1)
            start = _text(last[0][0]) if last else "0-0"
            state = self.keys.setdefault(key, _Key(start))
        sub = Subscription(key, state.last_id)
        fresh = not state.subs
        state.subs.add(sub)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="ferry-stream-hub")
        elif fresh:
            await self._interrupt()
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        state = self.keys.get(sub.key)
        if state is None:
            return
        state.subs.discard(sub)
        if not state.subs:
            del self.keys[sub.key]

    async def _interrupt(self) -> None:
        """Make the reader re-read the set of keys now rather than after its BLOCK timeout."""
        self._changed.set()
        for _ in range(100):
            if not self._changed.is_set():
                return  # the reader has picked the change up
            if self._client_id is not None:
                with contextlib.suppress(redis.exceptions.RedisError):
                    if await self.redis.client_unblock(self._client_id):
                        return
            await asyncio.sleep(0.005)

    async def _run(self) -> None:
        conn = Redis(connection_pool=self.redis.connection_pool, single_connection_client=True)
        try:
            self._client_id = int(await conn.client_id())
            idle_since: float | None = None
            while True:
                self._changed.clear()
                live = {key: state.last_id for key, state in self.keys.items() if state.subs}
                if not live:
                    idle_since = idle_since or time.monotonic()
                    if time.monotonic() - idle_since > IDLE_EXIT_S:
                        return
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), 1.0)
                    continue
                idle_since = None
                try:
                    result = await conn.xread(live, count=READ_COUNT, block=BLOCK_MS)  # type: ignore[arg-type]
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                    log.warning("stream reader lost Redis (%s); retrying", exc)
                    await asyncio.sleep(0.5)
                    with contextlib.suppress(redis.exceptions.RedisError, OSError):
                        self._client_id = int(await conn.client_id())
                    continue
                self.reads += 1
                for raw_key, raw_entries in result or []:
                    state = self.keys.get(_text(raw_key))
                    if state is None or not raw_entries:
                        continue
                    entries = decode_entries(raw_entries)
                    state.last_id = entries[-1][0]
                    for sub in list(state.subs):
                        sub.push(entries)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("stream reader failed; followers will reconnect")
            for state in self.keys.values():
                for sub in state.subs:
                    sub.overflow = True
                    sub.wake.set()
        finally:
            self._client_id = None
            with contextlib.suppress(Exception):
                await conn.aclose()


_hubs: weakref.WeakKeyDictionary[web.Application, StreamHub] = weakref.WeakKeyDictionary()


def hub_for(app: web.Application, redis: Redis) -> StreamHub:
    """The process's hub for this application (made on first use: no app state to declare)."""
    hub = _hubs.get(app)
    if hub is None:
        hub = _hubs[app] = StreamHub(redis)
    return hub


class ClientGone(Exception):
    """The client closed the connection."""


class LiveResponse:
    """A streamed response: Server-Sent Events, or plain text lines for curl."""

    def __init__(self, request: web.Request, mode: str) -> None:
        assert mode in ("sse", "text")
        self.request = request
        self.mode = mode
        self.response = web.StreamResponse(
            headers={
                "Content-Type": (
                    "text/event-stream" if mode == "sse" else "text/plain; charset=utf-8"
                ),
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",  # no proxy buffering
            }
        )
        self.last_write = time.monotonic()

    async def start(self) -> LiveResponse:
        await self.response.prepare(self.request)
        return self

    @property
    def gone(self) -> bool:
        transport = self.request.transport
        return transport is None or transport.is_closing()

    async def _write(self, data: str) -> None:
        await self._write_bytes(data.encode())

    async def _write_bytes(self, data: bytes) -> None:
        if self.gone:
            raise ClientGone
        try:
            await self.response.write(data)
        except (ConnectionError, RuntimeError) as exc:  # RuntimeError: the transport closed
            raise ClientGone from exc
        self.last_write = time.monotonic()

    @staticmethod
    def render(items: list[tuple[str, str | None, dict[str, Any], str]], mode: str) -> bytes:
        """(id, event name, JSON payload, text line) each, as `mode` writes them."""
        if mode == "sse":
            parts = []
            for event_id, event, payload, _ in items:
                head = f"id: {event_id}\n" + (f"event: {event}\n" if event else "")
                parts.append(f"{head}data: {json.dumps(payload, default=str)}\n\n")
        else:
            parts = [f"{line}\n" for *_, line in items]
        return "".join(parts).encode()

    async def send(self, items: list[tuple[str, str | None, dict[str, Any], str]]) -> None:
        """(id, event name, JSON payload, text line) each; written in one chunk."""
        if items:
            await self._write_bytes(self.render(items, self.mode))

    async def write_frames(self, frames: list[bytes]) -> None:
        """Frames rendered once (`render`) for many followers; written in one chunk."""
        if frames:
            await self._write_bytes(b"".join(frames))

    async def end(self, payload: dict[str, Any]) -> None:
        if self.mode == "sse":
            await self._write(f"event: end\ndata: {json.dumps(payload, default=str)}\n\n")

    async def heartbeat_if_due(self) -> None:
        if self.gone:
            raise ClientGone
        if self.mode == "sse" and time.monotonic() - self.last_write >= HEARTBEAT_S:
            await self._write(": keep-alive\n\n")


def live_mode(request: web.Request) -> str | None:
    """`sse` for Accept: text/event-stream, `text` for Accept: text/plain, else None (JSON)."""
    accept = request.headers.get("Accept", "")
    if "text/event-stream" in accept:
        return "sse"
    if "text/plain" in accept:
        return "text"
    return None
