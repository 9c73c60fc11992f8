"""Triggers through the API: create, validate, list filters, patch, pause, preview, delete."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime

from tests.conftest import token_for


def cron_body(project, service, **overrides):
    body = {
        "project": project["id"],
        "name": "nightly",
        "type": "cron",
        "input": {"text": "tick"},
        "operation": {"type": "function", "service": service["id"], "function": "echo"},
        "spec": {"cron": "0 3 * * *", "timezone": "Europe/Berlin"},
    }
    body.update(overrides)
    return body


async def test_create_get_list_patch_delete(api, project, service):
    status, trigger = await api.post("/api/v1/triggers", cron_body(project, service))
    assert status == 201, trigger
    assert trigger["type"] == "cron" and trigger["active"] and trigger["status"] == "ok"
    assert (
        trigger["spec"]["misfire"] == "run-once" and trigger["spec"]["timezone"] == "Europe/Berlin"
    )
    assert trigger["operation"] == {
        "type": "function",
        "service": service["id"],
        "function": "echo",
    }
    assert trigger["next_fire_at"].endswith("Z")
    tid = trigger["id"]
    assert (await api.get(f"/api/v1/triggers/{tid}"))[1]["id"] == tid
    assert (await api.post("/api/v1/triggers", cron_body(project, service)))[0] == 409

    status, page = await api.get(f"/api/v1/triggers?project={project['id']}&type=cron")
    assert status == 200 and [t["id"] for t in page["items"]] == [tid]
    assert (await api.get("/api/v1/triggers?type=event"))[1]["items"] == []
    assert (await api.get(f"/api/v1/triggers?service={service['id']}"))[1]["items"][0]["id"] == tid
    assert (await api.get("/api/v1/triggers?type=nope"))[0] == 422

    status, paused = await api.post(f"/api/v1/triggers/{tid}/pause")
    assert status == 200 and paused["active"] is False
    assert (await api.get("/api/v1/triggers?active=false"))[1]["items"][0]["id"] == tid
    assert (await api.get("/api/v1/triggers?active=true"))[1]["items"] == []
    status, resumed = await api.post(f"/api/v1/triggers/{tid}/resume")
    assert resumed["active"] is True

    status, patched = await api.patch(
        f"/api/v1/triggers/{tid}", {"spec": {"cron": "*/5 * * * *"}, "input": {"text": "x"}}
    )
    assert status == 200, patched
    assert patched["spec"]["cron"] == "*/5 * * * *" and patched["spec"]["timezone"] == "UTC"
    assert patched["input"] == {"text": "x"}
    status, body = await api.patch(f"/api/v1/triggers/{tid}", {"spec": {"cron": "nope"}})
    assert status == 422 and body["error"]["details"][0]["field"] == "spec.cron"

    status, preview = await api.get(f"/api/v1/triggers/{tid}/next?count=3")
    assert status == 200 and len(preview["items"]) == 3
    times = [datetime.fromisoformat(t) for t in preview["items"]]
    assert all(t.minute % 5 == 0 and t.second == 0 for t in times)
    assert times == sorted(times)

    assert (await api.delete(f"/api/v1/triggers/{tid}"))[0] == 204
    assert (await api.get(f"/api/v1/triggers/{tid}"))[0] == 404


async def test_validation_names_the_field(api, project, service):
    base = cron_body(project, service)
    cases = [
        ({"spec": {"cron": "61 * * * *"}}, "spec.cron"),
        ({"spec": {"cron": "* * *"}}, "spec.cron"),
        ({"spec": {"cron": "* * * * *", "timezone": "Mars/Olympus"}}, "spec.timezone"),
        ({"spec": {"cron": "* * * * *", "misfire": "later"}}, "spec.misfire"),
        ({"spec": {"cron": "* * * * *", "end_at": "2020-01-01T00:00:00"}}, "spec.end_at"),
        (
            {"operation": {"type": "function", "service": "nope", "function": "echo"}},
            "operation.service",
        ),
        (
            {"operation": {"type": "function", "service": service["id"], "function": "nope"}},
            "operation.function",
        ),
        ({"operation": {"type": "pipeline", "pipeline": "p"}}, "operation.pipeline"),
        ({"operation": {"type": "workflow", "pipeline": "p"}}, "operation"),
        ({"input": {"txt": "typo"}}, "input.txt"),
        ({"input": {"text": 5}}, "input.text"),
        (
            {"type": "event", "spec": {"resource": "item", "filter": {"$foo": 1}}},
            "spec.filter.$foo",
        ),
        (
            {"type": "event", "spec": {"resource": "item", "filter": {"a": {"$regex": "("}}}},
            "spec.filter.a.$regex",
        ),
        ({"type": "event", "spec": {"resource": "item", "mode": "twice"}}, "spec.mode"),
        # echo has no `event` input, so it cannot be an event trigger's function.
        ({"type": "event", "spec": {"resource": "item"}}, "operation.function"),
        ({"name": "Bad Name"}, "name"),
    ]
    for extra, field in cases:
        status, body = await api.post("/api/v1/triggers", {**base, **extra})
        assert status == 422, (extra, body)
        assert body["error"]["details"][0]["field"] == field, (extra, body)


async def test_other_projects_see_nothing(api, pool, project, service):
    status, trigger = await api.post("/api/v1/triggers", cron_body(project, service))
    status, other = await api.post("/api/v1/projects", {"name": "beta"})
    outsider = api.as_token(await token_for(pool, "owner", other["id"]))
    tid = trigger["id"]
    assert (await outsider.get(f"/api/v1/triggers/{tid}"))[0] == 404
    assert (await outsider.patch(f"/api/v1/triggers/{tid}", {"active": False}))[0] == 404
    assert (await outsider.delete(f"/api/v1/triggers/{tid}"))[0] == 404
    assert (await outsider.get(f"/api/v1/triggers/{tid}/next"))[0] == 404
    assert (await outsider.get("/api/v1/triggers"))[1]["items"] == []
    # Nor may a trigger in another project target this project's service.
    status, body = await outsider.post("/api/v1/triggers", cron_body(other, service, name="sneaky"))
    assert status == 422 and body["error"]["details"][0]["field"] == "operation.service"
    viewer = api.as_token(await token_for(pool, "viewer", project["id"]))
    assert (await viewer.get(f"/api/v1/triggers/{tid}"))[0] == 200
    assert (await viewer.post(f"/api/v1/triggers/{tid}/pause"))[0] == 403


async def test_end_at_in_the_past_is_finished(api, project, service):
    body = cron_body(
        project,
        service,
        spec={
            "cron": "* * * * *",
            "start_at": "2020-01-01T00:00:00Z",
            "end_at": "2020-01-02T00:00:00Z",
        },
    )
    status, trigger = await api.post("/api/v1/triggers", body)
    assert status == 201 and trigger["status"] == "finished" and trigger["next_fire_at"] is None
    assert (await api.get(f"/api/v1/triggers/{trigger['id']}/next"))[1]["items"] == []


async def test_cli_round_trip(api, client, admin_token, project, service, monkeypatch):
    from typer.testing import CliRunner

    from ferry.cli import app

    monkeypatch.setenv("FERRY_URL", str(client.make_url("")).rstrip("/"))
    monkeypatch.setenv("FERRY_TOKEN", admin_token)
    runner = CliRunner()

    async def ferry(*args: str):
        result = await asyncio.to_thread(runner.invoke, app, ["triggers", *args])
        assert result.exit_code == 0, result.output
        return result.output

    created = json.loads(
        await ferry(
            "create", "every-five", "--project", project["id"], "--service", service["id"],
            "--function", "echo", "--cron", "*/5 * * * *", "--timezone", "Europe/Berlin",
            "--input", '{"text": "hi"}',
        )
    )  # fmt: skip
    tid = created["id"]
    assert created["spec"]["cron"] == "*/5 * * * *" and created["input"] == {"text": "hi"}
    assert "every-five" in await ferry("list", "--project", project["id"])
    assert len((await ferry("next", tid, "--count", "3")).split()) == 3
    assert json.loads(await ferry("pause", tid))["active"] is False
    assert json.loads(await ferry("resume", tid))["active"] is True
    await ferry("delete", tid)
    assert (await api.get(f"/api/v1/triggers/{tid}"))[0] == 404
