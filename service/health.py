"""Liveness and readiness probes, and what this Ferry is (version, upload limits)."""

from __future__ import annotations

import asyncio
from importlib.metadata import version

from aiohttp import web
from pydantic import BaseModel

from service.keys import DB, REDIS, SETTINGS


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


class Limits(BaseModel):
    max_upload_bytes: int
    max_unpacked_bytes: int
    max_archive_files: int


class Info(BaseModel):
    version: str
    limits: Limits


async def info(request: web.Request, body, query):
    """The server's version and package limits, so clients can refuse an archive up front."""
    settings = request.app[SETTINGS]
    return Info(
        version=version("ferry"),
        limits=Limits(
            max_upload_bytes=settings.max_upload_mb << 20,
            max_unpacked_bytes=settings.max_unpacked_mb << 20,
            max_archive_files=settings.max_archive_files,
        ),
    )
