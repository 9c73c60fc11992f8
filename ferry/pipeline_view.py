"""How the CLI shows a pipeline execution, and waits for one: the per-node table, the live
view of `--follow`, and the exit status once it has ended."""

from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Any

import httpx
import typer
from rich.console import Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ferry.client_commands import _check, err, out

TERMINAL = ("success", "failed", "terminated")
_COLOURS = {
    "success": "green",
    "failed": "red",
    "terminated": "yellow",
    "skipped": "dim",
    "pending": "dim",
    "created": "blue",
    "in-progress": "blue",
}
# The order a node's execution counts are shown in, from the earliest status to the last.
_COUNT_ORDER = ("created", "in-progress", "success", "failed", "terminated")
POLL_S = 1.0  # the live view's refresh: each poll is a wait that also returns at the end


def status_markup(status: str) -> str:
    return f"[{_COLOURS.get(status, 'blue')}]{status}[/]"


def duration(run: dict[str, Any]) -> str:
    if not run.get("started_at") or not run.get("ended_at"):
        return ""
    started = datetime.fromisoformat(run["started_at"])
    ended = datetime.fromisoformat(run["ended_at"])
    return f"{(ended - started).total_seconds():.1f} s"


def error_text(error: Any) -> str:
    if not error:
        return ""
    if isinstance(error, dict) and "message" in error:
        return str(error["message"])
    return json.dumps(error)


def _counts(executions: dict[str, int]) -> str:
    order = [s for s in _COUNT_ORDER if s in executions] + [
        s for s in executions if s not in _COUNT_ORDER
    ]
    return ", ".join(f"{executions[s]} {s}" for s in order if executions[s])


def node_table(run: dict[str, Any]) -> Table:
    """One row per node: its status, its executions by status, and its error."""
    table = Table("node", "type", "status", "executions", "error")
    for node in run.get("nodes") or []:
        table.add_row(
            node["node"],
            node["type"],
            status_markup(node["status"]),
            _counts(node.get("executions") or {}),
            escape(error_text(node.get("error"))),
        )
    return table


def _heading(run: dict[str, Any]) -> Text:
    took = duration(run)
    return Text.from_markup(
        f"pipeline execution {run['id']} (pipeline {run['pipeline']} version {run['version']}): "
        f"{status_markup(run['status'])}" + (f" in {took}" if took else "")
    )


def summary_view(run: dict[str, Any]) -> Group:
    return Group(_heading(run), node_table(run))


def _wait_once(client: httpx.Client, run_id: str, timeout: float) -> dict[str, Any]:
    response = client.get(f"/pipeline-executions/{run_id}/wait", params={"timeout": timeout})
    _check(response)
    return response.json()


def _left(deadline: float | None) -> float:
    return 30.0 if deadline is None else max(0.0, min(30.0, deadline - time.monotonic()))


def wait_run(client: httpx.Client, run: dict[str, Any], timeout: float | None) -> dict[str, Any]:
    """The pipeline execution once it has ended (or when `timeout` seconds have passed)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while run["status"] not in TERMINAL:
        left = _left(deadline)
        if left <= 0:
            break
        run = _wait_once(client, run["id"], left)
    return run


def follow_run(client: httpx.Client, run: dict[str, Any], timeout: float | None) -> dict[str, Any]:
    """Like `wait_run`, showing each node's status live (on stderr, so stdout keeps only the
    output) until the pipeline execution ends."""
    if not err.is_terminal:  # a log or a pipe: only the final table
        run = wait_run(client, run, timeout)
        err.print(summary_view(run))
        return run
    deadline = None if timeout is None else time.monotonic() + timeout
    with Live(summary_view(run), console=err, refresh_per_second=4) as live:
        while run["status"] not in TERMINAL:
            left = min(POLL_S, _left(deadline))
            if left <= 0:
                break
            run = _wait_once(client, run["id"], left)
            live.update(summary_view(run))
    return run


def failure_reason(client: httpx.Client, run: dict[str, Any]) -> str:
    """Why a failed pipeline execution failed: the node's own error (a fan-out over its cap,
    say), else the error of the node's latest failed execution, with that execution's id."""
    error = run.get("error") or {}
    node_id = error.get("node")
    state = next((n for n in run.get("nodes") or [] if n["node"] == node_id), None)
    if node_id is None or state is None or state.get("error"):
        return error_text(error)
    params = {"pipeline_execution": run["id"], "status": "failed", "order": "-created_at"}
    response = client.get("/executions", params={**params, "limit": 1000})
    if response.status_code != 200:
        return error_text(error)
    for execution in response.json()["items"]:
        if execution.get("pipeline_node") == node_id:
            cause = execution.get("error") or {}
            what = ": ".join(str(cause[k]) for k in ("type", "message") if cause.get(k))
            return f"{what or execution.get('reason')} (execution {execution['id']})"
    return error_text(error)


def finish(client: httpx.Client, run: dict[str, Any]) -> None:
    """Print the output of a run that ended; exit 1 naming the failed node and the reason
    when it failed."""
    status = run["status"]
    if status == "success":
        out.print_json(json.dumps(run.get("output")))
        return
    if status == "failed":
        node = (run.get("error") or {}).get("node")
        where = f" at node {node}" if node else ""
        err.print(f"[red]failed{escape(where)}:[/] {escape(failure_reason(client, run))}")
    elif status == "terminated":
        err.print("[yellow]terminated")
    else:
        err.print(f"[yellow]still {status}[/] ({run['id']})")
    raise typer.Exit(1)
