"""Ferry's event stream: every status change, kept in one bounded Redis stream.

Entries are `{type, at, project, resource, resource_id, data}`; the stream id is the
event id clients resume from (`Last-Event-ID`).
"""

from __future__ import annotations

import json
from typing import Any

from redis.asyncio import Redis

from core.models import format_time, utcnow

EVENTS_STREAM = "ferry:events"
EVENTS_MAXLEN = 100_000  # approximate: trimming whole nodes keeps XADD O(1)
TERMINATE_CHANNEL = "ferry:terminate"  # pub/sub: execution ids whose termination was asked
# A service's log: its executions' lines and its replicas' lifecycle, for `…/services/{id}/logs`.
SERVICE_LOGS_MAXLEN = 50_000
SERVICE_LOGS_TTL_S = 7 * 24 * 3600


def log_stream_key(execution_id: str) -> str:
    """An execution's live log lines (the worker's log sink writes, followers read)."""
    return f"ferry:logs:{execution_id}"


def service_logs_key(service_id: str) -> str:
    return f"ferry:service-logs:{service_id}"


async def service_lifecycle(
    redis: Redis, service_id: str, replica_id: str, status: str, message: str | None
) -> None:
    """One `lifecycle` line in the service's log: a replica started, got ready, drained..."""
    text = f"replica {replica_id} {status}" + (f": {message}" if message else "")
    key = service_logs_key(service_id)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.xadd(
            key,
            {
                "execution": "",
                "replica": replica_id,
                "seq": 0,
                "at": format_time(utcnow()),
                "stream": "lifecycle",
                "text": text,
            },
            maxlen=SERVICE_LOGS_MAXLEN,
            approximate=True,
        )
        pipe.expire(key, SERVICE_LOGS_TTL_S)
        await pipe.execute()


def event_fields(
    type_: str, project: str, resource: str, resource_id: str, data: dict[str, Any] | None = None
) -> dict[str, str]:
    return {
        "type": type_,
        "at": format_time(utcnow()),
        "project": project,
        "resource": resource,
        "resource_id": resource_id,
        "data": json.dumps(data or {}, default=str),
    }


async def publish(
    redis: Redis,
    type_: str,
    project: str,
    resource: str,
    resource_id: str,
    data: dict[str, Any] | None = None,
) -> str:
    event_id = await redis.xadd(
        EVENTS_STREAM,
        event_fields(type_, project, resource, resource_id, data),  # type: ignore[arg-type]
        maxlen=EVENTS_MAXLEN,
        approximate=True,
    )
    return event_id.decode() if isinstance(event_id, bytes) else event_id
