"""Redis queues: one arq queue per service, the arq job id is the execution id.

Enqueue is idempotent (a job id already queued is left alone), so the API, the reconciler
and a retrying client may all enqueue the same execution without running it twice.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from typing import Any

from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.constants import in_progress_key_prefix, job_key_prefix, result_key_prefix
from arq.jobs import serialize_job

from core.events import EVENTS_MAXLEN, EVENTS_STREAM
from core.models import format_time, utcnow

RUN_EXECUTION = "run_execution"  # the arq function name workers register
QUEUE_PREFIX = "ferry:queue:"
# Published when a queue goes from empty to non-empty: a service scaled to zero needs a
# replica now, and workers wake their placement loop instead of waiting for its next tick.
WAKE_CHANNEL = "ferry:wake"
# arq drops a job whose key expired before it ran; the reconciler re-enqueues it from
# PostgreSQL, so this only bounds how long Redis holds a job nobody consumes.
JOB_EXPIRY_MS = 7 * 24 * 3600 * 1000

# Enqueue many jobs in one round trip, each only if its id is not queued or running already
# (arq's own enqueue_job does one WATCH/MULTI round trip per job). A job may carry the fields
# of its `execution.created` event (KEYS[2] is the event stream): the event is appended in
# the same round trip, before any worker can see the job, so `created` precedes
# `in-progress` in the stream.
_ENQUEUE_SCRIPT = """
local queue = KEYS[1]
local score = ARGV[1]
local added = 0
for i = 2, #ARGV, 6 do
  local id = ARGV[i]
  if redis.call('EXISTS', ARGV[i + 1] .. id) == 0 and redis.call('EXISTS', '%s' .. id) == 0 then
    redis.call('PSETEX', ARGV[i + 1] .. id, %d, ARGV[i + 2])
    redis.call('ZADD', queue, score, id)
    added = added + 1
  end
  if ARGV[i + 4] ~= '' then
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', %d, '*', 'type', 'execution.created',
               'at', ARGV[i + 3], 'project', ARGV[i + 4], 'resource', 'execution',
               'resource_id', id, 'data', ARGV[i + 5])
  end
end
if added > 0 and redis.call('ZCARD', queue) == added then
  redis.call('PUBLISH', '%s', queue)
end
return added
""" % (result_key_prefix, JOB_EXPIRY_MS, EVENTS_MAXLEN, WAKE_CHANNEL)  # noqa: UP031 - Lua has no braces to escape


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
    created_events: Sequence[tuple[str, dict[str, Any]]] | None = None,
) -> int:
    """Queue executions of one service; returns how many were newly queued.

    `created_events`, parallel to `execution_ids`, is (project, data) of each one's
    `execution.created` event, appended to the event stream in the same round trip.
    """
    now_ms = int(time.time() * 1000)
    at = format_time(utcnow())
    argv: list[str | bytes | int] = [now_ms]
    for index, execution_id in enumerate(execution_ids):
        payload = serialize_job(RUN_EXECUTION, (execution_id,), {}, None, now_ms)
        project, data = created_events[index] if created_events else ("", None)
        argv += [execution_id, job_key_prefix, payload, at, project]
        argv.append(json.dumps(data, default=str) if project else "")
    if len(argv) == 1:
        return 0
    return await redis.eval(_ENQUEUE_SCRIPT, 2, queue_name(service_id), EVENTS_STREAM, *argv)


async def enqueue_execution(redis: ArqRedis, service_id: str, execution_id: str) -> bool:
    return await enqueue_executions(redis, service_id, [execution_id]) == 1


async def forget_job(redis: ArqRedis, service_id: str, execution_id: str) -> None:
    """Drop every trace of a job so it can be queued afresh (used when a lease expired)."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(job_key_prefix + execution_id)
        pipe.delete(in_progress_key_prefix + execution_id)
        pipe.delete(result_key_prefix + execution_id)
        pipe.zrem(queue_name(service_id), execution_id)
        await pipe.execute()


async def is_queued(redis: ArqRedis, execution_id: str) -> bool:
    return bool(await redis.exists(job_key_prefix + execution_id))


async def queue_length(redis: ArqRedis, service_id: str) -> int:
    return await redis.zcard(queue_name(service_id))
