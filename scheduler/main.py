"""`ferry scheduler`: the reconciler (and, as they land, triggers and retention)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time

from core.metrics_server import serve_metrics
from core.outages import UNAVAILABLE, Outage
from core.resources import open_resources, stop_on_signals
from core.settings import Settings
from scheduler.cron import CronLoop
from scheduler.event_triggers import EventTriggerLoop
from scheduler.metrics import SchedulerMetrics
from scheduler.reconciler import Reconciler
from scheduler.retention import retention_loop

log = logging.getLogger(__name__)


async def run_scheduler(settings: Settings) -> None:
    stop = stop_on_signals()
    async with open_resources(settings, pool_size=8) as res:
        metrics = SchedulerMetrics()
        stop_metrics = serve_metrics(
            metrics.registry,
            settings.metrics_host,
            settings.metrics_port_scheduler,
            "scheduler",
            token=settings.metrics_token,
        )
        reconciler = Reconciler(res.pool, res.redis, metrics)
        scheduler_id = f"{socket.gethostname()}-{os.getpid()}"
        trigger_loops = [
            asyncio.create_task(
                CronLoop(res.pool, res.redis, scheduler_id, settings.misfire_run_all_cap).run(stop)
            ),
            asyncio.create_task(EventTriggerLoop(res.pool, res.redis, scheduler_id).run(stop)),
        ]
        retention = asyncio.create_task(
            retention_loop(res.pool, res.redis, settings.retention_days, stop)
        )
        log.info("scheduler up: reconciling every %.1f s", settings.reconcile_interval_s)
        due = time.monotonic()
        outage = Outage("reconciler", log)
        while not stop.is_set():
            metrics.lag.observe(max(time.monotonic() - due, 0.0))
            interval = settings.reconcile_interval_s
            try:
                await reconciler.run_once()
                outage.ok()
            except UNAVAILABLE as exc:
                interval = max(interval, outage.lost(exc))
            except Exception:
                log.exception("reconcile round failed; trying again")
            due = time.monotonic() + interval
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
        await asyncio.gather(*trigger_loops)
        await retention
        await asyncio.to_thread(stop_metrics)
