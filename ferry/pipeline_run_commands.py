"""`ferry pipeline-executions list|get|resume|terminate|logs`, over HTTP like the other
client commands."""

from __future__ import annotations

import json
from typing import Annotated, Any

import httpx
import typer
from rich.markup import escape
from rich.table import Table

from ferry.client_commands import _check, _client, _stream, err, out, print_line, unreachable
from ferry.pipeline_commands import resolve_pipeline
from ferry.pipeline_view import (
    duration,
    error_text,
    failure_reason,
    finish,
    follow_run,
    status_markup,
    summary_view,
    wait_run,
)

runs_app = typer.Typer(
    help="Pipeline executions: list, inspect, resume, terminate, logs.", no_args_is_help=True
)


@runs_app.command("list")
def list_(
    pipeline: Annotated[str | None, typer.Option(help="a pipeline's name or id")] = None,
    status: Annotated[str | None, typer.Option(help="statuses, comma-separated")] = None,
    project: Annotated[str | None, typer.Option(help="project id")] = None,
    limit: Annotated[int, typer.Option(help="how many")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """The latest pipeline executions."""
    params: dict[str, Any] = {"limit": limit}
    if project:
        params["project"] = project
    if status:
        params["status"] = status
    with _client() as client:
        if pipeline:
            params["pipeline"] = resolve_pipeline(client, pipeline, project)["id"]
        response = client.get("/pipeline-executions", params=params)
        _check(response)
    items = response.json()["items"]
    if as_json:
        out.print_json(json.dumps(items))
        return
    table = Table("id", "pipeline", "version", "status", "created", "duration", "error")
    table.columns[0].no_wrap = True  # ids whole, to copy into the next command
    table.columns[0].min_width = 26
    for run in items:
        error = run.get("error") or {}
        table.add_row(
            run["id"],
            run["pipeline"],
            str(run["version"]),
            status_markup(run["status"]),
            run["created_at"],
            duration(run),
            escape(f"{error.get('node')}: {error_text(error)}") if error else "",
        )
    out.print(table)


def _get(client: httpx.Client, run_id: str) -> dict[str, Any]:
    response = client.get(f"/pipeline-executions/{run_id}")
    _check(response)
    return response.json()


@runs_app.command("get")
def get(
    run_id: Annotated[str, typer.Argument(metavar="ID", help="the pipeline execution's id")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """A pipeline execution: each node's status, then its output or error."""
    with _client() as client:
        run = _get(client, run_id)
        if as_json:
            out.print_json(json.dumps(run))
            return
        out.print(summary_view(run))
        if run["status"] == "success":
            out.print("output:")
            out.print_json(json.dumps(run.get("output")))
        elif run["status"] == "failed" and run.get("error"):
            node = run["error"].get("node")
            out.print(f"[red]failed at node {node}:[/] {escape(failure_reason(client, run))}")


@runs_app.command("resume")
def resume(
    run_id: Annotated[str, typer.Argument(metavar="ID", help="the pipeline execution's id")],
    from_failed: Annotated[
        bool, typer.Option("--from-failed", help="rerun the failed nodes and what follows")
    ] = False,
    node: Annotated[
        list[str] | None, typer.Option("--node", help="rerun from this node (repeatable)")
    ] = None,
    wait: Annotated[bool, typer.Option(help="wait for the end, print the output")] = False,
    follow: Annotated[
        bool, typer.Option(help="show each node's status live until the end")
    ] = False,
) -> None:
    """Run a failed or terminated pipeline execution again from its failed nodes, or from
    given nodes; the outputs of the nodes upstream are reused."""
    if from_failed == bool(node):
        err.print("[red]give exactly one of --from-failed or --node N (repeatable)")
        raise typer.Exit(2)
    body: dict[str, Any] = {"from": "failed"} if from_failed else {"nodes": node}
    try:
        with _client(timeout=None if (wait or follow) else 30.0) as client:
            response = client.post(f"/pipeline-executions/{run_id}/resume", json=body)
            _check(response)
            run = response.json()
            if not (wait or follow):
                err.print(f"resumed {run['id']}: {run['status']}")
                return
            run = (follow_run if follow else wait_run)(client, run, None)
            finish(client, run)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except httpx.HTTPError as exc:
        unreachable(exc)
        raise typer.Exit(1) from None


@runs_app.command("terminate")
def terminate(
    run_id: Annotated[str, typer.Argument(metavar="ID", help="the pipeline execution's id")],
) -> None:
    """Stop a pipeline execution: running node executions are terminated, none start."""
    with _client() as client:
        response = client.post(f"/pipeline-executions/{run_id}/terminate")
        _check(response)
    err.print(f"terminating {run_id}: {response.json()['status']}")


def _print_tagged(line: dict[str, Any]) -> None:
    execution = line.get("execution") or ""
    print_line(line, prefix=f"[{line.get('node')} {execution[-8:]}] ")


@runs_app.command("logs")
def logs(
    run_id: Annotated[str, typer.Argument(metavar="ID", help="the pipeline execution's id")],
    follow: Annotated[bool, typer.Option("-f", "--follow", help="keep streaming")] = False,
) -> None:
    """Every node's log lines, each tagged with its node and execution; -f follows until the
    pipeline execution ends."""
    path = f"/pipeline-executions/{run_id}/logs"
    try:
        with _client(timeout=None if follow else 30.0) as client:
            if follow:
                for event in _stream(client, path, {"follow": "true"}):
                    if event["event"] == "log":
                        _print_tagged(event["data"])
                    elif event["event"] == "end":
                        data = event["data"]
                        status = data.get("status") if isinstance(data, dict) else None
                        if status and status != "success":
                            err.print(f"[yellow]pipeline execution {status}[/]")
                        return
                return
            params: dict[str, Any] = {"limit": 1000}
            while True:
                response = client.get(path, params=params)
                _check(response)
                page = response.json()
                for line in page["items"]:
                    _print_tagged(line)
                # next_cursor is a position (a follower resumes from it), never null: a short
                # page is the last one.
                if len(page["items"]) < params["limit"] or not page.get("next_cursor"):
                    return
                params["cursor"] = page["next_cursor"]
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except httpx.HTTPError as exc:
        unreachable(exc)
        raise typer.Exit(1) from None
