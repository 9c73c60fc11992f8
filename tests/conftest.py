"""Shared fixtures: real PostgreSQL and Redis (embedded, or FERRY_TEST_DATABASE_URL /
FERRY_TEST_REDIS_URL), a clean database per test, the API in-process, and factories."""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

os.environ.setdefault("XDG_RUNTIME_DIR", tempfile.mkdtemp(prefix="ferry-xdg-"))

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from core import auth, db, queue
from core.embedded import EmbeddedStack
from core.settings import Settings
from service.app import create_app
from tests.process_helpers import workers  # noqa: F401 - a fixture the tests share

# `installation` names this test database's Ferry: workers label their containers with it, and
# their start-up clean-up touches only their own. Emptied, every test run on a shared Docker
# engine would be the same (unnamed) installation and remove the others' replicas.
_TABLES_KEPT = {"schema_migrations", "installation"}


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped: ")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Say loudly, after every other summary, how many Docker tests did not run and why:
    a green run without them has not tested the Docker runtime."""
    yield
    skipped = [
        report
        for report in terminalreporter.stats.get("skipped", [])
        if "docker" in report.keywords or "docker" in _skip_reason(report).lower()
    ]
    if not skipped:
        return
    reasons: dict[str, int] = {}
    for report in skipped:
        reasons[_skip_reason(report)] = reasons.get(_skip_reason(report), 0) + 1
    terminalreporter.write_sep("!", f"{len(skipped)} DOCKER TESTS SKIPPED", red=True, bold=True)
    for reason, count in sorted(reasons.items(), key=lambda item: -item[1]):
        terminalreporter.write_line(f"  {count} skipped: {reason}", red=True, bold=True)
    terminalreporter.write_line(
        "  The Docker runtime was NOT tested: start a Docker engine and `make image`.",
        red=True,
        bold=True,
    )


@pytest.fixture(scope="session")
def data_dir() -> Path:
    # Short: unix socket paths under it must stay below 107 bytes.
    return Path(tempfile.mkdtemp(prefix="ferry-t-"))


@pytest.fixture(scope="session")
def urls(data_dir: Path):
    database_url = os.environ.get("FERRY_TEST_DATABASE_URL")
    redis_url = os.environ.get("FERRY_TEST_REDIS_URL")
    stack = EmbeddedStack(data_dir)
    dsn, redis = stack.start(database_url, redis_url)
    yield dsn, redis
    stack.stop()


@pytest.fixture(scope="session")
def settings(urls, data_dir: Path) -> Settings:
    dsn, redis_url = urls
    return Settings(
        database_url=dsn,
        redis_url=redis_url,
        data_dir=data_dir,
        secret_key="3q2-7wX6sTkn0tQk8bYp8s1m3Vq9m0Z3o0l1y8m5w2c=",
        max_upload_mb=5,
        _env_file=None,
    )


@pytest.fixture(scope="session")
async def pool(settings: Settings):
    conn = await db.connect(settings.database_url)
    await db.migrate(conn)
    await conn.close()
    pool = await db.connect_pool(settings.database_url, max_size=20)
    yield pool
    await pool.close()


@pytest.fixture(scope="session")
async def redis(settings: Settings):
    client = await queue.connect_redis(settings.redis_url)
    yield client
    await client.aclose()


@pytest.fixture(autouse=True)
async def clean(request, pool, redis):
    """Every test starts from empty tables and an empty Redis."""
    tables = await pool.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    names = [f'"{t["tablename"]}"' for t in tables if t["tablename"] not in _TABLES_KEPT]
    if names:
        async with pool.acquire() as conn:
            # A connection a previous test left inside a transaction (a task cancelled at
            # teardown in the middle of its query) would hold its locks, and the TRUNCATE
            # below would wait for it for ever: end it, and say so.
            stuck = await conn.fetch(
                """SELECT pid, left(query, 120) AS query FROM pg_stat_activity
                   WHERE datname = current_database() AND pid <> pg_backend_pid()
                     AND state <> 'idle' AND xact_start IS NOT NULL"""
            )
            for row in stuck:
                logging.getLogger(__name__).warning(
                    "ending a connection left in a transaction by an earlier test: %s",
                    row["query"],
                )
                await conn.execute("SELECT pg_terminate_backend($1)", row["pid"])
            await conn.execute(f"TRUNCATE {', '.join(names)} CASCADE")
    await redis.flushdb()
    yield


@pytest.fixture
async def client(settings, pool, redis) -> AsyncIterator[TestClient]:
    app = create_app(settings, pool, redis, settings.database_url)
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


class Api:
    """A thin client for tests: JSON in, (status, JSON) out, with a token."""

    def __init__(self, client: TestClient, token: str | None) -> None:
        self.client = client
        self.token = token

    def as_token(self, token: str | None) -> Api:
        return Api(self.client, token)

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    async def call(self, method: str, path: str, json_body: Any = None, **kwargs: Any):
        headers = {**self._headers(), **kwargs.pop("headers", {})}
        if json_body is not None:
            kwargs["json"] = json_body
        response = await self.client.request(method, path, headers=headers, **kwargs)
        text = await response.text()
        try:
            body = json.loads(text) if text else None
        except json.JSONDecodeError:
            body = text
        return response.status, body

    async def get(self, path: str, **kwargs: Any):
        return await self.call("GET", path, **kwargs)

    async def post(self, path: str, body: Any = None, **kwargs: Any):
        return await self.call("POST", path, body, **kwargs)

    async def patch(self, path: str, body: Any = None):
        return await self.call("PATCH", path, body)

    async def delete(self, path: str, **kwargs: Any):
        return await self.call("DELETE", path, **kwargs)

    async def upload(
        self,
        project: str | None,
        archive: bytes,
        *,
        filename: str = "code.zip",
        manifest: Any = None,
        path: str = "/api/v1/packages",
    ):
        form = aiohttp.FormData()
        if project is not None:
            form.add_field("project", project)
        form.add_field("codebase", archive, filename=filename, content_type="application/zip")
        if manifest is not None:
            form.add_field(
                "manifest", manifest if isinstance(manifest, str) else json.dumps(manifest)
            )
        response = await self.client.post(path, data=form, headers=self._headers())
        return response.status, await response.json()


@pytest.fixture
async def admin_token(pool) -> str:
    created = await auth.create_token(
        pool, auth.TokenCreate(name="test admin", role=auth.Role.admin), by=None
    )
    return created.token


@pytest.fixture
async def api(client, admin_token) -> Api:
    return Api(client, admin_token)


ECHO_MANIFEST = {
    "name": "echo",
    "description": "test functions",
    "modules": [
        {
            "name": "main",
            "entry_point": "main.py",
            "functions": [
                {
                    "name": "echo",
                    "inputs": [
                        {"name": "text", "type": "string"},
                        {"name": "times", "type": "integer", "default": 1},
                    ],
                    "outputs": [{"name": "text", "type": "string"}],
                },
                {"name": "noop", "inputs": [], "outputs": []},
            ],
        }
    ],
}

ECHO_CODE = """
def echo(text, times=1):
    print("echoing", text)
    return text * times


def noop():
    return None
"""


def make_zip(files: dict[str, str | bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def echo_archive(manifest: dict | None = None, code: str = ECHO_CODE) -> bytes:
    import yaml

    return make_zip({"ferry.yaml": yaml.safe_dump(manifest or ECHO_MANIFEST), "main.py": code})


@pytest.fixture
async def project(api) -> dict:
    status, body = await api.post("/api/v1/projects", {"name": "alpha"})
    assert status == 201, body
    return body


@pytest.fixture
async def package(api, project) -> dict:
    status, body = await api.upload(project["id"], echo_archive())
    assert status == 201, body
    return body


@pytest.fixture
async def service(api, project, package) -> dict:
    status, body = await api.post(
        "/api/v1/services",
        {
            "project": project["id"],
            "name": "echo",
            "package": package["id"],
            "secrets": {"API_KEY": "s3cr3t-value"},
        },
    )
    assert status == 201, body
    return body


async def token_for(pool, role: str, project_id: str | None) -> str:
    created = await auth.create_token(
        pool,
        auth.TokenCreate(name=f"{role} token", role=auth.Role(role), project=project_id),
        by=None,
    )
    return created.token
