"""`ferry scheduler`: the reconciler (and, as they land, triggers and retention)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from core.resources import open_resources, stop_on_signals
from core.settings import Settings
from scheduler.reconciler import Reconciler

log = logging.getLogger(__name__)


async def run_scheduler(settings: Settings) -> None:
    stop = stop_on_signals()
    async with open_resources(settings, pool_size=5) as res:
        reconciler = Reconciler(res.pool, res.redis)
        log.info("scheduler up: reconciling every %.1f s", settings.reconcile_interval_s)
        while not stop.is_set():
            try:
                await reconciler.run_once()
            except Exception:
                log.exception("reconcile round failed; trying again")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), settings.reconcile_interval_s)
