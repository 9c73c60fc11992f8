"""`ferry pipelines create|update|list|get|install|uninstall|delete|execute|statistics`, over
HTTP like the other client commands.

A pipeline is named by its id or by its name; a name is looked up among the pipelines the
token can see (`--project` narrows it when two projects use the same name). Pipeline executions
are `ferry/pipeline_run_commands.py`'s.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import httpx
import typer
import yaml
from rich.markup import escape
from rich.table import Table

from ferry.client_commands import _check, _client, err, out, unreachable
from ferry.pipeline_view import finish, follow_run, wait_run

pipelines_app = typer.Typer(help="Pipelines: graphs of functions.", no_args_is_help=True)

ProjectOption = Annotated[
    str | None, typer.Option("--project", help="project id (to find a pipeline by name)")
]
PipelineArgument = Annotated[str, typer.Argument(metavar="NAME|ID", help="the pipeline")]


def _read_file(path: str) -> dict[str, Any]:
    """A pipeline body from a YAML or JSON file (`-` is standard input)."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as exc:
        err.print(f"[red]cannot read {escape(path)}:[/] {escape(str(exc))}")
        raise typer.Exit(2) from None
    try:
        body = yaml.safe_load(text)  # JSON is YAML too
    except yaml.YAMLError as exc:
        err.print(f"[red]{escape(path)} is neither YAML nor JSON:[/] {escape(str(exc))}")
        raise typer.Exit(2) from None
    if not isinstance(body, dict):
        err.print(f"[red]{escape(path)} must hold a mapping (name, nodes, connections, …)")
        raise typer.Exit(2)
    return body


def _path(pipeline_id: str, *rest: str) -> str:
    return "/".join(("/pipelines", quote(pipeline_id, safe=""), *rest))


def resolve_pipeline(client: httpx.Client, ref: str, project: str | None) -> dict[str, Any]:
    """The pipeline whose id or name is `ref`; exits with a message when there is none."""
    response = client.get(_path(ref))
    if response.status_code == 200:
        return response.json()
    if response.status_code != 404:
        _check(response)
    matches: list[dict[str, Any]] = []
    params: dict[str, Any] = {"limit": 1000}
    if project:
        params["project"] = project
    while True:
        response = client.get("/pipelines", params=params)
        _check(response)
        page = response.json()
        matches += [p for p in page["items"] if p["name"] == ref]
        if not page.get("next_cursor"):
            break
        params["cursor"] = page["next_cursor"]
    if not matches:
        err.print(f"[red]no pipeline named {escape(ref)} or with that id")
        raise typer.Exit(1)
    if len(matches) > 1:
        projects = ", ".join(p["project"] for p in matches)
        err.print(f"[red]pipelines named {escape(ref)} in {projects}:[/] give --project")
        raise typer.Exit(2)
    return matches[0]


def _summary(pipeline: dict[str, Any]) -> str:
    installed = "installed" if pipeline["installed"] else "not installed"
    return f"{pipeline['name']} ({pipeline['id']}), version {pipeline['version']}, {installed}"


@pipelines_app.command("create")
def create(
    file: Annotated[str, typer.Option("-f", "--file", help="YAML or JSON body, - for stdin")],
    project: Annotated[
        str | None, typer.Option(help="project id (else `project:` in the file)")
    ] = None,
    install: Annotated[bool, typer.Option(help="install it once created")] = False,
) -> None:
    """Create a pipeline from a file; prints its id."""
    body = _read_file(file)
    if project:
        body["project"] = project
    with _client() as client:
        response = client.post("/pipelines", json=body)
        _check(response)
        pipeline = response.json()
        if install:
            response = client.post(_path(pipeline["id"], "install"))
            _check(response)
            pipeline = response.json()
    err.print(f"created {escape(_summary(pipeline))}")
    out.print(pipeline["id"])


@pipelines_app.command("update")
def update(
    pipeline: PipelineArgument,
    file: Annotated[str, typer.Option("-f", "--file", help="YAML or JSON body, - for stdin")],
    project: ProjectOption = None,
) -> None:
    """Replace a pipeline's definition; a changed graph becomes a new version."""
    body = _read_file(file)
    body.pop("project", None)  # a pipeline stays in its project
    with _client() as client:
        pipeline_id = resolve_pipeline(client, pipeline, project)["id"]
        response = client.patch(_path(pipeline_id), json=body)
        _check(response)
    err.print(f"updated {escape(_summary(response.json()))}")


@pipelines_app.command("list")
def list_(
    project: Annotated[str | None, typer.Option(help="project id")] = None,
    limit: Annotated[int, typer.Option(help="how many")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """List pipelines."""
    params: dict[str, Any] = {"limit": limit}
    if project:
        params["project"] = project
    with _client() as client:
        response = client.get("/pipelines", params=params)
        _check(response)
    items = response.json()["items"]
    if as_json:
        out.print_json(json.dumps(items))
        return
    table = Table("id", "name", "version", "installed", "nodes", "description")
    table.columns[0].no_wrap = True  # ids whole, to copy into the next command
    table.columns[0].min_width = 26
    for p in items:
        table.add_row(
            p["id"],
            p["name"],
            str(p["version"]),
            "yes" if p["installed"] else "no",
            str(len(p["nodes"])),
            p["description"],
        )
    out.print(table)


def _compact(value: Any) -> str:
    return escape(json.dumps(value, separators=(", ", ": ")))


def _service_names(client: httpx.Client, project: str) -> dict[str, str]:
    response = client.get("/services", params={"project": project, "limit": 1000})
    if response.status_code != 200:
        return {}  # ids are shown instead
    return {s["id"]: s["name"] for s in response.json()["items"]}


def _print_pipeline(pipeline: dict[str, Any], services: dict[str, str]) -> None:
    out.print(f"[bold]{escape(_summary(pipeline))}[/]  project {pipeline['project']}")
    if pipeline["description"]:
        out.print(escape(pipeline["description"]))
    if pipeline["variables"]:
        table = Table("variable", "type", "default", "description", title="Variables")
        for v in pipeline["variables"]:
            table.add_row(
                v["name"],
                v.get("type", "json"),
                _compact(v.get("default")),
                escape(v.get("description", "")),
            )
        out.print(table)
    targets = {c["target"]["node"] for c in pipeline["connections"]}
    sources = {c["source"]["node"] for c in pipeline["connections"]}
    table = Table("node", "type", "service", "function", "input", "role", title="Nodes")
    for node in pipeline["nodes"]:
        role = ["start"] if node["id"] not in targets else []
        role += ["sink"] if node["id"] not in sources else []
        service = node.get("service")
        table.add_row(
            node["id"],
            node["type"],
            services.get(service, service) if service else "",
            node.get("function", ""),
            _compact(node["input"]) if node.get("input") else "",
            ", ".join(role),
        )
    out.print(table)
    if pipeline["connections"]:
        table = Table("from", "to", "fan-out", "condition", title="Connections")
        for c in pipeline["connections"]:
            table.add_row(
                f"{c['source']['node']}.{c['source']['port']}",
                f"{c['target']['node']}.{c['target']['port']}",
                "yes" if c.get("fanout") else "",
                _compact(c["condition"]) if c.get("condition") else "",
            )
        out.print(table)
    out.print(f"fan-out cap {pipeline['settings'].get('fanout_cap')}")


@pipelines_app.command("get")
def get(
    pipeline: PipelineArgument,
    project: ProjectOption = None,
    version: Annotated[int | None, typer.Option(help="as of this version")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """Show a pipeline: its variables, nodes and connections."""
    with _client() as client:
        body = resolve_pipeline(client, pipeline, project)
        if version is not None and version != body["version"]:
            response = client.get(_path(body["id"], "versions", str(version)))
            _check(response)
            body = response.json()
        if as_json:
            out.print_json(json.dumps(body))
            return
        services = _service_names(client, body["project"])
    _print_pipeline(body, services)


def _action(pipeline: str, project: str | None, action: str) -> dict[str, Any]:
    with _client() as client:
        pipeline_id = resolve_pipeline(client, pipeline, project)["id"]
        response = client.post(_path(pipeline_id, action))
        _check(response)
    return response.json()


@pipelines_app.command("install")
def install(pipeline: PipelineArgument, project: ProjectOption = None) -> None:
    """Install a pipeline: it can run, and triggers that run it are active."""
    err.print(escape(_summary(_action(pipeline, project, "install"))))


@pipelines_app.command("uninstall")
def uninstall(pipeline: PipelineArgument, project: ProjectOption = None) -> None:
    """Uninstall a pipeline: no new runs, its triggers pause; running ones finish."""
    err.print(escape(_summary(_action(pipeline, project, "uninstall"))))


@pipelines_app.command("delete")
def delete(pipeline: PipelineArgument, project: ProjectOption = None) -> None:
    """Delete a pipeline (refused while one of its executions is running)."""
    with _client() as client:
        pipeline_id = resolve_pipeline(client, pipeline, project)["id"]
        _check(client.delete(_path(pipeline_id)))
    err.print(f"deleted {pipeline_id}")


def _input_option(value: str | None) -> dict[str, Any]:
    if value is None:
        return {}
    text = value
    if value.startswith("@"):
        try:
            text = Path(value[1:]).read_text()
        except OSError as exc:
            err.print(f"[red]--input: cannot read {escape(value[1:])}:[/] {escape(str(exc))}")
            raise typer.Exit(2) from None
    try:
        body = json.loads(text)
    except ValueError as exc:
        err.print(f"[red]--input is not JSON:[/] {escape(str(exc))}")
        raise typer.Exit(2) from None
    if not isinstance(body, dict):
        err.print("[red]--input must be a JSON object")
        raise typer.Exit(2)
    return body


def _variables(pairs: list[str] | None) -> dict[str, Any]:
    """`k=v` pairs; a value that parses as JSON is taken as such (`n=3` is a number)."""
    variables: dict[str, Any] = {}
    for pair in pairs or []:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            err.print(f"[red]--var takes NAME=VALUE, not {escape(pair)}")
            raise typer.Exit(2)
        try:
            variables[name] = json.loads(value)
        except ValueError:
            variables[name] = value
    return variables


@pipelines_app.command("execute")
def execute(
    pipeline: PipelineArgument,
    input_: Annotated[
        str | None, typer.Option("--input", help="JSON object, or @file.json")
    ] = None,
    var: Annotated[
        list[str] | None, typer.Option("--var", help="NAME=VALUE (repeatable; JSON or text)")
    ] = None,
    wait: Annotated[bool, typer.Option(help="wait for the end, print the output")] = False,
    follow: Annotated[
        bool, typer.Option(help="show each node's status live until the end")
    ] = False,
    idempotency_key: Annotated[
        str | None, typer.Option(help="a repeated key returns the first execution")
    ] = None,
    timeout: Annotated[
        float | None, typer.Option(help="with --wait/--follow: give up after this many seconds")
    ] = None,
    project: ProjectOption = None,
) -> None:
    """Run a pipeline and print the pipeline execution's id; with --wait or --follow, its
    output once it ends (exit status 1 naming the failed node and the reason)."""
    body: dict[str, Any] = {"input": _input_option(input_), "variables": _variables(var)}
    if idempotency_key:
        body["idempotency_key"] = idempotency_key
    try:
        with _client(timeout=None if (wait or follow) else 30.0) as client:
            pipeline_id = resolve_pipeline(client, pipeline, project)["id"]
            response = client.post(_path(pipeline_id, "execute"), json=body)
            _check(response)
            run = response.json()
            if not (wait or follow):
                err.print(f"started version {run['version']}: {run['status']}")
                out.print(run["id"])
                return
            run = (follow_run if follow else wait_run)(client, run, timeout)
            finish(client, run)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except httpx.HTTPError as exc:
        unreachable(exc)
        raise typer.Exit(1) from None


@pipelines_app.command("statistics")
def statistics(
    pipeline: PipelineArgument,
    project: ProjectOption = None,
    reset: Annotated[bool, typer.Option(help="start counting afresh")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """How a pipeline's executions ended, and each node's counts and durations."""
    with _client() as client:
        pipeline_id = resolve_pipeline(client, pipeline, project)["id"]
        if reset:
            _check(client.post(_path(pipeline_id, "statistics", "reset")))
            err.print("statistics reset")
            return
        response = client.get(_path(pipeline_id, "statistics"))
        _check(response)
    stats = response.json()
    if as_json:
        out.print_json(json.dumps(stats))
        return
    counts = stats["executions"]
    out.print("executions: " + (", ".join(f"{n} {s}" for s, n in counts.items() if n) or "none"))
    table = Table("node", "executions", "p50 ms", "p99 ms")
    for node in stats["nodes"]:
        durations = node.get("duration_ms") or {}
        table.add_row(
            node["node"],
            ", ".join(f"{n} {s}" for s, n in node["executions"].items() if n),
            _number(durations.get("p50")),
            _number(durations.get("p99")),
        )
    out.print(table)


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.0f}"
