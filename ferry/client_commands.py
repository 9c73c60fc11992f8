"""CLI commands that talk HTTP to a running Ferry: `ferry logs`, `ferry events`,
`ferry executions list|get|wait`.

The API's URL and token come from the CLI config (`ferry up` writes it); `FERRY_URL` and
`FERRY_TOKEN` override it. Live output is Server-Sent Events, parsed here line by line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
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


def _check(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    response.read()
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:200]
    err.print(f"[red]error {response.status_code}:[/] {message}")
    raise typer.Exit(1)


def iter_sse(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """Events as {id, event, data} from SSE text lines; comments (heartbeats) skipped."""
    current: dict[str, Any] = {}
    data: list[str] = []
    for line in lines:
        if line == "":
            if data:
                event = {"event": current.get("event", "message"), "id": current.get("id")}
                try:
                    event["data"] = json.loads("\n".join(data))
                except ValueError:
                    event["data"] = "\n".join(data)
                yield event
            current, data = {}, []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            data.append(value)
        elif name in ("event", "id"):
            current[name] = value


def _stream(client: httpx.Client, path: str, params: dict[str, Any]) -> Iterator[dict[str, Any]]:
    headers = {"Accept": "text/event-stream"}
    with client.stream("GET", path, params=params, headers=headers) as response:
        _check(response)
        yield from iter_sse(response.iter_lines())


_STREAM_STYLE = {"stderr": "red", "system": "yellow", "lifecycle": "cyan"}


def _print_line(line: dict[str, Any], prefix: str = "") -> None:
    style = _STREAM_STYLE.get(line.get("stream", ""))
    text = line.get("text", "")
    if style:
        out.print(f"{prefix}{text}", style=style, markup=False)
    else:
        out.print(f"{prefix}{text}", markup=False)


def logs(
    execution_id: Annotated[str | None, typer.Argument(help="the execution")] = None,
    service: Annotated[str | None, typer.Option("--service", help="a service's log")] = None,
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
                        _print_line(event["data"])
                    elif event["event"] == "end":
                        status = event["data"].get("status")
                        if status != "success":
                            err.print(f"[yellow]execution {status}[/]")
                        return
            else:
                path = f"/services/{service}/logs"
                params = {"follow": "true" if follow else "false"}
                if replica:
                    params["replica"] = replica
                for event in _stream(client, path, params):
                    if event["event"] == "log":
                        line = event["data"]
                        who = (line.get("execution") or f"replica {line.get('replica')}")[-8:]
                        _print_line(line, prefix=f"[{who}] ")
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except httpx.HTTPError as exc:
        err.print(f"[red]cannot reach Ferry:[/] {exc}")
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
        err.print(f"[red]cannot reach Ferry:[/] {exc}")
        raise typer.Exit(1) from None


def _stream_events(
    client: httpx.Client, params: dict[str, Any], idle: float | None
) -> Iterator[dict[str, Any]]:
    timeout = httpx.Timeout(None, connect=10.0, read=idle)
    headers = {"Accept": "text/event-stream"}
    with client.stream(
        "GET", "/events/stream", params=params, headers=headers, timeout=timeout
    ) as response:
        _check(response)
        yield from iter_sse(response.iter_lines())


@executions_app.command("list")
def executions_list(
    service: Annotated[str | None, typer.Option(help="only this service")] = None,
    status: Annotated[str | None, typer.Option(help="statuses, comma-separated")] = None,
    limit: Annotated[int, typer.Option(help="how many")] = 20,
) -> None:
    """The latest executions."""
    params: dict[str, Any] = {"limit": limit}
    if service:
        params["service"] = service
    if status:
        params["status"] = status
    with _client() as client:
        response = client.get("/executions", params=params)
        _check(response)
    table = Table("id", "function", "status", "attempt", "created", "duration")
    table.columns[0].no_wrap = True  # ids whole, to copy into the next command
    table.columns[0].min_width = 26
    colours = {"success": "green", "failed": "red", "terminated": "yellow"}
    for e in response.json()["items"]:
        colour = colours.get(e["status"], "blue")
        duration = f"{e['duration_ms']} ms" if e.get("duration_ms") is not None else ""
        table.add_row(
            e["id"],
            e["function"],
            f"[{colour}]{e['status']}[/]",
            str(e["attempt"]),
            e["created_at"],
            duration,
        )
    out.print(table)


@executions_app.command("get")
def executions_get(execution_id: str) -> None:
    """One execution, as JSON."""
    with _client() as client:
        response = client.get(f"/executions/{execution_id}")
        _check(response)
    out.print_json(response.text)


@executions_app.command("wait")
def executions_wait(
    execution_id: str,
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
