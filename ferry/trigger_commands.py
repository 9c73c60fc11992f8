"""`ferry triggers create|list|get|pause|resume|delete|next`, over HTTP like the other
client commands (URL and token from the CLI config, or FERRY_URL / FERRY_TOKEN)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.table import Table

from ferry.client_commands import _check, _client, err, out

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
    project: Annotated[str, typer.Option(help="project id")],
    service: Annotated[str, typer.Option(help="the service whose function runs")],
    function: Annotated[str, typer.Option(help="the function to run")],
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
    """Create a cron trigger (--cron) or an event trigger (--resource)."""
    if (cron is None) == (resource is None):
        err.print("[red]give exactly one of --cron (a cron trigger) or --resource (an event one)")
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
        "operation": {"type": "function", "service": service, "function": function},
        "spec": spec,
    }
    with _client() as client:
        response = client.post("/triggers", json=body)
        _check(response)
    _print(response.json())


@triggers_app.command("list")
def list_(
    project: Annotated[str | None, typer.Option()] = None,
    type_: Annotated[str | None, typer.Option("--type", help="cron or event")] = None,
    service: Annotated[str | None, typer.Option()] = None,
    active: Annotated[bool | None, typer.Option("--active/--inactive")] = None,
    limit: Annotated[int, typer.Option()] = 50,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List triggers."""
    params: dict[str, Any] = {"limit": limit}
    for key, value in (("project", project), ("type", type_), ("service", service)):
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


def _simple(method: str, path: str) -> None:
    with _client() as client:
        response = client.request(method, path)
        _check(response)
    if response.status_code != 204:
        _print(response.json())


@triggers_app.command("get")
def get(trigger_id: str) -> None:
    """Show a trigger."""
    _simple("GET", f"/triggers/{trigger_id}")


@triggers_app.command("pause")
def pause(trigger_id: str) -> None:
    """Stop a trigger from firing."""
    _simple("POST", f"/triggers/{trigger_id}/pause")


@triggers_app.command("resume")
def resume(trigger_id: str) -> None:
    """Let a paused trigger fire again (a cron trigger from now on)."""
    _simple("POST", f"/triggers/{trigger_id}/resume")


@triggers_app.command("delete")
def delete(trigger_id: str) -> None:
    """Delete a trigger."""
    _simple("DELETE", f"/triggers/{trigger_id}")
    err.print(f"deleted {trigger_id}")


@triggers_app.command("next")
def next_(
    trigger_id: str, count: Annotated[int, typer.Option(help="how many fire times")] = 5
) -> None:
    """Preview a cron trigger's next fire times."""
    with _client() as client:
        response = client.get(f"/triggers/{trigger_id}/next", params={"count": count})
        _check(response)
    for time in response.json()["items"]:
        out.print(time)
