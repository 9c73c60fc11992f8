"""The Python SDK, sync and async, against a real API server and worker: resources by name,
push/deploy/execute/wait/logs, errors carrying the API's fields, paging, and models that
match the server's OpenAPI document."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from ferry import AsyncClient, Client, models
from ferry.authoring_commands import FERRYIGNORE, TEMPLATES
from ferry.errors import InvalidInput, NotFound, Unreachable
from service.openapi import build_openapi
from service.routes import ROUTES
from tests.engine_helpers import running_worker
from tests.test_pipeline_cli import SHOUT, words  # noqa: F401 - a fixture

SLOW_CODE = """

def nap(seconds):
    import time
    print("napping")
    time.sleep(seconds)
    return seconds
"""
SLOW_MANIFEST = """
      - name: nap
        inputs: [{name: seconds, type: number}]
        outputs: [{name: slept, type: number}]
"""


def make_folder(root: Path, name: str = "hello") -> Path:
    folder = root / name
    folder.mkdir()
    for filename, content in TEMPLATES["hello"].items():
        text = content.format(name=name)
        if filename == "main.py":
            text += SLOW_CODE
        if filename == "ferry.yaml":
            marker = "          - {name: greeting, type: string}\n"
            text = text.replace(marker, marker + SLOW_MANIFEST)
        (folder / filename).write_text(text)
    (folder / ".ferryignore").write_text(FERRYIGNORE)
    return folder


def _url(api) -> str:
    return str(api.client.make_url(""))


async def test_sync_client_push_deploy_execute_logs(api, tmp_path, settings, pool, redis):
    folder = make_folder(tmp_path)

    def scenario() -> dict:
        seen: dict = {}
        with Client(_url(api), api.token) as client:
            project = client.projects.ensure("demo")
            assert client.projects.ensure("demo").id == project.id
            package = project.packages.push(folder)
            assert not package.unchanged and package.revision == 1
            again = project.packages.push(folder)
            assert again.unchanged and again.revision == 1
            service = package.deploy("hello", runtime={"min_replicas": 1})
            assert service.runtime.min_replicas == 1
            assert client.services.get("hello").id == service.id
            service.wait_ready(timeout=60)

            execution = service.execute("greet", who="ferry", times=2).wait(timeout=60)
            assert execution.status == "success"
            assert execution.output == {"greeting": "hello ferry"}
            lines = [line.text for line in execution.logs()]
            assert lines[:2] == ["hello ferry (1/2)", "hello ferry (2/2)"]

            # One round trip: the answer to the POST is the finished execution.
            quick = service.execute("greet", {"who": "quick"}, wait=30)
            assert quick.status == "success" and quick.output == {"greeting": "hello quick"}

            # Logs followed live, from before the function has finished.
            slow = service.execute("nap", seconds=0.5)
            followed = [line.text for line in slow.logs(follow=True)]
            assert followed[0] == "napping"
            assert slow.wait(timeout=30).status == "success"

            rerun = execution.rerun()
            assert rerun.rerun_of == execution.id and rerun.wait(60).status == "success"

            long = service.execute("nap", seconds=60)
            stopped = long.terminate().wait(timeout=30)
            assert stopped.status == "terminated"

            with pytest.raises(InvalidInput) as invalid:
                service.execute("greet", who=5)
            assert invalid.value.status == 422 and invalid.value.code == "invalid"
            assert invalid.value.fields == {"input.who": "expected string, got integer"}
            with pytest.raises(NotFound):
                client.services.get("nope")

            statuses = {e.id: e.status for e in client.executions.list(service=service.id)}
            seen["statuses"] = statuses
            seen["terminated"] = [e.id for e in client.executions.list(status="terminated")]
            seen["long"] = long.id
            status = service.status_report()
            assert any(r.status == "ready" for r in status.replicas)
            paused = service.pause()
            assert paused.status == "paused" and paused.resume().status == "active"
        return seen

    async with running_worker(settings, pool, redis, runtime="process", worker_id="w"):
        seen = await asyncio.wait_for(asyncio.to_thread(scenario), 120)
    assert len(seen["statuses"]) == 5  # the refused input stored nothing
    assert seen["terminated"] == [seen["long"]]


async def test_async_client(api, tmp_path, settings, pool, redis):
    folder = make_folder(tmp_path)
    async with running_worker(settings, pool, redis, runtime="process", worker_id="w"):
        async with AsyncClient(_url(api), api.token) as client:
            project = await client.projects.ensure("demo")
            package = await project.packages.push(folder)
            assert (await project.packages.push(folder)).unchanged
            service = await package.deploy("hello")
            execution = await service.execute("nap", seconds=0.3)
            lines = [line.text async for line in execution.logs(follow=True)]
            assert lines[0] == "napping"
            finished = await execution.wait(timeout=30)
            assert finished.status == "success" and finished.output == {"slept": 0.3}
            quick = await service.execute("greet", who="async", wait=30)
            assert quick.output == {"greeting": "hello async"}
            with pytest.raises(InvalidInput) as invalid:
                await service.execute("greet", times=1)
            assert "input.who" in invalid.value.fields
            ids = [e.id async for e in client.executions.list(service=service.id)]
            assert set(ids) == {execution.id, quick.id}


async def test_paging_over_a_thousand_executions(api, service):
    batch = [{"service": service["id"], "function": "noop"} for _ in range(1000)]
    for _ in range(2):
        status, body = await api.post("/api/v1/executions/batch", {"executions": batch[:550]})
        assert status == 201, body

    def count() -> tuple[int, int]:
        with Client(_url(api), api.token) as client:
            listed = [e.id for e in client.executions.list(status="created")]
            return len(listed), len(set(listed))

    assert await asyncio.to_thread(count) == (1100, 1100)
    async with AsyncClient(_url(api), api.token) as client:
        listed = [e.id async for e in client.executions.list(service=service["id"])]
    assert len(set(listed)) == 1100


async def test_post_execution_wait_bounds_and_openapi(api, service):
    status, body = await api.post(
        "/api/v1/executions?wait=1000", {"service": service["id"], "function": "noop"}
    )
    assert status == 422 and body["error"]["details"][0]["field"] == "wait"
    # No worker runs: the wait passes and the answer is the execution as it is.
    status, body = await api.post(
        "/api/v1/executions?wait=0.2", {"service": service["id"], "function": "noop"}
    )
    assert status == 201 and body["status"] == "created"

    document = build_openapi(ROUTES, "test")
    create = document["paths"]["/api/v1/executions"]["post"]
    assert [p["name"] for p in create["parameters"]] == ["wait"]
    wait = document["paths"]["/api/v1/executions/{id}/wait"]["get"]
    timeout = next(p for p in wait["parameters"] if p["name"] == "timeout")
    assert timeout["schema"]["maximum"] == 300 and "terminal" in timeout["schema"]["description"]


def test_models_match_the_openapi_document():
    schemas = build_openapi(ROUTES, "test")["components"]["schemas"]
    for model, name in models.SCHEMAS.items():
        properties = set(schemas[name]["properties"])
        assert set(model.model_fields) == properties, name
        # What the server always sends, the SDK requires (no silent default hides a rename).
        for field in schemas[name].get("required", []):
            assert model.model_fields[field].is_required(), (name, field)


def test_unreachable_is_one_error():
    with Client("http://127.0.0.1:9", "token") as client, pytest.raises(Unreachable) as error:
        client.projects.get("demo")
    assert "cannot reach http://127.0.0.1:9" in str(error.value)


@pytest.mark.usefixtures("words")
async def test_pipelines_by_name(api, project, settings, pool, redis):
    # One word: a single shout execution (what the SDK does is the subject, not fan-in).
    status, created = await api.post("/api/v1/pipelines", {**SHOUT, "project": project["id"]})
    assert status == 201, created
    status, _ = await api.post(f"/api/v1/pipelines/{created['id']}/install")
    assert status == 200

    def scenario():
        with Client(_url(api), api.token) as client:
            pipeline = client.pipelines.get("shout")
            assert pipeline.id == created["id"] and pipeline.installed
            run = pipeline.execute({"text": "sdk"})
            return run, run.wait(timeout=60)

    async with running_worker(settings, pool, redis, runtime="process", worker_id="w"):
        started, finished = await asyncio.wait_for(asyncio.to_thread(scenario), 90)
    assert started.pipeline == created["id"]
    assert finished.status == "success", finished.error
    assert finished.output == {"join": {"text": "SDK!"}}
