"""The API application factory: `create_app(settings, db, redis)` and the process runner."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from importlib.metadata import version

import asyncpg
from aiohttp import web
from arq.connections import ArqRedis

from core.secrets import SecretBox
from core.settings import Settings
from service import waiters
from service.console import add_console_routes
from service.http import endpoint, errors_middleware
from service.keys import DB, PRINCIPAL_CACHE, REDIS, SECRETS, SETTINGS, WAITERS
from service.metrics import METRICS, METRICS_ROUTE, ApiMetrics, metrics_middleware
from service.openapi import add_openapi_routes
from service.routes import ROUTES

log = logging.getLogger("ferry.api")


def create_app(settings: Settings, db: asyncpg.Pool, redis: ArqRedis, dsn: str) -> web.Application:
    """Build the API; `db` and `redis` are owned by the caller, `dsn` opens the LISTEN link."""
    app = web.Application(
        middlewares=[metrics_middleware, errors_middleware],
        client_max_size=(settings.max_upload_mb + 1) * 1024 * 1024,
    )
    app[SETTINGS] = settings
    app[DB] = db
    app[REDIS] = redis
    app[SECRETS] = SecretBox.from_settings(settings)
    app[PRINCIPAL_CACHE] = {}
    app[METRICS] = ApiMetrics(db, redis)

    async def listen_for_finished(app: web.Application) -> AsyncIterator[None]:
        async with waiters.listen(dsn) as listener:
            app[WAITERS] = listener
            yield

    app.cleanup_ctx.append(listen_for_finished)
    routes = [*ROUTES, METRICS_ROUTE]
    for route in routes:
        app.router.add_route(route.method, route.path, endpoint(route))
    add_openapi_routes(app, routes, version("ferry"))
    add_console_routes(app)
    return app
