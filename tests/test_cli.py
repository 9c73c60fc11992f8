"""The CLI's client commands against a real API server (the test client's)."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime

from typer.testing import CliRunner

from ferry.cli import app
from tests.engine_helpers import running_worker, wait_for_status
from tests.stream_helpers import chatty_service


def _invoke(api, *args: str):
    env = {"FERRY_URL": str(api.client.make_url("")), "FERRY_TOKEN": api.token, "COLUMNS": "200"}
    return asyncio.to_thread(CliRunner().invoke, app, list(args), env=env)


async def test_logs_follow_events_and_executions(api, project, settings, pool, redis):
    service = await chatty_service(api, project["id"])
    async with running_worker(settings, pool, redis, runtime="process", worker_id="w"):
        status, execution = await api.post(
            "/api/v1/executions",
            {
                "service": service["id"],
                "function": "chatty",
                "input": {"n": 30, "start_after": 0.3},
            },
        )
        result = await asyncio.wait_for(_invoke(api, "logs", execution["id"], "-f"), 30)
        assert result.exit_code == 0, result.output
        lines = result.stdout.splitlines()
        assert [line.split(" t=")[0] for line in lines[:30]] == [f"line {i}" for i in range(30)]
        assert lines[30] == "all done"

        waited = await asyncio.wait_for(_invoke(api, "executions", "wait", execution["id"]), 30)
        assert waited.exit_code == 0, waited.output
        await wait_for_status(api, execution["id"])

    listed = await _invoke(api, "executions", "list")
    assert listed.exit_code == 0 and execution["id"] in listed.stdout
    got = await _invoke(api, "executions", "get", execution["id"])
    assert '"status": "success"' in got.stdout

    shown = await _invoke(api, "events", "--type", "execution.*")
    assert shown.exit_code == 0, shown.output
    types = [line.split()[1] for line in shown.stdout.splitlines()]
    assert types[:3] == ["execution.created", "execution.in-progress", "execution.success"]

    service_log = await _invoke(api, "logs", "--service", service["id"])
    assert service_log.exit_code == 0, service_log.output
    # A service's log has its executions' lines and its replica's lifecycle, each labelled;
    # an execution's log has its own lines only.
    [replica_id] = await pool.fetch("SELECT id FROM replicas WHERE service_id = $1", service["id"])
    replica_id = replica_id["id"]
    service_lines = service_log.stdout.splitlines()
    assert f"[{execution['id'][-8:]}] line 29" in [line.split(" t=")[0] for line in service_lines]
    lifecycle = [line for line in service_lines if line.startswith(f"[{replica_id[-8:]}] ")]
    assert lifecycle, service_lines
    assert lifecycle[0].split(" ", 1)[1].startswith(f"replica {replica_id} ready: "), lifecycle
    # Its lifecycle comes first: the replica was ready before the execution's first line.
    assert service_lines.index(lifecycle[0]) < min(
        i for i, line in enumerate(service_lines) if line.startswith(f"[{execution['id'][-8:]}]")
    )
    assert not [line for line in lines if line.startswith("replica ")], lines

    missing = await _invoke(api, "logs", "nope")
    assert missing.exit_code == 1


async def test_executions_show_the_cron_tick_they_were_fired_for(
    api, project, service, pool, redis
):
    from tests.test_cron import create, fired, run_schedulers, trigger_body

    trigger = await create(api, trigger_body(project, service, "ticks", {"cron": "* * * * * *"}))
    await run_schedulers(pool, redis, 2.5, count=1)
    rows = await pool.fetch(
        "SELECT id, trigger_fire_time FROM executions WHERE trigger_id = $1", trigger["id"]
    )
    assert rows and len(rows) == len(await fired(pool, trigger["id"]))
    first = rows[0]
    tick = first["trigger_fire_time"]

    status, body = await api.get(f"/api/v1/executions/{first['id']}")
    assert status == 200 and body["trigger"] == trigger["id"], body
    assert datetime.fromisoformat(body["trigger_fire_time"]) == tick

    got = await _invoke(api, "executions", "get", first["id"])
    assert got.exit_code == 0, got.output
    assert datetime.fromisoformat(json.loads(got.stdout)["trigger_fire_time"]) == tick

    listed = await _invoke(api, "executions", "list", "--trigger", trigger["id"])
    assert listed.exit_code == 0, listed.output
    assert "fired for" in listed.stdout
    row = next(line for line in listed.stdout.splitlines() if first["id"] in line)
    assert body["trigger_fire_time"] in row, (row, body)

    unfiltered = await _invoke(api, "executions", "list")
    row = next(line for line in unfiltered.stdout.splitlines() if first["id"] in line)
    assert f"{trigger['id']} @ {body['trigger_fire_time']}" in row, row

    status, manual = await api.post(
        "/api/v1/executions",
        {"service": service["id"], "function": "echo", "input": {"text": "by hand"}},
    )
    assert status == 201 and manual["trigger_fire_time"] is None, manual
