"""`ferry api`: serve the API until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from core.resources import open_resources, stop_on_signals
from core.settings import Settings
from service.app import create_app

log = logging.getLogger("ferry.api")


async def serve(settings: Settings, stop: asyncio.Event | None = None) -> None:
    stop = stop or stop_on_signals()
    async with open_resources(settings, pool_size=20) as res:
        app = create_app(settings, res.pool, res.redis, res.dsn)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, settings.api_host, settings.api_port, reuse_address=True)
        await site.start()
        log.info("API listening on http://%s:%s", settings.api_host, settings.api_port)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()
