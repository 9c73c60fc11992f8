"""The outbox and the one home of outcomes: an event survives a crash between the commit and
the publish, relays never repeat each other, and a replayed pipeline hop creates nothing."""

from __future__ import annotations

import asyncio

from core import outbox, outcomes, states
from core.executions import ExecutionCreate, Origin, create_executions
from core.states import ExecutionStatus, Reason


async def _echoes(pool, redis, service, *texts: str) -> list:
    """New executions of the echo service, one per text."""
    bodies = [
        ExecutionCreate(service=service["id"], function="echo", input={"text": t}) for t in texts
    ]
    return [execution for execution, _ in await create_executions(pool, redis, None, bodies)]


async def _stream_types(redis, resource_id: str) -> list[str]:
    return [
        fields[b"type"].decode()
        for _, fields in await redis.xrange("ferry:events")
        if fields[b"resource_id"].decode() == resource_id
    ]


async def test_an_outcome_whose_process_died_before_publishing_is_relayed(pool, redis, service):
    [execution] = await _echoes(pool, redis, service, "x")
    async with pool.acquire() as conn:
        claimed = await states.claim(conn, execution.id, worker_id="w", replica_id="r", lease_s=30)
        # The worker records the outcome and dies before `deliver`: nothing is published.
        recorded = await outcomes.finish(
            conn, claimed, claimed["attempt"], ExecutionStatus.success, output={"ok": True}
        )
    assert recorded.row["status"] == "success"
    assert [e.type for e in recorded.events] == ["execution.success"]
    assert await _stream_types(redis, execution.id) == ["execution.created"]
    # The in-progress event was never published either: both wait in the outbox, in order.
    waiting = await pool.fetch(
        "SELECT type FROM outbox WHERE resource_id = $1 ORDER BY id", execution.id
    )
    assert [r["type"] for r in waiting] == ["execution.in-progress", "execution.success"]

    assert await outbox.relay_once(pool, redis, after_s=0) == 2
    assert await _stream_types(redis, execution.id) == [
        "execution.created",
        "execution.in-progress",
        "execution.success",
    ]
    assert await pool.fetchval("SELECT count(*) FROM outbox") == 0
    assert await outbox.relay_once(pool, redis, after_s=0) == 0


async def test_relays_side_by_side_publish_each_event_once(pool, redis, project):
    async with pool.acquire() as conn:
        await conn.execute(
            """INSERT INTO outbox (type, project_id, resource, resource_id, data)
               SELECT 'thing.happened', $1, 'thing', 'thing-' || n, '{}'
               FROM generate_series(1, 3000) AS n""",
            project["id"],
        )
    before = await redis.xlen("ferry:events")
    relayed = await asyncio.gather(*(outbox.relay_once(pool, redis, after_s=0) for _ in range(4)))
    while sum(relayed) < 3000:  # a batch is at most RELAY_BATCH rows
        more = await outbox.relay_once(pool, redis, after_s=0)
        assert more, relayed
        relayed.append(more)
    assert sum(relayed) == 3000
    assert await redis.xlen("ferry:events") - before == 3000
    ids = [
        f[b"resource_id"]
        for _, f in await redis.xrange("ferry:events")
        if f[b"type"] == b"thing.happened"
    ]
    assert len(ids) == len(set(ids)) == 3000


async def test_a_replayed_hop_creates_nothing(pool, redis, service):
    body = ExecutionCreate(service=service["id"], function="echo", input={"text": "x"})
    origin = Origin("pipeline", pipeline_execution_id="p-1", node="b", parent="a-1", element=3)
    async with pool.acquire() as conn:
        async with conn.transaction():
            [(first, created)] = await create_executions(
                pool, None, None, [body], origin=origin, conn=conn
            )
        assert created
        async with conn.transaction():
            [(again, created)] = await create_executions(
                pool, None, None, [body], origin=origin, conn=conn
            )
    assert not created and again.id == first.id
    assert (
        await pool.fetchval("SELECT count(*) FROM executions WHERE pipeline_execution_id = 'p-1'")
        == 1
    )


async def test_a_late_result_of_an_attempt_handed_back_is_refused(pool, redis, service):
    """Its worker cut off, an attempt's lease expired and the reconciler handed the
    execution back; before another worker claims it (attempt 2), the cut-off worker comes
    back and reports attempt 1's result. It is refused: the attempt is on record as lost and
    the execution waits for its next attempt, so it never ends with the lost attempt's
    outcome (found by tests/cluster's partition scenario)."""
    [execution] = await _echoes(pool, redis, service, "x")
    async with pool.acquire() as conn:
        claimed = await states.claim(conn, execution.id, worker_id="w", replica_id="r", lease_s=30)
        handed = await outcomes.hand_back(
            conn, claimed, 1, reason=Reason.lost, error={"type": "WorkerLost"}, retry=True
        )
        assert handed.row["status"] == "in-progress" and handed.row["lease_until"] is None
        late = await outcomes.finish(conn, claimed, 1, ExecutionStatus.success, output={"x": 1})
    assert late.row is None and late.events == []
    row = await pool.fetchrow(
        "SELECT status, attempt, output FROM executions WHERE id = $1", execution.id
    )
    assert (row["status"], row["attempt"], row["output"]) == ("in-progress", 1, None)
    attempt = await pool.fetchrow(
        "SELECT status, reason FROM execution_attempts WHERE execution_id = $1 AND attempt = 1",
        execution.id,
    )
    assert (attempt["status"], attempt["reason"]) == ("failed", "lost")


async def test_a_late_result_in_a_grouped_success_is_refused_too(pool, redis, service):
    """The same fence for the worker's grouped successes (`succeed_many`): the attempt that
    was handed back records nothing, the attempt still held beside it succeeds."""
    lost_id, held_id = (execution.id for execution in await _echoes(pool, redis, service, "a", "b"))
    async with pool.acquire() as conn:
        lost = await states.claim(conn, lost_id, worker_id="w", replica_id="r", lease_s=30)
        await states.claim(conn, held_id, worker_id="w", replica_id="r", lease_s=30)
        await outcomes.hand_back(
            conn, lost, 1, reason=Reason.lost, error={"type": "WorkerLost"}, retry=True
        )
        done = await states.succeed_many(conn, [(lost_id, 1, {"x": 1}), (held_id, 1, {"x": 2})])
    assert list(done) == [held_id] and done[held_id]["output"] == {"x": 2}
    rows = {
        r["id"]: r
        for r in await pool.fetch(
            """SELECT e.id, e.status, e.output, a.status AS attempt_status, a.reason
               FROM executions e JOIN execution_attempts a ON a.execution_id = e.id
               WHERE e.id = ANY($1::text[])""",
            [lost_id, held_id],
        )
    }
    assert (rows[lost_id]["status"], rows[lost_id]["output"]) == ("in-progress", None)
    assert (rows[lost_id]["attempt_status"], rows[lost_id]["reason"]) == ("failed", "lost")
    assert (rows[held_id]["status"], rows[held_id]["attempt_status"]) == ("success", "success")
