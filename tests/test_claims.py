"""Claims grouped under load: one statement for many, each execution claimed once, with its
attempt row and its event, exactly as a claim of its own would leave them; and the events of
a busy worker published together, in order."""

from __future__ import annotations

import asyncio
import logging

from core import outbox, states
from core.executions import ExecutionCreate, create_executions
from worker.claims import ClaimBatcher


async def _create(pool, redis, service, count: int) -> list[str]:
    created = await create_executions(
        pool,
        redis,
        None,
        [
            ExecutionCreate(service=service["id"], function="echo", input={"text": str(i)})
            for i in range(count)
        ],
    )
    return [execution.id for execution, _ in created]


async def test_claims_asked_together_go_in_fewer_statements(pool, redis, service):
    ids = await _create(pool, redis, service, 12)
    batcher = ClaimBatcher(pool, "worker-a", lease_s=30)
    # Every id once, and the last one a second time in the same burst.
    rows = await asyncio.gather(
        *(batcher.claim(i, f"replica-{n % 2}") for n, i in enumerate(ids)),
        batcher.claim(ids[-1], "replica-x"),
    )

    claimed = rows[:-1]
    assert [r["id"] for r in claimed] == ids
    assert rows[-1] is None  # the duplicate is not ours: one claim per execution
    assert {r["status"] for r in claimed} == {"in-progress"}
    assert {r["attempt"] for r in claimed} == {1}
    assert [r["replica_id"] for r in claimed] == [f"replica-{n % 2}" for n in range(12)]
    assert {r["worker_id"] for r in claimed} == {"worker-a"}
    assert all(r["lease_until"] is not None and r["started_at"] is not None for r in claimed)
    # Asked in one burst: they went together rather than in a statement each.
    assert batcher.items == 12 and batcher.statements < 12
    # Each with its attempt row and its own event, as `claim` writes them.
    attempts = await pool.fetch(
        "SELECT execution_id, attempt, replica_id, status FROM execution_attempts "
        "WHERE execution_id = ANY($1::text[]) ORDER BY execution_id",
        ids,
    )
    assert [(a["execution_id"], a["attempt"], a["status"]) for a in attempts] == [
        (i, 1, "in-progress") for i in sorted(ids)
    ]
    for row in claimed:
        [event] = states.row_events(row)
        assert event.type == "execution.in-progress" and event.resource_id == row["id"]
        assert event.data["attempt"] == 1
    log = await pool.fetchval("SELECT status_log FROM executions WHERE id = $1", ids[3])
    assert [e["status"] for e in log] == ["created", "in-progress"]

    # Claimed already: nobody gets them again, alone or together.
    again = await asyncio.gather(*(batcher.claim(i, "replica-0") for i in ids[:3]))
    assert again == [None, None, None]


async def test_the_publisher_sends_a_burst_in_order_and_leaves_nothing(pool, redis, service):
    ids = await _create(pool, redis, service, 6)
    await redis.delete("ferry:events")
    async with pool.acquire() as conn:
        rows = await states.claim_many(conn, [(i, "r") for i in ids], worker_id="w", lease_s=30)
    publisher = outbox.Publisher(pool, redis)
    for i in ids:
        publisher.submit(states.row_events(rows[i]))
    await publisher.flush()

    published = [
        fields[b"resource_id"].decode() for _, fields in await redis.xrange("ferry:events")
    ]
    assert published == ids
    assert await pool.fetchval("SELECT count(*) FROM outbox") == 0


async def test_successes_finished_together_are_each_recorded_once(pool, redis, service, settings):
    import asyncpg

    from worker.claims import SuccessBatcher

    ids = await _create(pool, redis, service, 8)
    async with pool.acquire() as conn:
        claimed = await states.claim_many(conn, [(i, "r") for i in ids], worker_id="w", lease_s=30)
        # One of them was taken back meanwhile (a lost lease): its attempt no longer owns it.
        await conn.execute("UPDATE executions SET attempt = 2 WHERE id = $1", ids[0])
    heard: list[str] = []

    def on_notify(*args) -> None:
        heard.append(args[3])

    listener = await asyncpg.connect(settings.database_url)
    try:
        await listener.add_listener(states.NOTIFY_CHANNEL, on_notify)
        batcher = SuccessBatcher(pool)
        outputs = [{"n": n} if n % 2 else None for n in range(8)]
        rows = await asyncio.gather(
            *(
                batcher.succeed(i, claimed[i]["attempt"], o)
                for i, o in zip(ids, outputs, strict=True)
            )
        )
        for _ in range(100):  # the NOTIFYs of the commit
            if len(heard) >= 7:
                break
            await asyncio.sleep(0.05)
    finally:
        await listener.close()

    assert rows[0] is None  # not this attempt's any more: left as it was
    assert batcher.items == 8 and batcher.statements < 8
    for row, output in zip(rows[1:], outputs[1:], strict=True):
        assert row["status"] == "success" and row["output"] == output
        assert row["finished_at"] is not None and row["lease_until"] is None
        assert row["progress_percent"] == 100
        [event] = states.row_events(row)
        assert event.type == "execution.success" and event.resource_id == row["id"]
    assert sorted(heard) == sorted(ids[1:])  # waiters woken for each, once
    stored = await pool.fetch(
        "SELECT id, status, status_log FROM executions WHERE id = ANY($1::text[])", ids
    )
    by_id = {r["id"]: r for r in stored}
    assert by_id[ids[0]]["status"] == "in-progress"
    log = by_id[ids[3]]["status_log"]
    assert [e["status"] for e in log] == ["created", "in-progress", "success"]
    attempts = await pool.fetch(
        "SELECT execution_id, status, finished_at FROM execution_attempts "
        "WHERE execution_id = ANY($1::text[])",
        ids,
    )
    # Every attempt row is closed, as `finish` closes it: also the one whose execution moved
    # on without it (its own record of how it ended).
    done = {a["execution_id"]: a for a in attempts}
    assert all(done[i]["status"] == "success" and done[i]["finished_at"] for i in ids)


async def test_a_grouped_claim_that_deadlocks_goes_one_by_one(pool, redis, service, caplog):
    caplog.set_level(logging.INFO, logger="worker.claims")
    ids = await _create(pool, redis, service, 2)
    first, second = ids
    batcher = ClaimBatcher(pool, "worker-a", lease_s=30)
    other = await pool.acquire()
    try:
        # Another transaction (as a lease renewal would) holds `second`, and only notices the
        # deadlock late: the grouped claim is the one PostgreSQL aborts.
        await other.execute("SET deadlock_timeout = '20s'")
        transaction = other.transaction()
        await transaction.start()
        await other.execute("SELECT 1 FROM executions WHERE id = $1 FOR UPDATE", second)
        claims = asyncio.gather(batcher.claim(first, "r"), batcher.claim(second, "r"))
        for _ in range(200):  # until the grouped claim waits for `second`
            waiting = await pool.fetchval(
                """SELECT count(*) FROM pg_stat_activity
                   WHERE wait_event_type = 'Lock' AND query LIKE '%claimed AS%'"""
            )
            if waiting:
                break
            await asyncio.sleep(0.05)
        assert waiting, "the grouped claim never waited for the locked row"
        # Now take `first` too, in the other order: a deadlock if the claim holds it.
        locked_first = asyncio.create_task(
            other.execute("SELECT 1 FROM executions WHERE id = $1 FOR UPDATE", first)
        )
        await asyncio.sleep(1.5)  # past the grouped claim's deadlock_timeout (1 s)
        await locked_first
        await transaction.commit()
        rows = await asyncio.wait_for(claims, 30)
    finally:
        await pool.release(other)
    assert [r["id"] for r in rows] == ids and {r["attempt"] for r in rows} == {1}
    assert "deadlocked; one by one" in caplog.text
