"""Riding out a lost Redis or PostgreSQL.

Both clients reconnect on their own: redis-py opens a fresh connection for the next
command after one broke, and an asyncpg pool replaces connections that died. What a Ferry
loop has to do is tell an outage from a bug (`UNAVAILABLE`), wait with a growing backoff
instead of hammering a server that is restarting, and say so once when the dependency is
lost and once when it is back (`Outage`), rather than a traceback every round.
"""

from __future__ import annotations

import logging
import time

import asyncpg
import redis.exceptions

# What a dead, restarting or unreachable server raises. redis-py's ConnectionError and
# TimeoutError derive from RedisError, not from the builtins of the same names.
REDIS_UNAVAILABLE: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
)
POSTGRES_UNAVAILABLE: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.CannotConnectNowError,  # starting up, or recovering after a crash
    asyncpg.exceptions.OperatorInterventionError,  # shut down under a live connection
    asyncpg.InterfaceError,
    # A connection whose server went away in the middle of an operation: the next query on
    # it fails in the client's state machine ("cannot switch to state …"), not on the wire.
    asyncpg.InternalClientError,
)
# OSError covers refused connections, a missing unix socket and the builtin TimeoutError.
UNAVAILABLE = REDIS_UNAVAILABLE + POSTGRES_UNAVAILABLE + (OSError,)

BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 5.0)


def dependency_of(exc: BaseException) -> str:
    """Which server an outage error came from, for messages."""
    if isinstance(exc, REDIS_UNAVAILABLE):
        return "Redis"
    if isinstance(exc, POSTGRES_UNAVAILABLE):
        return "PostgreSQL"
    # A bare OSError (connection refused, socket missing): the client that raised it says.
    tb = exc.__traceback__
    while tb is not None:
        module = tb.tb_frame.f_globals.get("__name__", "")
        if module.startswith("asyncpg"):
            return "PostgreSQL"
        if module.startswith(("redis", "arq")):
            return "Redis"
        tb = tb.tb_next
    return "Redis or PostgreSQL"


class Outage:
    """One loop's view of its dependencies: `lost(exc)` on an outage error returns how long
    to wait before trying again; `ok()` after a round that worked. Each logs one line, on
    the change only."""

    def __init__(self, what: str, logger: logging.Logger) -> None:
        self.what = what
        self.log = logger
        self.failures = 0
        self._retry_at = 0.0

    def holding_off(self) -> bool:
        """True while the last failure's backoff runs: a caller with a fallback (the outbox
        relay, the reconciler) skips the attempt rather than wait on a dead server."""
        return self.failures > 0 and time.monotonic() < self._retry_at

    def lost(self, exc: BaseException) -> float:
        if self.failures == 0:
            self.log.warning(
                "%s: %s unavailable (%s); retrying with backoff",
                self.what,
                dependency_of(exc),
                exc,
            )
        delay = BACKOFF_S[min(self.failures, len(BACKOFF_S) - 1)]
        self.failures += 1
        self._retry_at = time.monotonic() + delay
        return delay

    def ok(self) -> None:
        if self.failures:
            self.log.info("%s: reconnected after %d failed attempt(s)", self.what, self.failures)
            self.failures = 0
