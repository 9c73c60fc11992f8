"""`ferry worker`: host replicas and run executions until SIGINT/SIGTERM."""

from __future__ import annotations

from core.resources import open_resources, stop_on_signals
from core.settings import Settings
from worker.host import WorkerHost


async def run_worker(settings: Settings) -> None:
    stop = stop_on_signals()
    async with open_resources(settings, pool_size=20) as res:
        await WorkerHost(settings, res.pool, res.redis).run(stop)
