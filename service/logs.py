"""Log lines, paged or live: an execution's (`/executions/{id}/logs`) and a service's
(`/services/{id}/logs`: its executions' lines and its replicas' lifecycle).

A follower of an execution reads PostgreSQL for the history, then takes new lines from the
execution's Redis stream through the process's `StreamHub`; lines are numbered (`seq`) so
the two overlap without duplicates, and `Last-Event-ID` (a seq) resumes without a gap. The
`end` event comes once the execution is terminal and every line was sent: the log sink
writes its last lines before the terminal status is recorded, so a final PostgreSQL read
after the status turned terminal has them all.
"""

from __future__ import annotations

import time
from datetime import datetime
from fnmatch import fnmatchcase
from typing import Any, cast

from aiohttp import web

from core import executions, services
from core.errors import Invalid
from core.events import log_stream_key, service_logs_key
from core.models import Model, format_time
from core.states import TERMINAL
from service.http import principal
from service.keys import DB, REDIS, WAITERS
from service.queries import seq_cursor
from service.streams import (
    ClientGone,
    Entry,
    LiveResponse,
    decode_entries,
    hub_for,
    live_mode,
    parse_stream_id,
    stream_id_key,
)

STATUS_RECHECK_S = 5.0  # a termination without a NOTIFY (created → terminated) is seen this late
PAGE = 5_000


def _line_payload(seq: int, at: Any, stream: str, text: str) -> dict[str, Any]:
    if isinstance(at, str):
        at = datetime.fromisoformat(at)
    return {"seq": seq, "at": format_time(at), "stream": stream, "text": text}


def _line_item(line: dict[str, Any]) -> tuple[str, str, dict[str, Any], str]:
    return str(line["seq"]), "log", line, line["text"]


def _resume_seq(request: web.Request, cursor: str | None) -> int:
    return seq_cursor(request.headers.get("Last-Event-ID") or cursor)


async def execution_logs(request: web.Request, body, query):
    mode = live_mode(request)
    if mode is None:  # JSON pages
        from service.executions import list_logs

        return await list_logs(request, body, query)
    pool = request.app[DB]
    execution_id = request.match_info["id"]
    row = await executions.fetch_execution(pool, principal(request), execution_id)
    cursor = _resume_seq(request, query.cursor)
    out = await LiveResponse(request, mode).start()

    async def catch_up(after: int) -> int:
        while True:
            rows = await pool.fetch(
                """SELECT seq, at, stream, text FROM execution_logs
                   WHERE execution_id = $1 AND seq > $2 ORDER BY seq LIMIT $3""",
                execution_id,
                after,
                PAGE,
            )
            await out.send([_line_item(_line_payload(**dict(r))) for r in rows])
            if rows:
                after = rows[-1]["seq"]
            if len(rows) < PAGE:
                return after

    async def status() -> str:
        return await pool.fetchval("SELECT status FROM executions WHERE id = $1", execution_id)

    try:
        if not query.follow or row["status"] in TERMINAL:
            cursor = await catch_up(cursor)
            current = row["status"]
            if query.follow or current in TERMINAL:
                await out.end({"status": current, "last_seq": cursor})
            return out.response
        hub = hub_for(request.app, request.app[REDIS])
        sub = await hub.subscribe(log_stream_key(execution_id))
        waiters = request.app[WAITERS]
        finished = waiters.register(execution_id)
        finished.add_done_callback(lambda _: sub.wake.set())
        try:
            cursor = await catch_up(cursor)
            checked = time.monotonic()
            while True:
                if finished.done() or time.monotonic() - checked > STATUS_RECHECK_S:
                    checked = time.monotonic()
                    current = await status()
                    if current in TERMINAL:
                        cursor = await catch_up(cursor)
                        await out.end({"status": current, "last_seq": cursor})
                        return out.response
                    if finished.done():  # finished but not terminal (retrying): keep waiting
                        waiters.discard(execution_id, finished)
                        finished = waiters.register(execution_id)
                        finished.add_done_callback(lambda _: sub.wake.set())
                entries, overflow = await sub.get(1.0)
                if overflow:
                    cursor = await catch_up(cursor)
                elif entries:
                    cursor = await _send_new(out, entries, cursor, catch_up)
                await out.heartbeat_if_due()
        finally:
            waiters.discard(execution_id, finished)
            hub.unsubscribe(sub)
    except ClientGone:
        return out.response


frames_rendered = 0  # live entries rendered to frames, for tests and curiosity


def _frame(fields: dict[str, str], mode: str) -> bytes:
    """A log entry as written to every follower in `mode`, rendered once per API process:
    the hub hands the same decoded entry to each subscriber, which keeps the bytes in it
    (under a key no Redis field can have)."""
    memo = cast(dict[Any, Any], fields)
    frame = memo.get((mode,))
    if frame is None:
        global frames_rendered
        frames_rendered += 1
        line = _line_payload(int(fields["seq"]), fields["at"], fields["stream"], fields["text"])
        frame = memo[(mode,)] = LiveResponse.render([_line_item(line)], mode)
    return cast(bytes, frame)


async def _send_new(out: LiveResponse, entries: list[Entry], cursor: int, catch_up) -> int:
    frames: list[bytes] = []
    for _, fields in entries:
        seq = int(fields["seq"])
        if seq <= cursor:
            continue  # already sent from PostgreSQL
        if seq != cursor + 1:  # a gap (trimmed stream?): PostgreSQL has every line
            await out.write_frames(frames)
            return await catch_up(cursor)
        frames.append(_frame(fields, out.mode))
        cursor = seq
    await out.write_frames(frames)
    return cursor


# -- a service's log -------------------------------------------------------------------------


class ServiceLogLine(Model):
    id: str  # the Redis stream id: a cursor and an SSE id
    execution: str | None
    replica: str | None
    seq: int
    at: str
    stream: str  # stdout, stderr, system, lifecycle
    text: str


def _service_line(entry: Entry) -> dict[str, Any]:
    stream_id, f = entry
    at = f.get("at", "")
    if at and not at.endswith("Z"):
        at = format_time(datetime.fromisoformat(at))
    return {
        "id": stream_id,
        "execution": f.get("execution") or None,
        "replica": f.get("replica") or None,
        "seq": int(f.get("seq") or 0),
        "at": at,
        "stream": f.get("stream", ""),
        "text": f.get("text", ""),
    }


def _service_item(line: dict[str, Any]) -> tuple[str, str, dict[str, Any], str]:
    who = line["execution"] or f"replica {line['replica']}"
    return line["id"], "log", line, f"{line['at']} [{who}] {line['text']}"


def _keeps(query) -> Any:
    streams = set(query.stream.split(",")) if query.stream else None

    def keep(line: dict[str, Any]) -> bool:
        if query.replica and line["replica"] != query.replica:
            return False
        return streams is None or any(fnmatchcase(line["stream"], s) for s in streams)

    return keep


def _service_start(request: web.Request, query) -> str:
    """The exclusive lower bound of ids to send: Last-Event-ID, cursor, `since`, or all."""
    raw = request.headers.get("Last-Event-ID") or query.cursor
    if raw:
        start = parse_stream_id(raw)
        if start is None:
            raise Invalid.field("cursor", "a log line id (as in Last-Event-ID)")
        return start
    if query.since is not None:
        return f"{max(0, int(query.since.timestamp() * 1000) - 1)}-18446744073709551615"
    return "0-0"


async def service_logs(request: web.Request, body, query):
    pool = request.app[DB]
    redis = request.app[REDIS]
    row = await services.fetch_service(pool, principal(request), request.match_info["id"])
    key = service_logs_key(row["id"])
    keep = _keeps(query)
    start = _service_start(request, query)
    mode = live_mode(request)
    if mode is None:  # a JSON page: items after the cursor, oldest first
        raw = await redis.xrange(key, min=f"({start}", max="+", count=query.limit)
        lines = [_service_line(e) for e in decode_entries(raw)]
        next_cursor = lines[-1]["id"] if lines else (start if start != "0-0" else None)
        return {"items": [line for line in lines if keep(line)], "next_cursor": next_cursor}

    out = await LiveResponse(request, mode).start()

    async def catch_up(after: str, until: str = "+") -> str:
        while True:
            raw = await redis.xrange(key, min=f"({after}", max=until, count=PAGE)
            entries = decode_entries(raw)
            lines = [_service_line(e) for e in entries]
            await out.send([_service_item(line) for line in lines if keep(line)])
            if entries:
                after = entries[-1][0]
            if len(entries) < PAGE:
                return after

    try:
        if not query.follow:
            await catch_up(start)
            return out.response
        hub = hub_for(request.app, redis)
        sub = await hub.subscribe(key)
        try:
            cursor = await catch_up(start, sub.start_id)
            if stream_id_key(cursor) < stream_id_key(sub.start_id):
                cursor = sub.start_id
            while True:
                entries, overflow = await sub.get(1.0)
                if overflow:
                    cursor = await catch_up(cursor)
                fresh = [e for e in entries if stream_id_key(e[0]) > stream_id_key(cursor)]
                if fresh:
                    lines = [_service_line(e) for e in fresh]
                    await out.send([_service_item(line) for line in lines if keep(line)])
                    cursor = fresh[-1][0]
                await out.heartbeat_if_due()
        finally:
            hub.unsubscribe(sub)
    except ClientGone:
        return out.response
