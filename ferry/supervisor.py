"""`ferry up`: embedded servers, migrations, the first admin token, and the API, scheduler
and worker as child processes, restarted if they die, stopped together on Ctrl-C."""

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


def _spawn(role: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "ferry", role], env=env)


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
            + "".join(f", {role} http://{settings.api_host}:{p}/metrics" for role, p in ports if p)
            + "[/]"
        )
        while not stopping:
            time.sleep(0.2)
            for child in children:
                code = child.process.poll()
                if code is None or stopping:
                    continue
                now = time.monotonic()
                child.restarts = [t for t in child.restarts if now - t < 60] + [now]
                if len(child.restarts) > 5:
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
