"""`ferry api`: serve the API until SIGINT/SIGTERM; with `--workers N`, N processes share
one listening socket, bound once here and inherited by forked children (no SO_REUSEPORT
needed, so port 0 and every platform with fork work alike). Each process has its own
pool, Redis client, NOTIFY listener and live-stream hub: a follower is served wholly by the
process the kernel handed its connection to."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket

from aiohttp import web

from core.resources import open_resources, stop_on_signals
from core.settings import Settings
from service.app import create_app

log = logging.getLogger("ferry.api")

BACKLOG = 1024


async def serve(
    settings: Settings, stop: asyncio.Event | None = None, sock: socket.socket | None = None
) -> None:
    stop = stop or stop_on_signals()
    async with open_resources(settings, pool_size=20) as res:
        app = create_app(settings, res.pool, res.redis, res.dsn)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site: web.BaseSite
        if sock is None:
            site = web.TCPSite(runner, settings.api_host, settings.api_port, reuse_address=True)
        else:
            site = web.SockSite(runner, sock)
        await site.start()
        log.info("API listening on http://%s:%s", settings.api_host, settings.api_port)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()


def serve_workers(settings: Settings, workers: int) -> int:
    """Bind, fork `workers` API processes onto the socket, and wait for them; SIGINT and
    SIGTERM are passed on. One that exits stops the others (a supervisor restarts the lot);
    returns 0 when all ended cleanly on a signal, else 1."""
    sock = socket.create_server(
        (settings.api_host, settings.api_port), backlog=BACKLOG, reuse_port=False
    )
    children: list[int] = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:  # the child: serve until a signal, never return into the parent's code
            code = 1
            try:
                asyncio.run(serve(settings, sock=sock))
                code = 0
            except BaseException:
                log.exception("API process failed")
            finally:
                logging.shutdown()
                os._exit(code)
        children.append(pid)
    port = sock.getsockname()[1]
    sock.close()  # the children hold it
    log.info("API: %d processes on port %s", workers, port)
    stopping = False

    def pass_on(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGINT, pass_on)
    signal.signal(signal.SIGTERM, pass_on)
    failed = False
    alive = set(children)
    while alive:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        alive.discard(pid)
        if os.waitstatus_to_exitcode(status) != 0 or not stopping:
            failed = True
            if not stopping:
                log.error("API process %d ended; stopping the others", pid)
                pass_on(signal.SIGTERM, None)
    return 1 if failed else 0
