"""Per-task context for process logs: the request or execution a log line belongs to.

The API's middleware sets `request_id` and a replica sets `execution_id` for the task that
serves it; `ContextFilter` on the log handler copies whichever is set onto every record, so
the JSON formatter prints it without each call passing `extra=`.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)
execution_id: ContextVar[str | None] = ContextVar("execution_id", default=None)

_FIELDS = (("request_id", request_id), ("execution_id", execution_id))


class ContextFilter(logging.Filter):
    """Adds `request_id` / `execution_id` to a record when the emitting task has one."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in _FIELDS:
            value = var.get()
            if value is not None and not hasattr(record, name):
                setattr(record, name, value)
        return True
