"""An execution's log lines and progress, on their way to PostgreSQL and Redis.

Lines are written as they come, in batches of whatever arrived while the previous batch was
being written, into `execution_logs` and a Redis stream per execution that live followers
read. Secret values are masked, and past the per-execution caps one marker line says what
was dropped.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Any

import asyncpg
from redis.asyncio import Redis

from core import events, outbox
from core.events import log_stream_key
from core.outages import REDIS_UNAVAILABLE
from core.secrets import mask_secrets

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 0.2
STREAM_MAXLEN = 20_000
STREAM_TTL_S = 24 * 3600


# The batch's lines and the execution's counters together (the line count is the last seq).
_WRITE_LINES = """
WITH written AS (
    INSERT INTO execution_logs (execution_id, seq, at, stream, text)
    SELECT $1, line.seq, line.at, line.stream, line.text
      FROM unnest($2::integer[], $3::timestamptz[], $4::text[], $5::text[])
           AS line (seq, at, stream, text)
    ON CONFLICT DO NOTHING
)
UPDATE executions
   SET log_lines = $2[array_upper($2, 1)], log_bytes = $6
 WHERE id = $1
"""


class LogSink:
    def __init__(
        self,
        pool: asyncpg.Pool,
        redis: Redis,
        execution: asyncpg.Record,
        *,
        secrets: list[str],
        max_lines: int,
        max_bytes: int,
    ) -> None:
        self.pool = pool
        self.redis = redis
        self.execution_id: str = execution["id"]
        self.project_id: str = execution["project_id"]
        self.service_id: str = execution["service_id"]
        self.replica_id: str = execution.get("replica_id") or ""
        self.secrets = secrets
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        # Continue numbering after lines of earlier attempts.
        self.seq: int = execution["log_lines"]
        self.bytes: int = execution["log_bytes"]
        self.truncated = self.seq >= max_lines
        self._pending: list[tuple[int, datetime, str, str]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._progress: tuple[float, str | None] | None = None
        self._progress_written_at = 0.0
        self._lock = asyncio.Lock()
        self._sleeping = False

    def add(self, stream: str, text: str, at: float | None = None) -> None:
        if self.truncated:
            return
        text = mask_secrets(text, self.secrets)
        size = len(text.encode("utf-8", errors="replace"))
        if self.seq + 1 >= self.max_lines or self.bytes + size > self.max_bytes:
            self.truncated = True
            stream, text = (
                "system",
                (
                    f"[log truncated: the limit of {self.max_lines} lines / {self.max_bytes} bytes "
                    "per execution was reached; later lines are dropped]"
                ),
            )
        self.seq += 1
        self.bytes += size
        when = datetime.fromtimestamp(at, UTC) if at else datetime.now(UTC)
        self._pending.append((self.seq, when, stream, text))
        self._schedule(0)

    def system(self, text: str) -> None:
        self.add("system", text)

    def progress(self, percent: float, message: str | None) -> None:
        self._progress = (max(0.0, min(100.0, float(percent))), message)
        self._schedule(0)

    def _schedule(self, delay: float) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_after(delay))

    async def _flush_after(self, delay: float) -> None:
        if delay:
            self._sleeping = True
            try:
                await asyncio.sleep(delay)
            finally:
                self._sleeping = False
        # Lines that arrive while a batch is being written form the next batch: an idle sink
        # writes a line at once, a busy one batches by itself.
        failures = 0
        while self._pending or self._progress is not None:
            try:
                await self.flush()
                failures = 0
            except Exception:  # logs never fail a run: retry a few times, close() tries again
                failures += 1
                log.exception("flushing logs of %s failed", self.execution_id)
                if failures >= 3:
                    return
                await asyncio.sleep(0.2 * failures)

    async def flush(self) -> None:
        async with self._lock:
            lines, self._pending = self._pending, []
            progress, self._progress = self._progress, None
            if lines:
                try:
                    await self._write_lines(lines)
                except Exception:
                    self._pending = lines + self._pending
                    raise
            if progress is not None:
                await self._write_progress(*progress)

    async def _write_lines(self, lines: list[tuple[int, datetime, str, str]]) -> None:
        seqs, ats, streams, texts = zip(*lines, strict=True)
        # One statement, so one round trip and its own transaction: a line reaches live
        # followers only after this commit, and every round trip here is on that path.
        await self.pool.execute(
            _WRITE_LINES, self.execution_id, seqs, ats, streams, texts, self.bytes
        )
        try:
            await self._stream_lines(lines)
        except REDIS_UNAVAILABLE:
            pass  # committed above: GET …/logs has them; only live followers miss them

    async def _stream_lines(self, lines: list[tuple[int, datetime, str, str]]) -> None:
        key = log_stream_key(self.execution_id)
        service_key = events.service_logs_key(self.service_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            for seq, at, stream, text in lines:
                fields = {"seq": seq, "at": at.isoformat(), "stream": stream, "text": text}
                pipe.xadd(key, fields, maxlen=STREAM_MAXLEN, approximate=True)
                pipe.xadd(
                    service_key,
                    {"execution": self.execution_id, "replica": self.replica_id, **fields},
                    maxlen=events.SERVICE_LOGS_MAXLEN,
                    approximate=True,
                )
            pipe.expire(key, STREAM_TTL_S)
            pipe.expire(service_key, events.SERVICE_LOGS_TTL_S)
            await pipe.execute()

    async def _write_progress(self, percent: float, message: str | None) -> None:
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                moved = await conn.execute(
                    """UPDATE executions SET progress_percent = $2, progress_message = $3
                       WHERE id = $1 AND status = 'in-progress'""",
                    self.execution_id,
                    percent,
                    message,
                )
                if moved == "UPDATE 0":
                    return
                event = await outbox.add(
                    conn,
                    "execution.progress",
                    self.project_id,
                    "execution",
                    self.execution_id,
                    {"percent": percent, "message": message},
                )
            await outbox.publish(conn, self.redis, [event])

    async def close(self) -> None:
        """Write what is pending; called before the terminal status is recorded."""
        if self._flusher is not None and not self._flusher.done():
            # Cancel a flush still waiting out its delay; let one that is writing finish,
            # so no batch is lost half-written.
            if self._sleeping:
                self._flusher.cancel()
            else:
                await asyncio.wait([self._flusher])
        for _ in range(3):
            try:
                await self.flush()
                return
            except Exception:
                log.exception("final log flush of %s failed; retrying", self.execution_id)
                await asyncio.sleep(0.2)

    def payload(self) -> dict[str, Any]:
        return {"lines": self.seq, "bytes": self.bytes, "truncated": self.truncated}
