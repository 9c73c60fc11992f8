"""A worker's control channel: Redis pub/sub messages, for sub-second reaction.

- an enqueue (`JOBS_CHANNEL`, naming a queue) wakes the consumers of that queue here;
- a wake-up (`WAKE_CHANNEL`) runs a placement round at once;
- a termination request (`TERMINATE_CHANNEL`) stops the execution if it runs here.

Messages sent while Redis is away are lost; the heartbeat's lease check, the placement
loop's own tick and the consumers' fallback poll cover for them until the subscription is
back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping

from arq.connections import ArqRedis

from core import events, queue
from core.outages import UNAVAILABLE, Outage
from worker.heartbeat import ExecutionRunner

log = logging.getLogger(__name__)


class QueueWakes:
    """The wake-up events of this worker's queue consumers, by queue."""

    def __init__(self) -> None:
        self._wakes: dict[str, set[asyncio.Event]] = {}

    def listen(self, queue_name: str, wake: asyncio.Event) -> None:
        """Set `wake` whenever an enqueue names `queue_name`."""
        self._wakes.setdefault(queue_name, set()).add(wake)

    def unlisten(self, queue_name: str, wake: asyncio.Event) -> None:
        wakes = self._wakes.get(queue_name)
        if wakes is not None:
            wakes.discard(wake)
            if not wakes:
                del self._wakes[queue_name]

    def wake(self, queue_name: str) -> None:
        for wake in self._wakes.get(queue_name, ()):
            wake.set()

    def wake_all(self) -> None:
        for wakes in self._wakes.values():
            for wake in wakes:
                wake.set()


class ControlChannel:
    def __init__(
        self,
        redis: ArqRedis,
        queue_wakes: QueueWakes,
        placement_wake: asyncio.Event,
        running: Mapping[str, ExecutionRunner],
    ) -> None:
        """`placement_wake` starts a placement round; `running` is the worker's map of the
        executions it runs (execution id to replica)."""
        self.redis = redis
        self.queue_wakes = queue_wakes
        self.placement_wake = placement_wake
        self.running = running

    async def listen(self) -> None:
        """Subscribe and act on each message until cancelled, again after each outage."""
        outage = Outage("control channel", log)
        while True:
            try:
                await self._listen_once(outage)
            except asyncio.CancelledError:
                raise
            except UNAVAILABLE as exc:
                await asyncio.sleep(outage.lost(exc))

    async def _listen_once(self, outage: Outage) -> None:
        pubsub = self.redis.pubsub()
        try:
            await pubsub.subscribe(events.TERMINATE_CHANNEL, queue.WAKE_CHANNEL, queue.JOBS_CHANNEL)
            outage.ok()
            self.placement_wake.set()  # whatever was queued while away is placed at once
            self.queue_wakes.wake_all()  # and looked at by the consumers
            async for message in pubsub.listen():
                if message["type"] != "message":
                    continue
                channel = message["channel"].decode()
                data = message["data"].decode()
                if channel == queue.JOBS_CHANNEL:
                    self.queue_wakes.wake(data)
                elif channel == queue.WAKE_CHANNEL:
                    self.placement_wake.set()
                elif (runner := self.running.get(data)) is not None:
                    log.info("terminating %s on request", data)
                    with contextlib.suppress(Exception):
                        await runner.stop_execution(data)
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()
