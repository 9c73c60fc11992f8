"""Redis queues: one arq queue per service, the arq job id is the execution id.

Enqueue is idempotent (a job id already queued is left alone), so the API, the reconciler
and a retrying client may all enqueue the same execution without running it twice.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from datetime import datetime

from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.constants import in_progress_key_prefix, job_key_prefix, result_key_prefix
from arq.jobs import serialize_job

RUN_EXECUTION = "run_execution"  # the arq function name workers register
QUEUE_PREFIX = "ferry:queue:"
# Published when a queue goes from empty to non-empty: a service scaled to zero needs a
# replica now, and workers wake their placement loop instead of waiting for its next tick.
WAKE_CHANNEL = "ferry:wake"
# Published (with the queue's name) by every enqueue that queued something: a replica's
# consumer sleeps until this arrives instead of polling its queue, with a slow fallback
# poll (`FERRY_QUEUE_FALLBACK_POLL_S`) so a lost message costs a delay, never an execution.
JOBS_CHANNEL = "ferry:jobs"
# arq drops a job whose key expired before it ran; the reconciler re-enqueues it from
# PostgreSQL, so this only bounds how long Redis holds a job nobody consumes.
JOB_EXPIRY_MS = 7 * 24 * 3600 * 1000

# Enqueue many jobs in one round trip, each only if its id is not queued or running already
# (arq's own enqueue_job does one WATCH/MULTI round trip per job). Each job has its own
# score: arq takes jobs in score order, so a score in the past puts a job ahead of those
# queued since.
_ENQUEUE_SCRIPT = """
local queue = KEYS[1]
local added = 0
for i = 1, #ARGV, 4 do
  local id = ARGV[i]
  if redis.call('EXISTS', ARGV[i + 1] .. id) == 0 and redis.call('EXISTS', '%s' .. id) == 0 then
    redis.call('PSETEX', ARGV[i + 1] .. id, %d, ARGV[i + 2])
    redis.call('ZADD', queue, ARGV[i + 3], id)
    added = added + 1
  end
end
if added > 0 then
  if redis.call('ZCARD', queue) == added then
    redis.call('PUBLISH', '%s', queue)
  end
  redis.call('PUBLISH', '%s', queue)
end
return added
""" % (result_key_prefix, JOB_EXPIRY_MS, WAKE_CHANNEL, JOBS_CHANNEL)  # noqa: UP031 - Lua has no braces to escape


def queue_name(service_id: str) -> str:
    return QUEUE_PREFIX + service_id


def redis_settings(url: str) -> RedisSettings:
    settings = RedisSettings.from_dsn(url)
    settings.conn_timeout = 5
    settings.conn_retries = 3
    return settings


async def connect_redis(url: str) -> ArqRedis:
    return await create_pool(redis_settings(url))


async def enqueue_executions(
    redis: ArqRedis,
    service_id: str,
    execution_ids: Iterable[str],
    *,
    queued_at: Iterable[datetime | None] | None = None,
) -> int:
    """Queue executions of one service; returns how many were newly queued.

    `queued_at` (one per id) keeps an execution's place in line when it is queued again (a
    retry after a lost worker, a requeue after Redis lost its data): it goes ahead of
    everything accepted after that time instead of behind the whole backlog.
    """
    now_ms = int(time.time() * 1000)
    places = iter(queued_at) if queued_at is not None else None
    argv: list[str | bytes | int] = []
    for execution_id in execution_ids:
        at = next(places, None) if places is not None else None
        score = min(now_ms, int(at.timestamp() * 1000)) if at is not None else now_ms
        payload = serialize_job(RUN_EXECUTION, (execution_id,), {}, None, now_ms)
        argv += [execution_id, job_key_prefix, payload, score]
    if not argv:
        return 0
    return await redis.eval(_ENQUEUE_SCRIPT, 1, queue_name(service_id), *argv)  # type: ignore[misc, arg-type]


async def enqueue_execution(
    redis: ArqRedis, service_id: str, execution_id: str, *, queued_at: datetime | None = None
) -> bool:
    return await enqueue_executions(redis, service_id, [execution_id], queued_at=[queued_at]) == 1


async def wake_consumers(redis: ArqRedis, service_id: str) -> None:
    """Tell the consumers of a service's queue to look at it now (a job put back with a
    delay is due, say); without this they see it at their next fallback poll."""
    await redis.publish(JOBS_CHANNEL, queue_name(service_id))


async def forget_job(redis: ArqRedis, service_id: str, execution_id: str) -> None:
    """Drop every trace of a job so it can be queued afresh (used when a lease expired)."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(job_key_prefix + execution_id)
        pipe.delete(in_progress_key_prefix + execution_id)
        pipe.delete(result_key_prefix + execution_id)
        pipe.zrem(queue_name(service_id), execution_id)
        await pipe.execute()


async def forget_jobs(redis: ArqRedis, service_id: str, execution_ids: list[str]) -> None:
    """`forget_job` for many executions of one service, in one round trip."""
    if not execution_ids:
        return
    async with redis.pipeline(transaction=False) as pipe:
        for execution_id in execution_ids:
            pipe.delete(
                job_key_prefix + execution_id,
                in_progress_key_prefix + execution_id,
                result_key_prefix + execution_id,
            )
        pipe.zrem(queue_name(service_id), *execution_ids)
        await pipe.execute()


# What Redis holds for each of many executions, in one round trip and one reply (a digit
# each): the reconciler looks at up to thousands every round.
JOB_MISSING, JOB_QUEUED, JOB_RUNNING = "0", "1", "2"
_JOB_STATES_SCRIPT = """
local out = {}
for i = 1, #ARGV do
  if redis.call('EXISTS', '%s' .. ARGV[i]) == 1 then
    out[i] = '%s'
  elseif redis.call('EXISTS', '%s' .. ARGV[i]) == 1 then
    out[i] = '%s'
  else
    out[i] = '%s'
  end
end
return table.concat(out)
""" % (in_progress_key_prefix, JOB_RUNNING, job_key_prefix, JOB_QUEUED, JOB_MISSING)  # noqa: UP031


async def job_states(redis: ArqRedis, execution_ids: list[str]) -> str:
    """One of JOB_MISSING / JOB_QUEUED / JOB_RUNNING (marked running by arq) per id, in order."""
    if not execution_ids:
        return ""
    reply = await redis.eval(_JOB_STATES_SCRIPT, 0, *execution_ids)  # type: ignore[misc]
    return reply.decode() if isinstance(reply, bytes) else str(reply)


async def is_queued(redis: ArqRedis, execution_id: str) -> bool:
    return bool(await redis.exists(job_key_prefix + execution_id))


async def queue_length(redis: ArqRedis, service_id: str) -> int:
    return await redis.zcard(queue_name(service_id))
