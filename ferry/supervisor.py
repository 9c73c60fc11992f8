"""`ferry up`: embedded servers, migrations, the first admin token, and the API, scheduler
and worker as child processes; servers and processes are restarted if they die, and all
are stopped together on Ctrl-C."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx
from rich.console import Console

from core import auth, db
from core.embedded import EmbeddedStack, ensure_private_dir
from core.settings import Settings
from ferry.config import read_config, write_config

ROLES = ("api", "scheduler", "worker")


@dataclass
class Child:
    role: str
    process: subprocess.Popen[bytes]
    restarts: list[float] = field(default_factory=list)


def api_workers(cores: int | None = None) -> int:
    """`ferry up`'s API processes: one per two cores (the scheduler, the worker and the
    databases share the machine), one to four."""
    return max(1, min(4, (cores or os.cpu_count() or 1) // 2))


def _spawn(role: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    workers = api_workers() if role == "api" else 1
    extra = ["--workers", str(workers)] if workers > 1 else []
    return subprocess.Popen([sys.executable, "-m", "ferry", role, *extra], env=env)


def _crash_loop(restarts: list[float], limit: int = 5, window_s: float = 60.0) -> bool:
    """Note one more restart; True when there were more than `limit` in `window_s`."""
    now = time.monotonic()
    restarts[:] = [t for t in restarts if now - t < window_s] + [now]
    return len(restarts) > limit


async def _bootstrap(dsn: str, url: str, console: Console) -> None:
    conn = await db.connect(dsn)
    try:
        applied = await db.migrate(conn)
        if applied:
            console.print(f"[dim]applied migrations {applied}[/]")
        has_admin = await conn.fetchval("SELECT count(*) FROM tokens WHERE role = 'admin'")
        if not has_admin:
            created = await auth.create_token(
                conn, auth.TokenCreate(name="ferry-up admin", role=auth.Role.admin), by=None
            )
            path = write_config(url, created.token)
            console.print(f"created an admin token, written to [bold]{path}[/] (mode 0600)")
        elif read_config().get("url") != url and read_config().get("token"):
            write_config(url, read_config()["token"])
    finally:
        await conn.close()


def _wait_ready(url: str, children: list[Child], timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(c.process.poll() is not None for c in children):
            return False
        try:
            if httpx.get(f"{url}/readyz", timeout=1.0).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    return False


def _runner_image_unusable(settings: Settings, console: Console) -> bool:
    """With `runtime = auto` and a Docker engine, make sure the runner image exists: build it
    (its progress shown) where it can be built, and otherwise say so and answer True, so
    replicas run in the process runtime rather than executions waiting on an image forever."""
    if settings.runtime != "auto":
        return False
    try:
        import docker

        client = docker.from_env(timeout=5)
        client.ping()
    except Exception:
        return False  # no engine: `auto` is the process runtime already
    from worker import images

    tag = settings.runner_image
    try:
        if images.runner_image_exists(client, tag):
            return False
        if tag != images.RUNNER_TAG:
            raise images.ImageBuildError(f"{tag} is not on this engine", "")
        console.print(f"building the runner image {tag} (first start only, a few minutes)…")
        with console.status(f"building {tag}…") as status:
            images.build_runner_image(
                tag, on_progress=lambda line: status.update(f"{tag}: {line[:100]}"), client=client
            )
        console.print(f"[green]✓[/] built the runner image {tag}")
        return False
    except Exception as exc:
        console.print(
            f"[yellow]the runner image {tag} is missing and cannot be built here ({exc}):[/] "
            "replicas run in the process runtime, without isolation, until it exists "
            "(`ferry image build`, as root with debootstrap)"
        )
        return True


def run_up(settings: Settings) -> int:
    console = Console(stderr=True)
    started = time.monotonic()
    ensure_private_dir(settings.data_dir)
    stack = EmbeddedStack(settings.data_dir)
    with console.status("starting embedded servers…"):
        dsn, redis_url = stack.start(settings.database_url, settings.redis_url)
    if stack.postgres:
        console.print(f"[green]✓[/] PostgreSQL (embedded) in {settings.data_dir / 'postgres'}")
    if stack.redis:
        console.print(f"[green]✓[/] Redis (embedded) at {stack.redis.socket_path}")
    url = f"http://{settings.api_host}:{settings.api_port}"
    children: list[Child] = []
    stopping = False

    def request_stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        asyncio.run(_bootstrap(dsn, url, console))
        env = {
            **os.environ,
            "FERRY_DATABASE_URL": dsn,
            "FERRY_REDIS_URL": redis_url,
            "FERRY_DATA_DIR": str(settings.data_dir),
        }
        if _runner_image_unusable(settings, console):
            env["FERRY_RUNTIME"] = "process"
        children = [Child(role, _spawn(role, env)) for role in ROLES]
        if not _wait_ready(url, children):
            console.print("[red]✗ Ferry did not become ready; see the messages above[/]")
            return 1
        console.print(
            f"[bold green]Ferry is up[/] at [bold]{url}[/] in {time.monotonic() - started:.1f} s "
            f"(API docs: {url}/api/docs). Ctrl-C stops it."
        )
        # The worker and scheduler serve their own metrics; a busy port only costs those
        # (the process logs a warning and runs on), never `ferry up` itself.
        ports = [
            ("worker", settings.metrics_port_worker),
            ("scheduler", settings.metrics_port_scheduler),
        ]
        console.print(
            f"[dim]metrics: {url}/metrics"
            + "".join(
                f", {role} http://{settings.metrics_host}:{p}/metrics" for role, p in ports if p
            )
            + "[/]"
        )
        server_restarts: dict[str, list[float]] = {}
        retry_at: dict[str, float] = {}
        while not stopping:
            time.sleep(0.2)
            # The embedded servers first: the processes reconnect to them by themselves
            # (with backoff), so a dead server is restarted, never the processes with it.
            for name, server in stack.servers():
                if server.alive() or stopping or time.monotonic() < retry_at.get(name, 0):
                    continue
                restarts = server_restarts.setdefault(name, [])
                if _crash_loop(restarts):
                    console.print(f"[red]✗ {name} (embedded) keeps dying; stopping[/]")
                    return 1
                console.print(f"[yellow]! {name} (embedded) died; restarting it[/]")
                try:
                    server.restart()
                except Exception as exc:
                    # A dying server may hold its socket or shared memory a moment longer.
                    retry_at[name] = time.monotonic() + 2.0 * len(restarts)
                    console.print(f"[yellow]! {name} (embedded) did not start: {exc}[/]")
                else:
                    console.print(f"[green]✓[/] {name} (embedded) is back")
            for child in children:
                code = child.process.poll()
                if code is None or stopping:
                    continue
                if _crash_loop(child.restarts):
                    console.print(f"[red]✗ {child.role} keeps dying (exit {code}); stopping[/]")
                    return 1
                console.print(f"[yellow]! {child.role} exited with {code}; restarting[/]")
                child.process = _spawn(child.role, env)
        return 0
    finally:
        console.print("stopping…")
        for child in children:
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for child in children:
            try:
                child.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()
        stack.stop()
        console.print("[green]✓[/] stopped")
