"""Service secrets: refused when unusable, handed to the agent over its socket (never in the
container's environment), seen by the function's process only, masked wherever a person
reads what a replica or an execution reported."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from tests.agent_helpers import make_spec, start_replica
from tests.engine_helpers import wait_for_status
from tests.test_engine import (
    _require_docker,
    deploy,
    engine,
    fn,
    logs_of,
    manifest_of,
    run,
)
from worker.runtimes import ProcessRuntime

FIXTURES = Path(__file__).parent / "secret_fixtures"
SECRET = "s3cr3t-Tok3n-7f2a"
FUNCTIONS = [fn("read_secret", ("name", "string")), fn("leak_secret", ("name", "string"))]


@pytest.fixture(params=["process", pytest.param("docker", marks=pytest.mark.docker)])
def runtime(request) -> str:
    if request.param == "docker":
        _require_docker()
    return request.param


async def deploy_secret_service(api, project_id: str, **fields) -> dict:
    code = {"main.py": (FIXTURES / "main.py").read_text()}
    _, service = await deploy(
        api,
        project_id,
        code,
        manifest_of(FUNCTIONS),
        runtime={"memory_mb": 128, "max_replicas": 1},
        secrets={"API_TOKEN": SECRET},
        **fields,
    )
    return service


# -- refused values -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [("abc\x00def", "NUL"), ("abc", "at least 4 characters"), ("", "at least 4 characters")],
)
async def test_unusable_secret_values_are_refused_naming_the_secret(
    api, project, package, value, message
):
    body = {
        "project": project["id"],
        "name": "svc",
        "package": package["id"],
        "secrets": {"GOOD": "long-enough", "BAD_ONE": value},
    }
    status, error = await api.post("/api/v1/services", body)
    assert status == 422, error
    details = error["error"]["details"]
    assert [d["field"] for d in details] == ["secrets.BAD_ONE"], details
    assert message in details[0]["message"]
    assert value not in json.dumps(error) or not value  # the value itself is not echoed


async def test_unusable_values_are_refused_on_patch_too(api, service):
    sid = service["id"]
    status, error = await api.patch(f"/api/v1/services/{sid}", {"secrets": {"K": "a\x00bcd"}})
    assert status == 422 and error["error"]["details"][0]["field"] == "secrets.K", error
    status, error = await api.patch(f"/api/v1/services/{sid}", {"secrets": {"K": "xyz"}})
    assert status == 422 and error["error"]["details"][0]["field"] == "secrets.K", error
    status, error = await api.patch(f"/api/v1/services/{sid}", {"env": {"E": "a\x00b"}})
    assert status == 422 and error["error"]["details"][0]["field"] == "env.E", error
    status, body = await api.patch(f"/api/v1/services/{sid}", {"secrets": {"API_KEY": None}})
    assert status == 200 and body["secrets"] == [], body  # removal needs no value


# -- where the value goes -----------------------------------------------------------------


async def test_the_secrets_frame_reaches_each_child_and_only_strings_are_taken(tmp_path):
    runtime = ProcessRuntime()
    replica = await start_replica(runtime, make_spec(tmp_path / "run", env={"PLAIN": "p"}))
    try:
        before = await replica.call("environment", name="API_TOKEN")
        await replica.conn.send_secrets({"API_TOKEN": SECRET, "PLAIN": "overridden"})
        seen = await replica.call("environment", name="API_TOKEN")
        plain = await replica.call("environment", name="PLAIN")
        await replica.conn.send_secrets({"API_TOKEN": 12345})  # type: ignore[dict-item]
        kept = await replica.call("environment", name="API_TOKEN")
        agent_env = await asyncio.to_thread(Path(f"/proc/{replica.handle.ref}/environ").read_bytes)
    finally:
        await replica.close()
    assert before.outcome is not None and before.outcome.output["value"] is None
    assert seen.outcome is not None and seen.outcome.output["value"] == SECRET
    assert plain.outcome is not None and plain.outcome.output["value"] == "overridden"
    assert kept.outcome is not None and kept.outcome.output["value"] == SECRET
    assert SECRET.encode() not in agent_env


async def test_the_function_sees_the_secret_and_the_engine_does_not(
    api, project, settings, pool, redis, runtime
):
    service = await deploy_secret_service(api, project["id"], env={"PLAIN": "visible"})
    async with engine(settings, pool, redis, runtime) as host:
        done = await run(api, service["id"], "read_secret", {"name": "API_TOKEN"})
        plain = await run(api, service["id"], "read_secret", {"name": "PLAIN"})
        (replica,) = host.replicas.values()
        if runtime == "docker":
            import docker

            client = docker.from_env()
            try:
                inspected = client.api.inspect_container(replica.handle.ref)
            finally:
                client.close()
            assert "PLAIN=visible" in inspected["Config"]["Env"]  # env is not a secret
            assert SECRET not in json.dumps(inspected)
            assert not [e for e in inspected["Config"]["Env"] if e.startswith("API_TOKEN=")]
        else:
            environ = Path(f"/proc/{replica.handle.ref}/environ")
            agent_env = await asyncio.to_thread(environ.read_bytes)
            assert SECRET.encode() not in agent_env and b"PLAIN=visible" in agent_env
        config = await asyncio.to_thread((replica.handle.run_dir / "config.json").read_text)
        assert SECRET not in config

    assert done["status"] == "success", done
    # The forked child has it; the agent, its parent, does not.
    assert done["output"] == {"length": len(SECRET), "agent_has_it": False}
    assert plain["output"] == {"length": len("visible"), "agent_has_it": True}
    assert ("stdout", "the value is ********") in await logs_of(api, done["id"])


async def test_secrets_are_masked_in_execution_errors(api, project, settings, pool, redis):
    service = await deploy_secret_service(api, project["id"])
    async with engine(settings, pool, redis, "process"):
        failed = await run(api, service["id"], "leak_secret", {"name": "API_TOKEN"})
    assert (failed["status"], failed["reason"]) == ("failed", "exception"), failed
    assert failed["error"]["message"] == "could not log in with ********"
    assert SECRET not in failed["error"]["traceback"]
    assert "could not log in with ********" in failed["error"]["traceback"]
    stored = await pool.fetchval(
        "SELECT error::text FROM execution_attempts WHERE execution_id = $1", failed["id"]
    )
    assert SECRET not in stored


async def test_secrets_are_masked_in_replica_errors_and_lifecycle_lines(
    api, project, settings, pool, redis, caplog
):
    # The module fails at import with the secret's value in its message (as a client library
    # repeating a bad credential would): every line a viewer reads has it masked.
    code = {"main.py": f"raise RuntimeError('login refused for {SECRET}')\n"}
    _, service = await deploy(
        api,
        project["id"],
        code,
        manifest_of(FUNCTIONS),
        runtime={"max_replicas": 1},
        secrets={"API_TOKEN": SECRET},
    )
    status, created = await api.post(
        "/api/v1/executions",
        {"service": service["id"], "function": "read_secret", "input": {"name": "API_TOKEN"}},
    )
    assert status == 201, created
    async with engine(settings, pool, redis, "process", replica_start_attempts=1):
        failed = await wait_for_status(api, created["id"], timeout_s=60)

    assert (failed["status"], failed["reason"]) == ("failed", "replica-failed"), failed
    assert "login refused for ********" in failed["error"]["message"], failed
    messages = await pool.fetch(
        "SELECT message FROM replicas WHERE service_id = $1 AND status = 'failed'", service["id"]
    )
    assert messages and all("login refused for ********" in r["message"] for r in messages)
    assert not [r for r in messages if SECRET in r["message"]]
    status, body = await api.get(f"/api/v1/services/{service['id']}/logs?stream=lifecycle")
    assert status == 200, body
    lifecycle = [line["text"] for line in body["items"]]
    assert any("login refused for ********" in text for text in lifecycle), lifecycle
    assert not [text for text in lifecycle if SECRET in text]
    assert SECRET not in json.dumps(failed)
    assert not [r for r in caplog.records if SECRET in r.getMessage()]  # the worker's own log
