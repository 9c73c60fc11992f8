"""The `ferry` command: runs the processes, and talks to a running Ferry."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer
from rich.console import Console

from core.settings import Settings
from ferry.client_commands import register as register_client_commands
from ferry.trigger_commands import triggers_app

app = typer.Typer(
    help="Ferry: asynchronous job orchestration for FaaS executions and pipelines.",
    no_args_is_help=True,
    add_completion=False,
)
token_app = typer.Typer(help="Manage API tokens directly in the database.", no_args_is_help=True)
image_app = typer.Typer(help="Build the images replicas run in.", no_args_is_help=True)
app.add_typer(token_app, name="token")
app.add_typer(image_app, name="image")
register_client_commands(app)
app.add_typer(triggers_app, name="triggers")

console = Console(stderr=True)


def _settings(process: str) -> Settings:
    from core.logging_setup import setup_logging

    settings = Settings()
    setup_logging(settings, process)
    return settings


@app.command()
def up() -> None:
    """Run everything (API, scheduler, worker) on this machine; embedded PostgreSQL and Redis
    unless FERRY_DATABASE_URL / FERRY_REDIS_URL are set."""
    from ferry.supervisor import run_up

    raise typer.Exit(run_up(_settings("up")))


@app.command()
def api() -> None:
    """Serve the REST API (needs FERRY_DATABASE_URL and FERRY_REDIS_URL)."""
    from service.main import serve

    asyncio.run(serve(_settings("api")))


@app.command()
def worker() -> None:
    """Run a worker: hosts replicas and runs executions."""
    from worker.main import run_worker

    asyncio.run(run_worker(_settings("worker")))


@app.command()
def scheduler() -> None:
    """Run a scheduler: triggers, the reconciler and retention."""
    from scheduler.main import run_scheduler

    asyncio.run(run_scheduler(_settings("scheduler")))


def _database_url(settings: Settings) -> tuple[str, object | None]:
    """The configured DSN, or the embedded server's (started if it is not running)."""
    if settings.database_url:
        return settings.database_url, None
    from core.embedded import EmbeddedPostgres

    embedded = EmbeddedPostgres(settings.data_dir / "postgres")
    return embedded.start(), embedded


@app.command()
def migrate() -> None:
    """Apply pending database migrations and exit."""
    from core import db

    settings = _settings("migrate")
    dsn, _embedded = _database_url(settings)

    async def run() -> list[int]:
        conn = await db.connect(dsn)
        try:
            return await db.migrate(conn)
        finally:
            await conn.close()

    applied = asyncio.run(run())
    console.print(f"applied {applied}" if applied else "the schema is up to date")


@token_app.command("create")
def token_create(
    name: Annotated[str, typer.Option(help="a label to tell the token apart")] = "cli",
    role: Annotated[str, typer.Option(help="admin, owner, developer or viewer")] = "admin",
    project: Annotated[str | None, typer.Option(help="project id (not for admin)")] = None,
    save: Annotated[bool, typer.Option(help="write it to the CLI config file")] = False,
) -> None:
    """Create a token directly in the database and print its secret (shown once)."""
    from core import auth, db
    from core.errors import FerryError
    from ferry.config import read_config, write_config

    settings = _settings("token")
    dsn, _embedded = _database_url(settings)

    async def run() -> auth.TokenCreated:
        conn = await db.connect(dsn)
        try:
            await db.migrate(conn)
            body = auth.TokenCreate(name=name, role=auth.Role(role), project=project)
            return await auth.create_token(conn, body, by=None)
        finally:
            await conn.close()

    try:
        created = asyncio.run(run())
    except (FerryError, ValueError) as exc:
        console.print(f"[red]error:[/] {getattr(exc, 'message', exc)}")
        raise typer.Exit(2) from None
    print(created.token)
    if save:
        url = read_config().get("url") or f"http://{settings.api_host}:{settings.api_port}"
        console.print(f"saved to {write_config(url, created.token)}")


@image_app.command("build")
def image_build(
    tag: Annotated[str | None, typer.Option(help="image tag")] = None,
    mirror: Annotated[str | None, typer.Option(help="Debian mirror URL")] = None,
    force: Annotated[bool, typer.Option(help="rebuild even if the image exists")] = False,
) -> None:
    """Build the default runner image offline (Debian root filesystem + docker import)."""
    import docker

    from worker import images

    settings = _settings("image")
    tag = tag or settings.runner_image
    client = docker.from_env()
    if not force and images.runner_image_exists(client, tag):
        console.print(f"{tag} exists already (use --force to rebuild)")
        return
    with console.status(f"building {tag}…") as status:
        image_id = images.build_runner_image(
            tag=tag, mirror=mirror, on_progress=lambda line: status.update(f"{tag}: {line}")
        )
    console.print(f"[green]✓[/] built {tag} ({image_id[:19]})")


def main() -> None:
    app()
