"""The `ferry` command: runs the processes, and talks to a running Ferry."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from typer.core import TyperOption

from ferry.authoring_commands import register as register_authoring_commands
from ferry.client_commands import register as register_client_commands
from ferry.pipeline_commands import pipelines_app
from ferry.pipeline_run_commands import runs_app
from ferry.resource_commands import register as register_resource_commands
from ferry.trigger_commands import triggers_app

# typer's rich help panel prints `<bool>` beside every flag, however it is declared; a flag
# takes no value, so its row shows none (options that take a value keep their type).
_option_type = TyperOption.display_type_rich


def _flag_has_no_type(self: TyperOption, ctx: typer.Context) -> str | None:
    """A flag takes no value: its help row shows no `<bool>` type beside it."""
    return None if self.is_flag else _option_type(self, ctx)


TyperOption.display_type_rich = _flag_has_no_type  # type: ignore[method-assign, assignment]

app = typer.Typer(
    help="Ferry: asynchronous job orchestration for FaaS executions and pipelines.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion and --show-completion for bash, zsh, fish
)
token_app = typer.Typer(help="Manage API tokens directly in the database.", no_args_is_help=True)
image_app = typer.Typer(help="Build the images replicas run in.", no_args_is_help=True)
app.add_typer(token_app, name="token")
app.add_typer(image_app, name="image")
register_authoring_commands(app)
register_client_commands(app)
register_resource_commands(app)
app.add_typer(triggers_app, name="triggers")
app.add_typer(pipelines_app, name="pipelines")
app.add_typer(runs_app, name="pipeline-executions")

console = Console(stderr=True)

if TYPE_CHECKING:
    from core.settings import Settings


def _version(show: bool) -> None:
    if show:
        from importlib.metadata import version

        print(f"ferry {version('ferry')}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="print the version"),
    ] = False,
) -> None:
    pass


# What the server side imports: installed by the `server` extra, not by the client alone.
SERVER_MODULES = ("aiohttp", "asyncpg", "arq", "redis", "pydantic_settings", "croniter")


def _require_server(command: str) -> None:
    for module in SERVER_MODULES:
        try:
            __import__(module)
        except ImportError:
            console.print(
                f"[red]`ferry {command}` needs Ferry's server dependencies ({module} is missing):"
                "[/] pip install 'ferry\\[server]' (`make install` does)"
            )
            raise typer.Exit(2) from None


def _settings(process: str) -> Settings:
    _require_server(process)
    from core.logging_setup import setup_logging
    from core.settings import Settings

    settings = Settings()
    setup_logging(settings, process)
    return settings


def _server_settings(process: str) -> Settings:
    """Settings for `api`, `worker` and `scheduler`, which never start embedded servers."""
    settings = _settings(process)
    missing = [
        name
        for name, value in (
            ("FERRY_DATABASE_URL", settings.database_url),
            ("FERRY_REDIS_URL", settings.redis_url),
        )
        if not value
    ]
    if missing:
        console.print(
            f"[red]error:[/] `ferry {process}` needs {' and '.join(missing)}; only `ferry up`, "
            "`ferry migrate` and `ferry token create` start the embedded servers"
        )
        raise typer.Exit(2)
    return settings


@app.command()
def up() -> None:
    """Run everything (API, scheduler, worker) on this machine; embedded PostgreSQL and Redis
    unless FERRY_DATABASE_URL / FERRY_REDIS_URL are set."""
    settings = _settings("up")
    from ferry.supervisor import run_up

    raise typer.Exit(run_up(settings))


@app.command()
def api(
    workers: Annotated[
        int,
        typer.Option(
            "--workers",
            min=1,
            max=64,
            help="API processes sharing the port, each with its own live-stream hub",
        ),
    ] = 1,
) -> None:
    """Serve the REST API (needs FERRY_DATABASE_URL and FERRY_REDIS_URL)."""
    from service.main import serve, serve_workers

    settings = _server_settings("api")
    if workers == 1:
        asyncio.run(serve(settings))
        return
    raise typer.Exit(serve_workers(settings, workers))


@app.command()
def worker() -> None:
    """Run a worker: hosts replicas and runs executions (needs FERRY_DATABASE_URL and
    FERRY_REDIS_URL)."""
    settings = _server_settings("worker")
    from worker.main import run_worker

    asyncio.run(run_worker(settings))


@app.command()
def scheduler() -> None:
    """Run a scheduler: triggers, the reconciler and retention (needs FERRY_DATABASE_URL and
    FERRY_REDIS_URL)."""
    settings = _server_settings("scheduler")
    from scheduler.main import run_scheduler

    asyncio.run(run_scheduler(settings))


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
    settings = _settings("migrate")
    from core import db

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
    settings = _settings("token")
    from core import auth, db
    from core.errors import FerryError
    from ferry.config import read_config, write_config

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
    all_images: Annotated[
        bool,
        typer.Option(
            "--all",
            help="also Ferry's own image and PostgreSQL, Redis and proxy images for "
            "deploy/compose.yaml, each rebuilt only when its content changed",
        ),
    ] = False,
) -> None:
    """Build the default runner image offline (Debian root filesystem + docker import)."""
    settings = _settings("image")
    import docker

    from worker import images

    if all_images:
        _build_all_images(mirror)
        return
    tag = tag or settings.runner_image
    client = docker.from_env()
    if not force and images.runner_image_exists(client, tag):
        console.print(f"{tag} exists already (use --force to rebuild)")
        return
    try:
        with console.status(f"building {tag}…") as status:
            image_id = images.build_runner_image(
                tag=tag, mirror=mirror, on_progress=lambda line: status.update(f"{tag}: {line}")
            )
    except images.ImageBuildError as exc:  # not root, no debootstrap, no mirror: say which
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None
    console.print(f"[green]✓[/] built {tag} ({image_id[:19]})")


def _build_all_images(mirror: str | None) -> None:
    import time

    from worker import images, server_images

    started = time.monotonic()
    try:
        built = server_images.build_all(
            progress=lambda line: console.print(line[:160], markup=False, highlight=False),
            mirror=mirror,
        )
    except images.ImageBuildError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None
    for item in built:
        state = "up to date" if item.cached else f"built in {item.seconds:.0f}s"
        console.print(f"[green]✓[/] {item.tag} {state} ({item.image_id[:19]})")
    console.print(f"all images ready in {time.monotonic() - started:.0f}s")


def main() -> None:
    import httpx

    from ferry.config import connection

    try:
        app()
    except httpx.TransportError as exc:
        url = connection()[0] or "Ferry"
        console.print(f"[red]cannot reach {url}:[/] is `ferry up` running? ({exc})")
        raise SystemExit(1) from None
