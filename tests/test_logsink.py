"""The worker's log sink: each batch is stored with the execution's counters in one
statement, streamed to live followers after it, and a later attempt numbers on."""

from __future__ import annotations

from core.events import log_stream_key
from core.executions import ExecutionCreate, create_executions
from core.secrets import MASK
from worker.logsink import LogSink


async def _execution_row(pool, redis, service):
    body = ExecutionCreate(service=service["id"], function="echo", input={"text": "x"})
    [(execution, _)] = await create_executions(pool, redis, None, [body])
    return await pool.fetchrow("SELECT * FROM executions WHERE id = $1", execution.id)


def _sink(pool, redis, row, **limits) -> LogSink:
    return LogSink(
        pool,
        redis,
        row,
        secrets=["hunter2"],
        max_lines=limits.get("max_lines", 1000),
        max_bytes=limits.get("max_bytes", 1_000_000),
    )


async def _stored(pool, execution_id: str) -> list[tuple[int, str, str]]:
    rows = await pool.fetch(
        "SELECT seq, stream, text FROM execution_logs WHERE execution_id = $1 ORDER BY seq",
        execution_id,
    )
    return [(r["seq"], r["stream"], r["text"]) for r in rows]


async def test_lines_are_stored_counted_streamed_and_numbered_on(pool, redis, service):
    row = await _execution_row(pool, redis, service)
    first = _sink(pool, redis, row)
    first.add("stdout", "starting")
    first.add("stderr", "token hunter2 refused")
    first.add("stdout", "ünïcode")
    await first.close()

    stored = await _stored(pool, row["id"])
    assert stored == [
        (1, "stdout", "starting"),
        (2, "stderr", f"token {MASK} refused"),
        (3, "stdout", "ünïcode"),
    ]
    counters = await pool.fetchrow(
        "SELECT log_lines, log_bytes FROM executions WHERE id = $1", row["id"]
    )
    size = sum(len(text.encode()) for _, _, text in stored)
    assert (counters["log_lines"], counters["log_bytes"]) == (3, size)
    streamed = await redis.xrange(log_stream_key(row["id"]))
    assert [int(fields[b"seq"]) for _, fields in streamed] == [1, 2, 3]

    # A later attempt (a new sink from the row as it is now) numbers on after them.
    again = await pool.fetchrow("SELECT * FROM executions WHERE id = $1", row["id"])
    second = _sink(pool, redis, again)
    second.add("stdout", "retrying")
    await second.close()
    assert (await _stored(pool, row["id"]))[-1] == (4, "stdout", "retrying")
    assert await pool.fetchval("SELECT log_lines FROM executions WHERE id = $1", row["id"]) == 4


async def test_past_the_line_limit_one_marker_is_stored_and_nothing_after(pool, redis, service):
    row = await _execution_row(pool, redis, service)
    sink = _sink(pool, redis, row, max_lines=3)
    for i in range(10):
        sink.add("stdout", f"line {i}")
    await sink.close()
    stored = await _stored(pool, row["id"])
    assert [text for _, _, text in stored[:2]] == ["line 0", "line 1"]
    assert len(stored) == 3
    assert stored[2][1] == "system" and stored[2][2].startswith("[log truncated")
    assert sink.payload() == {"lines": 3, "bytes": sink.bytes, "truncated": True}
    assert await pool.fetchval("SELECT log_lines FROM executions WHERE id = $1", row["id"]) == 3
