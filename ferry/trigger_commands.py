"""`ferry triggers create|list|get|pause|resume|delete|next`, over HTTP like the other
client commands (URL and token from the CLI config, or FERRY_URL / FERRY_TOKEN)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.table import Table

from ferry.client_commands import (
    _check,
    _client,
    _project_id,
    _resource_id,
    _service_id,
    err,
    out,
)

triggers_app = typer.Typer(help="Cron and event triggers.", no_args_is_help=True)


def _json_option(value: str | None, name: str) -> Any:
    if value is None:
        return None
    try:
        return json.loads(value)
    except ValueError as exc:
        err.print(f"[red]--{name} is not JSON:[/] {exc}")
        raise typer.Exit(2) from None


def _print(body: Any) -> None:
    out.print(json.dumps(body, indent=2))


@triggers_app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="unique in the project")],
    project: Annotated[str, typer.Option(help="project name or id")],
    service: Annotated[
        str | None, typer.Option(help="the service whose function runs (name or id)")
    ] = None,
    function: Annotated[str | None, typer.Option(help="the function to run")] = None,
    pipeline: Annotated[
        str | None, typer.Option(help="the pipeline to run (id or name) instead of a function")
    ] = None,
    cron: Annotated[str | None, typer.Option(help="cron expression: a cron trigger")] = None,
    timezone: Annotated[str, typer.Option(help="IANA time zone of the cron")] = "UTC",
    misfire: Annotated[str, typer.Option(help="skip, run-once or run-all")] = "run-once",
    start_at: Annotated[str | None, typer.Option(help="ISO time, first tick not before")] = None,
    end_at: Annotated[str | None, typer.Option(help="ISO time, last tick not after")] = None,
    resource: Annotated[str | None, typer.Option(help="event resource: an event trigger")] = None,
    action: Annotated[list[str] | None, typer.Option(help="event action (repeatable)")] = None,
    filter_: Annotated[
        str | None, typer.Option("--filter", help="JSON filter over the event's data")
    ] = None,
    mode: Annotated[str, typer.Option(help="always, or once per resource id")] = "always",
    input_: Annotated[str | None, typer.Option("--input", help="JSON static input")] = None,
    inactive: Annotated[bool, typer.Option(help="create it paused")] = False,
) -> None:
    """Create a cron trigger (--cron) or an event trigger (--resource) that runs a function
    (--service and --function) or a pipeline (--pipeline)."""
    if (cron is None) == (resource is None):
        err.print("[red]give exactly one of --cron (a cron trigger) or --resource (an event one)")
        raise typer.Exit(2)
    operation: dict[str, Any]
    if pipeline is not None and service is None and function is None:
        operation = {"type": "pipeline", "pipeline": pipeline}
    elif pipeline is None and service is not None and function is not None:
        operation = {"type": "function", "service": service, "function": function}
    else:
        err.print("[red]give either --service and --function, or --pipeline")
        raise typer.Exit(2)
    spec: dict[str, Any]
    if cron is not None:
        spec = {"cron": cron, "timezone": timezone, "misfire": misfire}
        spec.update({k: v for k, v in (("start_at", start_at), ("end_at", end_at)) if v})
    else:
        spec = {"resource": resource, "actions": action or [], "mode": mode}
        spec["filter"] = _json_option(filter_, "filter") or {}
    body = {
        "project": project,
        "name": name,
        "type": "cron" if cron is not None else "event",
        "active": not inactive,
        "input": _json_option(input_, "input") or {},
        "operation": operation,
        "spec": spec,
    }
    with _client() as client:
        body["project"] = _project_id(client, project)
        if service is not None:
            operation["service"] = _service_id(client, service, body["project"])
        response = client.post("/triggers", json=body)
        _check(response)
    _print(response.json())


@triggers_app.command("list")
def list_(
    project: Annotated[str | None, typer.Option(help="only this project (admin tokens)")] = None,
    type_: Annotated[str | None, typer.Option("--type", help="cron or event")] = None,
    service: Annotated[str | None, typer.Option(help="only triggers running this service")] = None,
    pipeline: Annotated[
        str | None, typer.Option(help="only triggers running this pipeline (id)")
    ] = None,
    active: Annotated[
        bool | None,
        typer.Option("--active/--inactive", help="only active, or only paused, triggers"),
    ] = None,
    limit: Annotated[int, typer.Option(help="how many")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """List triggers."""
    params: dict[str, Any] = {"limit": limit}
    filters = (("project", project), ("type", type_), ("service", service), ("pipeline", pipeline))
    for key, value in filters:
        if value is not None:
            params[key] = value
    if active is not None:
        params["active"] = str(active).lower()
    with _client() as client:
        response = client.get("/triggers", params=params)
        _check(response)
    items = response.json()["items"]
    if as_json:
        _print(items)
        return
    table = Table("id", "name", "type", "active", "status", "next fire", "spec")
    table.columns[0].no_wrap = True  # ids whole, to copy into the next command
    table.columns[0].min_width = 26
    for t in items:
        spec = t["spec"]
        what = spec.get("cron") or f"{spec.get('resource')} {','.join(spec.get('actions', []))}"
        table.add_row(
            t["id"],
            t["name"],
            t["type"],
            "yes" if t["active"] else "no",
            t["status"] + (f": {t['last_error']}" if t["last_error"] else ""),
            t["next_fire_at"] or "-",
            what,
        )
    out.print(table)


def _simple(method: str, trigger: str, action: str = "") -> None:
    with _client() as client:
        path = f"/triggers/{_resource_id(client, 'triggers', trigger, {})}{action}"
        response = client.request(method, path)
        _check(response)
    if response.status_code != 204:
        _print(response.json())


@triggers_app.command("get")
def get(
    trigger_id: Annotated[str, typer.Argument(metavar="NAME|ID", help="the trigger's name or id")],
) -> None:
    """Show a trigger."""
    _simple("GET", trigger_id)


@triggers_app.command("pause")
def pause(
    trigger_id: Annotated[str, typer.Argument(metavar="NAME|ID", help="the trigger's name or id")],
) -> None:
    """Stop a trigger from firing."""
    _simple("POST", trigger_id, "/pause")


@triggers_app.command("resume")
def resume(
    trigger_id: Annotated[str, typer.Argument(metavar="NAME|ID", help="the trigger's name or id")],
) -> None:
    """Let a paused trigger fire again (a cron trigger from now on)."""
    _simple("POST", trigger_id, "/resume")


@triggers_app.command("delete")
def delete(
    trigger_id: Annotated[str, typer.Argument(metavar="NAME|ID", help="the trigger's name or id")],
) -> None:
    """Delete a trigger."""
    _simple("DELETE", trigger_id)
    err.print(f"deleted {trigger_id}")


@triggers_app.command("next")
def next_(
    trigger_id: Annotated[str, typer.Argument(help="the trigger's id")],
    count: Annotated[int, typer.Option(help="how many fire times")] = 5,
) -> None:
    """Preview a cron trigger's next fire times."""
    with _client() as client:
        trigger_id = _resource_id(client, "triggers", trigger_id, {})
        response = client.get(f"/triggers/{trigger_id}/next", params={"count": count})
        _check(response)
    for time in response.json()["items"]:
        out.print(time)
