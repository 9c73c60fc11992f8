"""PostgreSQL access: the asyncpg pool and versioned migrations.

Migrations are the ordered files in `core/migrations/NNNN_name.sql`. They are applied at
start inside one transaction under an advisory lock, so any number of processes may start
at once and exactly one migrates.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources

import asyncpg

log = logging.getLogger(__name__)

# Any constant works; it only has to be the same in every Ferry process.
MIGRATION_LOCK_ID = 0x46455252  # "FERR"
_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def load_migrations() -> list[Migration]:
    """The migrations shipped with this version of Ferry, in order."""
    found = []
    for entry in resources.files("core.migrations").iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migration versions must be 1..N without gaps, found {versions}")
    return found


async def _init_connection(conn: asyncpg.Connection) -> None:
    for type_name in ("json", "jsonb"):
        await conn.set_type_codec(
            type_name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
        )


async def _reset_cheaply(conn: asyncpg.Connection) -> None:
    """Ferry keeps no session state on pooled connections (LISTEN has its own connection,
    advisory locks are transaction-scoped), so asyncpg's default reset query on every
    release is a wasted round trip on the hot path; only an abandoned transaction needs
    undoing."""
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


async def connect_pool(dsn: str, *, min_size: int = 2, max_size: int = 10) -> asyncpg.Pool:
    return await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        init=_init_connection,
        reset=_reset_cheaply,
        command_timeout=60,
    )


async def connect(dsn: str) -> asyncpg.Connection:
    conn = await asyncpg.connect(dsn)
    await _init_connection(conn)
    return conn


async def migrate(conn: asyncpg.Connection, target: int | None = None) -> list[int]:
    """Apply pending migrations up to `target` (default: all); returns the versions applied."""
    applied: list[int] = []
    async with conn.transaction():
        # Transaction-scoped, so a crash mid-migration releases it with the rollback.
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_ID)
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version    integer PRIMARY KEY,
                   name       text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        current = await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_migrations")
        known = load_migrations()
        if current > len(known):
            raise RuntimeError(
                f"the database is at schema version {current}, newer than this Ferry "
                f"({len(known)}); upgrade Ferry before running it against this database"
            )
        for migration in known:
            if migration.version <= current or (target is not None and migration.version > target):
                continue
            log.info("applying migration %04d_%s", migration.version, migration.name)
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                migration.version,
                migration.name,
            )
            applied.append(migration.version)
    return applied


async def schema_version(conn: asyncpg.Connection) -> int:
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return 0
    return await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_migrations")


@asynccontextmanager
async def transaction(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    async with pool.acquire() as conn, conn.transaction():
        yield conn
