"""`ferry projects|services|packages|tokens …`, `ferry login`, `ferry events publish` and
`ferry executions terminate|rerun`: the API's resources by name, through the SDK.

Every listing is a table, or JSON lines of the API's objects with `--json` (for scripts).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ferry.authoring_commands import reported
from ferry.client_commands import err, executions_app, out

projects_app = typer.Typer(help="Projects, and the default one.", no_args_is_help=True)
services_app = typer.Typer(help="Services: deployed packages.", no_args_is_help=True)
packages_app = typer.Typer(help="Packages and their revisions.", no_args_is_help=True)
tokens_app = typer.Typer(help="API tokens.", no_args_is_help=True)

JsonOption = Annotated[bool, typer.Option("--json", help="JSON lines, for scripts")]
ProjectOption = Annotated[str | None, typer.Option(help="project name or id")]


def register(app: typer.Typer) -> None:
    app.add_typer(projects_app, name="projects")
    app.add_typer(services_app, name="services")
    app.add_typer(packages_app, name="packages")
    app.add_typer(tokens_app, name="tokens")
    app.command("login")(login)
    app.command("publish")(publish)
    executions_app.command("terminate")(terminate)
    executions_app.command("rerun")(rerun)


def _client() -> Any:
    from ferry.client import Client

    return Client()


def _scoped(client: Any, project: str | None, collection: str) -> Any:
    """`client.<collection>`, narrowed to `project` when one is named."""
    if project is None:
        return getattr(client, collection)
    return getattr(client.projects.get(project), collection)


def _show(items: list[Any], columns: dict[str, Any], as_json: bool) -> None:
    if as_json:
        for item in items:
            print(item.model_dump_json())
        return
    table = Table(*columns)
    table.columns[0].no_wrap = True
    for item in items:
        table.add_row(*(str(get(item)) for get in columns.values()))
    out.print(table)


def _print_json(item: Any) -> None:
    out.print_json(item.model_dump_json())


# -- projects --------------------------------------------------------------------------------


@projects_app.command("list")
def projects_list(as_json: JsonOption = False) -> None:
    """Every project the token sees."""
    with reported(), _client() as client:
        items = list(client.projects.list())
    columns = {
        "name": lambda p: p.name,
        "id": lambda p: p.id,
        "description": lambda p: p.description,
    }
    _show(items, columns, as_json)


@projects_app.command("create")
def projects_create(
    name: str, description: Annotated[str, typer.Option(help="what it is for")] = ""
) -> None:
    """Create a project (an admin token's right)."""
    with reported(), _client() as client:
        _print_json(client.projects.create(name, description))


@projects_app.command("use")
def projects_use(name: str) -> None:
    """Make NAME the default project of `ferry deploy` and the other commands."""
    from ferry.config import connection, write_config

    with reported(), _client() as client:
        project = client.projects.get(name)
    url, token = connection()
    assert url and token  # the client above had them
    write_config(url, token, project=project.name)
    err.print(f"default project: {project.name}")


# -- services --------------------------------------------------------------------------------


def _service(client: Any, ref: str, project: str | None) -> Any:
    return _scoped(client, project, "services").get(ref)


@services_app.command("list")
def services_list(project: ProjectOption = None, as_json: JsonOption = False) -> None:
    """Services, with their package revision and status."""
    with reported(), _client() as client:
        items = list(_scoped(client, project, "services").list())
    columns = {
        "name": lambda s: s.name,
        "id": lambda s: s.id,
        "revision": lambda s: s.package_revision,
        "status": lambda s: s.status,
        "replicas": lambda s: f"{s.runtime.min_replicas}-{s.runtime.max_replicas}",
        "updated": lambda s: s.updated_at.isoformat(timespec="seconds"),
    }
    _show(items, columns, as_json)


@services_app.command("get")
def services_get(name: str, project: ProjectOption = None) -> None:
    """One service, as JSON."""
    with reported(), _client() as client:
        _print_json(_service(client, name, project))


@services_app.command("status")
def services_status(name: str, project: ProjectOption = None, as_json: JsonOption = False) -> None:
    """Queue length, executions in progress, replicas, and why replicas cannot start."""
    with reported(), _client() as client:
        status = _service(client, name, project).status_report()
    if as_json:
        print(status.model_dump_json())
        return
    out.print(
        f"queue {status.queue_length}, in progress {status.in_progress}, "
        f"desired replicas {status.desired_replicas}"
    )
    table = Table("replica", "host", "status", "running", "generation", "message")
    for r in status.replicas:
        table.add_row(r.id, r.host, r.status, str(r.running), str(r.generation), r.message or "")
    out.print(table)
    if status.last_failure is not None:
        failure = status.last_failure
        err.print(f"[red]replicas cannot start:[/] {failure.message or 'no reason recorded'}")
        raise typer.Exit(1)


@services_app.command("pause")
def services_pause(name: str, project: ProjectOption = None) -> None:
    """Stop taking executions from the queue (they wait until resumed)."""
    with reported(), _client() as client:
        err.print(f"{name}: {_service(client, name, project).pause().status}")


@services_app.command("resume")
def services_resume(name: str, project: ProjectOption = None) -> None:
    """Take executions again."""
    with reported(), _client() as client:
        err.print(f"{name}: {_service(client, name, project).resume().status}")


@services_app.command("delete")
def services_delete(name: str, project: ProjectOption = None) -> None:
    """Delete a service (refused while a pipeline uses it)."""
    with reported(), _client() as client:
        _service(client, name, project).delete()
    err.print(f"deleted {name}")


@services_app.command("logs")
def services_logs(
    name: str,
    project: ProjectOption = None,
    follow: Annotated[bool, typer.Option("-f", "--follow", help="keep streaming")] = False,
) -> None:
    """Every execution's lines of a service, with replica lifecycle lines."""
    from ferry.client_commands import logs

    with reported(), _client() as client:
        service_id = _service(client, name, project).id
    logs(execution_id=None, service=service_id, follow=follow, replica=None)


# -- packages --------------------------------------------------------------------------------


def _package(client: Any, ref: str, project: str | None, revision: int | None = None) -> Any:
    return _scoped(client, project, "packages").get(ref, revision=revision)


@packages_app.command("list")
def packages_list(project: ProjectOption = None, as_json: JsonOption = False) -> None:
    """Packages, at their latest revision."""
    with reported(), _client() as client:
        items = list(_scoped(client, project, "packages").list())
    columns = {
        "name": lambda p: p.name,
        "id": lambda p: p.id,
        "revision": lambda p: p.latest_revision,
        "size": lambda p: p.codebase.size,
        "updated": lambda p: p.updated_at.isoformat(timespec="seconds"),
    }
    _show(items, columns, as_json)


@packages_app.command("get")
def packages_get(
    name: str,
    project: ProjectOption = None,
    revision: Annotated[int | None, typer.Option(help="default: the latest")] = None,
) -> None:
    """One package revision, as JSON."""
    with reported(), _client() as client:
        _print_json(_package(client, name, project, revision))


@packages_app.command("revisions")
def packages_revisions(
    name: str, project: ProjectOption = None, as_json: JsonOption = False
) -> None:
    """A package's revisions."""
    with reported(), _client() as client:
        items = _package(client, name, project).revisions()
    columns = {
        "revision": lambda r: r.revision,
        "sha256": lambda r: r.codebase.sha256[:16],
        "size": lambda r: r.codebase.size,
        "created": lambda r: r.created_at.isoformat(timespec="seconds"),
    }
    _show(items, columns, as_json)


@packages_app.command("download")
def packages_download(
    name: str,
    project: ProjectOption = None,
    revision: Annotated[int | None, typer.Option(help="default: the latest")] = None,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="default: NAME-rN.zip")
    ] = None,
) -> None:
    """Download a revision's codebase archive."""
    with reported(), _client() as client:
        package = _package(client, name, project, revision)
        target = output or Path(f"{package.name}-r{package.revision}.zip")
        package.download(target)
    err.print(f"saved {target}")


# -- tokens ----------------------------------------------------------------------------------


@tokens_app.command("list")
def tokens_list(as_json: JsonOption = False) -> None:
    """Tokens (their prefixes; secrets are never shown again)."""
    with reported(), _client() as client:
        items = list(client.pages("/tokens"))
    if as_json:
        for item in items:
            print(json.dumps(item))
        return
    table = Table("id", "name", "role", "project", "prefix", "last used")
    for t in items:
        table.add_row(
            t["id"], t["name"], t["role"], t["project"] or "", t["prefix"], t["last_used_at"] or ""
        )
    out.print(table)


@tokens_app.command("create")
def tokens_create(
    name: str,
    role: Annotated[str, typer.Option(help="admin, owner, developer or viewer")] = "developer",
    project: ProjectOption = None,
) -> None:
    """Create a token and print its secret (shown once)."""
    with reported(), _client() as client:
        body: dict[str, Any] = {"name": name, "role": role}
        if project:
            body["project"] = client.projects.get(project).id
        created = client.request("POST", "/tokens", json=body)
    print(created["token"])


@tokens_app.command("revoke")
def tokens_revoke(token_id: str) -> None:
    """Revoke a token by its id."""
    from ferry.client import _path

    with reported(), _client() as client:
        client.request("DELETE", _path("tokens", token_id))
    err.print(f"revoked {token_id}")


# -- executions, events, login ---------------------------------------------------------------


def terminate(execution_id: str) -> None:
    """Terminate an execution (it ends `terminated`)."""
    with reported(), _client() as client:
        execution = client.executions.get(execution_id).terminate()
    err.print(f"{execution.id}: {execution.status}")


def rerun(execution_id: str) -> None:
    """Run an execution again with the same input; prints the new execution's id."""
    with reported(), _client() as client:
        execution = client.executions.get(execution_id).rerun()
    print(execution.id)


def publish(
    resource: str,
    action: str,
    resource_id: Annotated[str, typer.Option("--id", help="the resource's id")],
    data: Annotated[str, typer.Option(help="JSON object")] = "{}",
    project: ProjectOption = None,
) -> None:
    """Publish an event (event triggers match it)."""
    from core.errors import Invalid
    from ferry.authoring_commands import _project

    with reported(), _client() as client:
        try:
            payload = json.loads(data)
        except ValueError as exc:
            raise Invalid.field("--data", f"not JSON: {exc}") from None
        body = {
            "project": _project(client, project).id,
            "resource": resource,
            "action": action,
            "resource_id": resource_id,
            "data": payload,
        }
        accepted = client.request("POST", "/events", json=body)
    print(accepted["id"])


def login(
    url: Annotated[str, typer.Argument(help="the Ferry's URL, e.g. https://ferry.example.com")],
    token: Annotated[
        str | None, typer.Option(help="an API token (default: asked for, not echoed)")
    ] = None,
) -> None:
    """Talk to the Ferry at URL from now on: checks the token and saves both to the config."""
    from ferry.client import Client
    from ferry.config import write_config

    secret = token or typer.prompt("token", hide_input=True)
    with reported(), Client(url, secret) as client:
        info = client.info()
    path = write_config(url.rstrip("/"), secret)
    err.print(f"logged in to {url} (Ferry {info['version']}); saved to {path}")
