"""Typed keys for what the API application holds: one per external resource."""

from __future__ import annotations

from typing import Any

import asyncpg
from aiohttp import web
from arq.connections import ArqRedis

from core.secrets import SecretBox
from core.settings import Settings

SETTINGS = web.AppKey("settings", Settings)
DB = web.AppKey("db", asyncpg.Pool)
REDIS = web.AppKey("redis", ArqRedis)
SECRETS = web.AppKey("secrets", SecretBox)
PRINCIPAL_CACHE = web.AppKey("principal_cache", dict)
WAITERS = web.AppKey("waiters", Any)

# Per-request values.
REQUEST_ID = web.RequestKey("request_id", str)
PRINCIPAL = web.RequestKey("principal", object)
