"""Replicas sleep until an enqueue wakes them; a lost wake-up costs a delay, not an execution."""

from __future__ import annotations

import asyncio

from tests.engine_helpers import running_worker, wait_for_status
from tests.test_engine import deploy_main, poll, run, start


async def _ready_replica(host, service_id: str):
    async def ready():
        return next(
            (
                r
                for r in host.replicas.values()
                if r.service.id == service_id and r.status == "ready" and r.consumer is not None
            ),
            None,
        )

    return await poll(ready, 60, "a ready replica")


async def test_an_enqueue_wakes_the_idle_replica(api, project, settings, pool, redis):
    service = await deploy_main(api, project["id"], runtime={"min_replicas": 1, "max_replicas": 1})
    # The fallback poll is far beyond the waits below: only a wake-up can start these.
    async with running_worker(
        settings, pool, redis, runtime="process", queue_fallback_poll_s=600
    ) as host:
        replica = await _ready_replica(host, service["id"])
        done = [await run(api, service["id"], "nap", {"seconds": 0}, wait_s=60) for _ in range(3)]
        pickups = replica.consumer.fallback_pickups

    assert [d["status"] for d in done] == ["success"] * 3, done
    assert [d["attempt"] for d in done] == [1, 1, 1]
    assert pickups == 0


async def test_a_lost_wake_up_is_caught_by_the_fallback_poll(api, project, settings, pool, redis):
    service = await deploy_main(api, project["id"], runtime={"min_replicas": 1, "max_replicas": 1})
    async with running_worker(
        settings, pool, redis, runtime="process", queue_fallback_poll_s=1.0
    ) as host:
        replica = await _ready_replica(host, service["id"])
        warm = await run(api, service["id"], "nap", {"seconds": 0})
        before = replica.consumer.fallback_pickups
        host.queue_wakes.wake = lambda queue_name: None  # every wake-up of this worker is dropped
        created = await start(api, service["id"], "nap", {"seconds": 0})
        done = await wait_for_status(api, created["id"], 60)
        after = replica.consumer.fallback_pickups

    assert warm["status"] == "success"
    assert done["status"] == "success", done
    assert done["attempt"] == 1
    # Started by the consumer's own look at its queue, not by a wake-up.
    assert after - before == 1


async def test_one_script_starts_what_arq_would_start(redis):
    """The consumer's start of a poll's jobs, against real Redis: a job marked in progress
    (running elsewhere) or delayed is left alone, and no more start than there are slots."""
    import time

    import arq
    from arq.constants import in_progress_key_prefix

    from core import queue
    from worker.consumer import QueueConsumer

    ran: list[str] = []

    async def run(ctx, execution_id: str) -> None:
        ran.append(execution_id)

    consumer = QueueConsumer(
        functions=[arq.func(run, name=queue.RUN_EXECUTION, keep_result=0)],
        queue_name=queue.queue_name("svc-start"),
        redis_pool=redis,
        max_jobs=2,
        handle_signals=False,
        keep_result=0,
        wake=asyncio.Event(),
        fallback_poll_s=60,
    )
    ids = ["ex-a", "ex-b", "ex-c", "ex-d", "ex-e"]
    assert await queue.enqueue_executions(redis, "svc-start", ids) == 5
    await redis.set(in_progress_key_prefix + "ex-b", b"1")  # running on another worker
    later = int(time.time() * 1000) + 60_000
    await redis.zadd(queue.queue_name("svc-start"), {"ex-c": later})  # put back with a delay

    await consumer._poll_iteration()  # two slots: a and d; b runs elsewhere, c is not due
    await asyncio.gather(*consumer.tasks.values())
    assert sorted(ran) == ["ex-a", "ex-d"]
    assert consumer._backlog  # e was seen and left for a free slot
    assert 55 < consumer._next_due_s <= 60  # and c's time is known

    await consumer._poll_iteration()
    await asyncio.gather(*consumer.tasks.values())
    assert sorted(ran) == ["ex-a", "ex-d", "ex-e"]
    left = await redis.zrange(queue.queue_name("svc-start"), 0, -1)
    assert sorted(left) == [b"ex-b", b"ex-c"]  # each job ran once; the others wait
