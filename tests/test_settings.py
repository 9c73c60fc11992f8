"""Every setting is real: read somewhere by the code, and listed in the README's settings table."""

from __future__ import annotations

import functools
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from core.settings import Settings
from service.app import create_app
from tests.conftest import Api, echo_archive

ROOT = Path(__file__).resolve().parent.parent
CODE_PACKAGES = ("core", "service", "worker", "scheduler", "ferry")
# `settings.name`, `self.settings.name`, `request.app[SETTINGS].name`, …
SETTING_READ = re.compile(r"(?:settings|SETTINGS\])\.(\w+)")


@functools.cache
def _settings_read_by_code() -> dict[str, list[str]]:
    reads: dict[str, list[str]] = {}
    for package in CODE_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == ROOT / "core" / "settings.py":
                continue
            for match in SETTING_READ.finditer(path.read_text()):
                reads.setdefault(match.group(1), []).append(str(path.relative_to(ROOT)))
    return reads


@functools.cache
def _readme_settings_table() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    return "\n".join(line for line in section.splitlines() if line.startswith("|"))


SETTINGS = sorted(Settings.model_fields)


def test_the_settings_are_found() -> None:
    assert "database_url" in SETTINGS and "lease_s" in SETTINGS
    readers = {path for paths in _settings_read_by_code().values() for path in paths}
    assert "core/settings.py" not in readers
    assert "worker/host.py" in readers


@pytest.mark.parametrize("name", SETTINGS)
def test_every_setting_is_read_by_the_code(name: str) -> None:
    assert name in _settings_read_by_code(), (
        f"FERRY_{name.upper()} is defined in core/settings.py but never read by "
        f"{', '.join(CODE_PACKAGES)}"
    )


@pytest.mark.parametrize("name", SETTINGS)
def test_every_setting_is_in_the_readme_table(name: str) -> None:
    variable = f"`FERRY_{name.upper()}`"
    assert variable in _readme_settings_table(), (
        f"{variable} is missing from README.md's settings table"
    )


@pytest.fixture
async def tight_api(settings, pool, redis, admin_token) -> AsyncIterator[Api]:
    tight = settings.model_copy(
        update={
            "list_default_limit": 2,
            "list_max_limit": 3,
            "batch_max": 2,
            "default_execution_timeout_s": 77,
        }
    )
    app = create_app(tight, pool, redis, tight.database_url)
    async with TestClient(TestServer(app)) as client:
        yield Api(client, admin_token)


async def test_list_limits_come_from_the_settings(tight_api: Api) -> None:
    for name in ("p1", "p2", "p3", "p4"):
        status, _ = await tight_api.post("/api/v1/projects", {"name": name})
        assert status == 201
    status, page = await tight_api.get("/api/v1/projects")
    assert status == 200 and len(page["items"]) == 2 and page["next_cursor"]
    status, page = await tight_api.get("/api/v1/projects?limit=3")
    assert status == 200 and len(page["items"]) == 3
    status, error = await tight_api.get("/api/v1/projects?limit=4")
    assert status == 422
    assert error["error"]["details"][0]["field"] == "limit"


async def test_service_and_batch_defaults_come_from_the_settings(tight_api: Api) -> None:
    status, project = await tight_api.post("/api/v1/projects", {"name": "alpha"})
    assert status == 201
    status, package = await tight_api.upload(project["id"], echo_archive())
    assert status == 201
    body = {"project": project["id"], "name": "echo", "package": package["id"]}
    status, service = await tight_api.post("/api/v1/services", body)
    assert status == 201 and service["execution_timeout_s"] == 77
    status, service = await tight_api.post(
        "/api/v1/services", {**body, "name": "echo-2", "execution_timeout_s": 5}
    )
    assert status == 201 and service["execution_timeout_s"] == 5
    one = {"service": service["id"], "function": "noop"}
    status, error = await tight_api.post("/api/v1/executions/batch", {"executions": [one] * 3})
    assert status == 422 and error["error"]["details"][0]["field"] == "executions"
