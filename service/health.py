"""Liveness and readiness probes."""

from __future__ import annotations

import asyncio

from aiohttp import web

from service.keys import DB, REDIS


async def healthz(request: web.Request, body, query):
    return {"status": "ok"}


async def readyz(request: web.Request, body, query):
    """Ready when PostgreSQL and Redis both answer within a second; 503 names what is down."""
    checks: dict[str, str] = {}
    for name, probe in (
        ("postgres", request.app[DB].fetchval("SELECT 1")),
        ("redis", request.app[REDIS].ping()),
    ):
        try:
            await asyncio.wait_for(probe, 1.0)
            checks[name] = "ok"
        except Exception as exc:  # any failure means "not ready"; the reason is reported
            checks[name] = f"down: {type(exc).__name__}: {exc}"
    ready = all(v == "ok" for v in checks.values())
    return {"status": "ready" if ready else "unavailable", "checks": checks}, 200 if ready else 503
