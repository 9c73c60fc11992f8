"""Migrations on a real PostgreSQL: numbering, fresh and old databases, concurrent starts, a
database newer than the code, and the plans of the execution list at scale.

Each test works in its own throwaway database on the test server, dropped afterwards.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from core import db, executions
from core.auth import Principal, Role

MIGRATIONS = db.load_migrations()
N = len(MIGRATIONS)


def _dsn_for(dsn: str, database: str) -> str:
    """The same server and credentials, another database."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{database}"))


@asynccontextmanager
async def scratch_database(settings) -> AsyncIterator[str]:
    """A new empty database on the test server; yields its DSN and drops it on exit."""
    name = f"ferry_mig_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(settings.database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield _dsn_for(settings.database_url, name)
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@asynccontextmanager
async def connection(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await db.connect(dsn)
    try:
        yield conn
    finally:
        await conn.close()


async def _tables(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    return {r["tablename"] for r in rows}


# --- the files -------------------------------------------------------------------------------


def test_files_are_numbered_one_to_n_without_gaps():
    names = sorted(
        entry.name
        for entry in resources.files("core.migrations").iterdir()
        if entry.name.endswith(".sql")
    )
    # load_migrations skips names that do not match; a misnamed file would silently not run.
    misnamed = [n for n in names if not re.fullmatch(r"\d{4}_[a-z0-9_]+\.sql", n)]
    assert not misnamed, f"migration files must be named NNNN_name.sql: {misnamed}"
    assert [int(n[:4]) for n in names] == list(range(1, len(names) + 1))
    assert len(MIGRATIONS) == len(names) >= 1


def test_load_order_is_version_order():
    versions = [m.version for m in MIGRATIONS]
    assert versions == sorted(versions) == list(range(1, N + 1))
    assert len({m.name for m in MIGRATIONS}) == N


def test_files_run_inside_the_migration_transaction():
    """migrate() wraps everything in one transaction: a file must not end it or need none."""
    for migration in MIGRATIONS:
        sql = re.sub(r"--[^\n]*", "", migration.sql).upper()
        for forbidden in ("BEGIN;", "COMMIT", "ROLLBACK", "CONCURRENTLY", "VACUUM"):
            assert forbidden not in sql, f"{migration.version:04d}_{migration.name}: {forbidden}"


# --- applying them ---------------------------------------------------------------------------


async def test_fresh_database_migrates_to_latest_then_nothing(settings):
    async with scratch_database(settings) as dsn, connection(dsn) as conn:
        assert await db.schema_version(conn) == 0
        assert await db.migrate(conn) == list(range(1, N + 1))
        assert await db.schema_version(conn) == N
        tables = await _tables(conn)
        assert {"projects", "executions", "schema_migrations"} <= tables
        assert await db.migrate(conn) == []
        assert await db.schema_version(conn) == N
        recorded = await conn.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
        assert [(r["version"], r["name"]) for r in recorded] == [
            (m.version, m.name) for m in MIGRATIONS
        ]


async def _seed(conn: asyncpg.Connection) -> dict[str, list[str]]:
    """A few rows in each foundation table that exists at the current version."""
    tables = await _tables(conn)
    seeded: dict[str, list[str]] = {"projects": []}
    for i in range(3):
        project_id = f"proj-{i}"
        await conn.execute(
            "INSERT INTO projects (id, name, description) VALUES ($1, $2, 'kept')",
            project_id,
            f"project-{i}",
        )
        seeded["projects"].append(project_id)
    if {"codebases", "packages", "package_revisions", "services"} <= tables:
        await conn.execute(
            "INSERT INTO codebases (sha256, size, format, data) VALUES ('abc', 3, 'zip', 'abc')"
        )
        await conn.execute(
            "INSERT INTO packages (id, project_id, name, latest_revision) "
            "VALUES ('pkg-0', 'proj-0', 'echo', 1)"
        )
        await conn.execute(
            "INSERT INTO package_revisions (package_id, revision, manifest, codebase_sha256) "
            "VALUES ('pkg-0', 1, $1, 'abc')",
            {"name": "echo", "modules": []},
        )
        await conn.execute(
            """INSERT INTO services (id, project_id, name, package_id, package_revision, module,
                   runtime, execution_timeout_s, max_attempts, on_reset)
               VALUES ('svc-0', 'proj-0', 'echo', 'pkg-0', 1, 'main', '{}', 60, 3, 'rerun')"""
        )
        seeded["packages"] = ["pkg-0"]
        seeded["services"] = ["svc-0"]
    if "executions" in tables and "services" in seeded:
        for i in range(5):
            await conn.execute(
                """INSERT INTO executions (id, project_id, service_id, function, status, input,
                       max_attempts, timeout_s)
                   VALUES ($1, 'proj-0', 'svc-0', 'echo', 'success', $2, 3, 60)""",
                f"exe-{i}",
                {"text": str(i)},
            )
        seeded["executions"] = [f"exe-{i}" for i in range(5)]
    return seeded


_OLD_VERSIONS = (
    [pytest.param(v, id=f"from-{v}") for v in range(1, N)]
    if N > 1
    else [
        pytest.param(
            None,
            marks=pytest.mark.skip(
                reason="only one migration exists: there is no older schema to upgrade from yet"
            ),
        )
    ]
)


@pytest.mark.parametrize("old_version", _OLD_VERSIONS)
async def test_an_old_database_migrates_and_keeps_its_rows(settings, old_version):
    async with scratch_database(settings) as dsn, connection(dsn) as conn:
        assert await db.migrate(conn, target=old_version) == list(range(1, old_version + 1))
        assert await db.schema_version(conn) == old_version
        seeded = await _seed(conn)
        assert await db.migrate(conn) == list(range(old_version + 1, N + 1))
        assert await db.schema_version(conn) == N
        for table, ids in seeded.items():
            found = await conn.fetch(f"SELECT id FROM {table} ORDER BY id")
            assert [r["id"] for r in found] == sorted(ids), table
        description = await conn.fetchval("SELECT description FROM projects WHERE id = 'proj-0'")
        assert description == "kept"
        if "executions" in seeded:
            row = await conn.fetchrow("SELECT input, status FROM executions WHERE id = 'exe-3'")
            assert (row["input"], row["status"]) == ({"text": "3"}, "success")


async def test_concurrent_migrations_apply_each_version_once(settings):
    async with scratch_database(settings) as dsn, connection(dsn) as one, connection(dsn) as two:
        first, second = await asyncio.gather(db.migrate(one), db.migrate(two))
        assert sorted(first + second) == list(range(1, N + 1))
        assert [] in (first, second)  # the lock holder did everything; the other found it done
        counts = await one.fetch(
            "SELECT version, count(*) AS n FROM schema_migrations GROUP BY version ORDER BY version"
        )
        assert [(r["version"], r["n"]) for r in counts] == [(v, 1) for v in range(1, N + 1)]


async def test_a_newer_database_is_refused(settings):
    async with scratch_database(settings) as dsn, connection(dsn) as conn:
        await db.migrate(conn)
        await conn.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, 'from_the_future')", N + 1
        )
        with pytest.raises(RuntimeError, match=r"(?i)upgrade Ferry"):
            await db.migrate(conn)
        # Refusing changed nothing.
        assert await db.schema_version(conn) == N + 1


# --- the execution list at scale -------------------------------------------------------------

EXECUTION_ROWS = 200_000
PROJECTS = 4
SERVICES_PER_PROJECT = 3
STATUSES = ("created", "in-progress", "success", "failed", "terminated")


class RecordingPool:
    """Runs queries on the real pool and keeps the last one, so its plan can be inspected."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.last: tuple[str, tuple[Any, ...]] | None = None

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        self.last = (sql, args)
        return await self.pool.fetch(sql, *args)


async def _fill_executions(conn: asyncpg.Connection) -> None:
    for p in range(PROJECTS):
        await conn.execute(
            "INSERT INTO projects (id, name) VALUES ($1, $2)", f"p{p}", f"project-{p}"
        )
        await conn.execute(
            "INSERT INTO packages (id, project_id, name, latest_revision) "
            "VALUES ($1, $2, 'pkg', 1)",
            f"k{p}",
            f"p{p}",
        )
        for s in range(SERVICES_PER_PROJECT):
            await conn.execute(
                """INSERT INTO services (id, project_id, name, package_id, package_revision,
                       module, runtime, execution_timeout_s, max_attempts, on_reset)
                   VALUES ($1, $2, $3, $4, 1, 'main', '{}', 60, 3, 'rerun')""",
                f"s{p}-{s}",
                f"p{p}",
                f"svc-{s}",
                f"k{p}",
            )
    # Rows spread over projects, services and statuses, one second apart, ids time-ordered.
    await conn.execute(
        """INSERT INTO executions (id, project_id, service_id, function, status, max_attempts,
               timeout_s, created_at, updated_at)
           SELECT lpad(g::text, 10, '0'),
                  'p' || (g % $2),
                  's' || (g % $2) || '-' || (g / $2 % $3),
                  'echo',
                  ($4::text[])[1 + g % 7 % 5],
                  3, 60,
                  timestamptz '2026-01-01' + g * interval '1 second',
                  timestamptz '2026-01-01' + g * interval '1 second'
           FROM generate_series(1, $1) AS g""",
        EXECUTION_ROWS,
        PROJECTS,
        SERVICES_PER_PROJECT,
        list(STATUSES),
    )
    await conn.execute("ANALYZE")


def _plan_problems(plan: str) -> list[str]:
    problems = []
    if "Seq Scan" in plan:
        problems.append("a Seq Scan")
    # A Sort node, not the "Sort Key:" of a Merge Append (several ordered walks merged).
    if re.search(r"^\s*(->\s*)?(Incremental )?Sort\b(?! Key:)", plan, re.MULTILINE):
        problems.append("a Sort of every match")
    if "Index" not in plan:
        problems.append("no index scan")
    return problems


@pytest.fixture(scope="module")
async def big_executions(settings) -> AsyncIterator[asyncpg.Pool]:
    """A throwaway database holding 200k executions, analysed."""
    async with scratch_database(settings) as dsn:
        async with connection(dsn) as conn:
            await db.migrate(conn)
            started = time.monotonic()
            await _fill_executions(conn)
            print(
                f"\n{EXECUTION_ROWS} executions inserted and analysed in "
                f"{time.monotonic() - started:.1f} s"
            )
        pool = await db.connect_pool(dsn, min_size=1, max_size=2)
        try:
            yield pool
        finally:
            await pool.close()


_ADMIN = Principal("t-admin", Role.admin, None)
_VIEWER = Principal("t-viewer", Role.viewer, "p1")  # a project token always filters by project


@pytest.mark.slow
@pytest.mark.parametrize(
    ("principal", "filters"),
    [
        pytest.param(_VIEWER, {}, id="project-token"),
        pytest.param(_ADMIN, {"project": "p2"}, id="project"),
        pytest.param(_ADMIN, {"service": "s1-2"}, id="service"),
        pytest.param(_VIEWER, {"service": "s1-1"}, id="project-token+service"),
        pytest.param(_VIEWER, {"status": "failed"}, id="project-token+status"),
        pytest.param(
            _ADMIN, {"project": "p3", "status": "created,in-progress"}, id="project+statuses"
        ),
        pytest.param(_ADMIN, {"service": "s2-0", "status": "success"}, id="service+status"),
        pytest.param(_ADMIN, {"status": "failed"}, id="status"),
        pytest.param(_ADMIN, {}, id="everything"),
    ],
)
async def test_execution_list_walks_an_index(big_executions, principal, filters):
    """GET /executions (newest first, LIMIT 51) is an index walk at 200k rows, never a Seq Scan
    and a Sort of every match: what keeps it fast at a million rows."""
    recording = RecordingPool(big_executions)
    page = await executions.list_executions(
        recording,  # type: ignore[arg-type]
        principal,
        filters=filters,
        cursor=None,
        limit=50,
        order="-created_at",
    )
    assert len(page["items"]) == 50 and page["next_cursor"]
    created = [e.created_at for e in page["items"]]
    assert created == sorted(created, reverse=True)
    assert recording.last is not None
    sql, args = recording.last
    assert re.search(r"ORDER BY created_at DESC, id DESC LIMIT \$\d+$", sql), sql
    assert args[-1] == 51
    plan = "\n".join(r[0] for r in await big_executions.fetch(f"EXPLAIN {sql}", *args))
    problems = _plan_problems(plan)
    assert not problems, f"{', '.join(problems)}:\n{sql}\n{args}\n{plan}"
