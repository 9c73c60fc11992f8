"""CLI commands that talk HTTP to a running Ferry: `ferry logs`, `ferry events`,
`ferry executions list|get|wait`.

The API's URL and token come from the CLI config (`ferry up` writes it); `FERRY_URL` and
`FERRY_TOKEN` override it. Live output is Server-Sent Events, read with httpx-sse.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Annotated, Any
from urllib.parse import quote

import httpx
import typer
from httpx_sse import connect_sse
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ferry.config import read_config

out = Console(highlight=False, soft_wrap=True)
if not out.is_terminal:  # piped or captured: tables at full width rather than squeezed into 80
    out = Console(highlight=False, soft_wrap=True, width=200)
err = Console(stderr=True, highlight=False)

executions_app = typer.Typer(help="List, inspect and wait for executions.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.command("logs")(logs)
    app.command("events")(events)
    app.add_typer(executions_app, name="executions")


def _client(timeout: float | None = 30.0) -> httpx.Client:
    config = read_config()
    url = os.environ.get("FERRY_URL") or config.get("url")
    token = os.environ.get("FERRY_TOKEN") or config.get("token")
    if not url or not token:
        err.print("[red]no Ferry to talk to:[/] run `ferry up`, or set FERRY_URL and FERRY_TOKEN")
        raise typer.Exit(2)
    return httpx.Client(
        base_url=url.rstrip("/") + "/api/v1",
        headers={"Authorization": f"Bearer {token}"},
        timeout=httpx.Timeout(timeout, connect=10.0),
    )


def unreachable(exc: Exception) -> None:
    """One line for a Ferry that does not answer, then exit 1."""
    from ferry.config import connection

    url = connection()[0] or "Ferry"
    err.print(f"[red]cannot reach {escape(url)}:[/] is `ferry up` running? ({escape(str(exc))})")
    raise typer.Exit(1)


def _check(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    response.read()
    details: list[Any] = []
    try:
        error = response.json()["error"]
        message, details = error["message"], error.get("details") or []
    except (ValueError, KeyError, TypeError):
        message = response.text[:200]
    err.print(f"[red]error {response.status_code}:[/] {escape(str(message))}")
    # The message may name the first field only, or none: every field is listed below it.
    if len(details) > 1 or any(str(d.get("field")) not in str(message) for d in details):
        for detail in details:
            err.print(f"  {detail.get('field')}: {detail.get('message')}", markup=False)
    raise typer.Exit(1)


def _stream(
    client: httpx.Client, path: str, params: dict[str, Any], timeout: httpx.Timeout | None = None
) -> Iterator[dict[str, Any]]:
    """Server-Sent Events of a live endpoint as {event, id, data} (data parsed from JSON)."""
    kwargs: dict[str, Any] = {"params": params}
    if timeout is not None:
        kwargs["timeout"] = timeout
    with connect_sse(client, "GET", path, **kwargs) as source:
        _check(source.response)
        for sse in source.iter_sse():
            try:
                data: Any = json.loads(sse.data)
            except ValueError:
                data = sse.data
            yield {"event": sse.event, "id": sse.id, "data": data}


_STREAM_STYLE = {"stderr": "red", "system": "yellow", "lifecycle": "cyan"}


def print_line(line: dict[str, Any], prefix: str = "", console: Console | None = None) -> None:
    console = console or out
    style = _STREAM_STYLE.get(line.get("stream", ""))
    text = line.get("text", "")
    if style:
        console.print(f"{prefix}{text}", style=style, markup=False)
    else:
        console.print(f"{prefix}{text}", markup=False)


def logs(
    execution_id: Annotated[str | None, typer.Argument(help="the execution")] = None,
    service: Annotated[
        str | None, typer.Option("--service", help="a service's log (name or id)")
    ] = None,
    follow: Annotated[bool, typer.Option("-f", "--follow", help="keep streaming")] = False,
    replica: Annotated[str | None, typer.Option(help="only this replica (--service)")] = None,
) -> None:
    """Print an execution's log (or a service's with --service); -f follows until the end."""
    if (execution_id is None) == (service is None):
        err.print("[red]give an EXECUTION_ID or --service ID[/]")
        raise typer.Exit(2)
    try:
        with _client(timeout=None if follow else 30.0) as client:
            if execution_id is not None:
                path = f"/executions/{execution_id}/logs"
                params = {"follow": "true"} if follow else {}
                for event in _stream(client, path, params):
                    if event["event"] == "log":
                        print_line(event["data"])
                    elif event["event"] == "end":
                        status = event["data"].get("status")
                        if status != "success":
                            err.print(f"[yellow]execution {status}[/]")
                        return
            else:
                path = f"/services/{_service_id(client, service)}/logs"
                params = {"follow": "true" if follow else "false"}
                if replica:
                    params["replica"] = replica
                for event in _stream(client, path, params):
                    if event["event"] == "log":
                        line = event["data"]
                        who = (line.get("execution") or f"replica {line.get('replica')}")[-8:]
                        print_line(line, prefix=f"[{who}] ")
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except httpx.HTTPError as exc:
        unreachable(exc)
        raise typer.Exit(1) from None


def events(
    follow: Annotated[bool, typer.Option("-f", "--follow", help="keep streaming")] = False,
    type_: Annotated[
        list[str] | None, typer.Option("--type", help="a type glob, e.g. execution.*")
    ] = None,
    project: Annotated[str | None, typer.Option(help="one project (admin tokens)")] = None,
    since: Annotated[
        str | None, typer.Option(help="resume after this event id (default: recent events)")
    ] = None,
) -> None:
    """Print events as they happen (-f), or the ones recorded since --since."""
    params: dict[str, Any] = {}
    if type_:
        params["types"] = ",".join(type_)
    if project:
        params["project"] = project
    if since or not follow:  # -f alone starts from now
        params["last_event_id"] = since or "0-0"
    try:
        with _client(timeout=None) as client:
            idle = None if follow else 1.0
            try:
                for event in _stream_events(client, params, idle):
                    data = event["data"]
                    out.print(
                        f"{data['at']}  {data['type']:<24} {data['resource']} "
                        f"{data['resource_id']}  {json.dumps(data['data'])}",
                        markup=False,
                    )
            except httpx.ReadTimeout:
                return  # not following: nothing more came for a moment
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except httpx.HTTPError as exc:
        unreachable(exc)
        raise typer.Exit(1) from None


def _stream_events(
    client: httpx.Client, params: dict[str, Any], idle: float | None
) -> Iterator[dict[str, Any]]:
    timeout = httpx.Timeout(None, connect=10.0, read=idle)
    yield from _stream(client, "/events/stream", params, timeout)


@executions_app.command("list")
def executions_list(
    service: Annotated[str | None, typer.Option(help="only this service (name or id)")] = None,
    status: Annotated[str | None, typer.Option(help="statuses, comma-separated")] = None,
    function: Annotated[str | None, typer.Option(help="only this function")] = None,
    trigger: Annotated[str | None, typer.Option(help="only those this trigger fired")] = None,
    limit: Annotated[int, typer.Option(help="how many")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines, for scripts")] = False,
) -> None:
    """The latest executions."""
    params: dict[str, Any] = {"limit": limit}
    with _client() as client:
        if service:
            params["service"] = _service_id(client, service)
        for key, value in (("status", status), ("function", function), ("trigger", trigger)):
            if value:
                params[key] = value
        response = client.get("/executions", params=params)
        _check(response)
    items = response.json()["items"]
    if as_json:
        for item in items:
            print(json.dumps(item))
        return
    # Filtered by trigger, the trigger column would repeat it: show the tick each was fired for.
    last = "fired for" if trigger else "trigger"
    table = Table("id", "function", "status", "attempt", "created", "duration", last)
    table.columns[0].no_wrap = True  # ids whole, to copy into the next command
    table.columns[0].min_width = 26
    colours = {"success": "green", "failed": "red", "terminated": "yellow"}
    for e in items:
        colour = colours.get(e["status"], "blue")
        duration = f"{e['duration_ms']} ms" if e.get("duration_ms") is not None else ""
        fired_for = e.get("trigger_fire_time") or ""
        if trigger:
            fired = fired_for
        else:
            fired = " @ ".join(filter(None, (e.get("trigger") or "", fired_for)))
        table.add_row(
            e["id"],
            e["function"],
            f"[{colour}]{e['status']}[/]",
            str(e["attempt"]),
            e["created_at"],
            duration,
            fired,
        )
    out.print(table)


def _service_id(client: httpx.Client, ref: str, project: str | None = None) -> str:
    """The id of the service whose id or name is `ref` (within `project`, an id)."""
    return _resource_id(client, "services", ref, {"project": project} if project else {})


def _project_id(client: httpx.Client, ref: str) -> str:
    """The id of the project whose id or name is `ref`."""
    return _resource_id(client, "projects", ref, {})


def _resource_id(client: httpx.Client, collection: str, ref: str, params: dict[str, Any]) -> str:
    """The id of the one item of `collection` whose id or name is `ref`."""
    response = client.get(f"/{collection}/{quote(ref, safe='')}")
    if response.status_code == 200:
        return response.json()["id"]
    matches: list[str] = []
    params = {"limit": 1000, **params}
    while True:
        page = client.get(f"/{collection}", params=params)
        _check(page)
        body = page.json()
        matches += [item["id"] for item in body["items"] if item["name"] == ref]
        if not body.get("next_cursor"):
            break
        params["cursor"] = body["next_cursor"]
    if len(matches) != 1:
        noun = collection.rstrip("s")
        reason = f"no {noun}" if not matches else f"{len(matches)} {collection}"
        err.print(f"[red]{reason} named {escape(ref)} or with that id[/]")
        raise typer.Exit(1)
    return matches[0]


@executions_app.command("get")
def executions_get(
    execution_id: Annotated[str, typer.Argument(help="the execution's id")],
) -> None:
    """One execution, as JSON."""
    with _client() as client:
        response = client.get(f"/executions/{execution_id}")
        _check(response)
    out.print_json(response.text)


@executions_app.command("wait")
def executions_wait(
    execution_id: Annotated[str, typer.Argument(help="the execution's id")],
    timeout: Annotated[float, typer.Option(help="give up after this many seconds")] = 300,
) -> None:
    """Wait for an execution to finish; exit 0 on success, 1 otherwise."""
    import time

    deadline = time.monotonic() + timeout
    try:
        with _client(timeout=None) as client:
            while True:
                left = max(0.0, min(300.0, deadline - time.monotonic()))
                response = client.get(f"/executions/{execution_id}/wait", params={"timeout": left})
                _check(response)
                body = response.json()
                if body["status"] in ("success", "failed", "terminated") or left <= 0:
                    break
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    out.print_json(json.dumps(body))
    raise typer.Exit(0 if body["status"] == "success" else 1)
