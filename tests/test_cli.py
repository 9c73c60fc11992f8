"""The CLI's client commands against a real API server (the test client's)."""

from __future__ import annotations

import asyncio

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
    assert "line 29" in service_log.stdout and "lifecycle" not in service_log.stdout

    missing = await _invoke(api, "logs", "nope")
    assert missing.exit_code == 1
