"""A replica's consumer of its service's arq queue: woken by enqueues instead of polling,
and starting a poll's jobs in one round trip.

arq's `Worker` is the base; `Replica` gives it one function, `run_execution`, and the
number of executions the agent may run at once.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import arq
from arq.connections import create_pool
from arq.constants import in_progress_key_prefix
from arq.utils import timestamp_ms

# Start jobs as arq's start_jobs does (WATCH the in-progress key, check the queue score,
# then mark it in progress), for many jobs in one atomic round trip.
_START_JOBS_SCRIPT = """
local now = tonumber(ARGV[1])
local free = tonumber(ARGV[3])
local started = {}
for i = 4, #ARGV do
  if #started >= free * 2 then break end
  local id = ARGV[i]
  local key = 'IN_PROGRESS_PREFIX' .. id
  if redis.call('EXISTS', key) == 0 then
    local score = redis.call('ZSCORE', KEYS[1], id)
    if score and tonumber(score) <= now then
      redis.call('PSETEX', key, ARGV[2], '1')
      started[#started + 1] = id
      started[#started + 1] = score
    end
  end
end
return started
""".replace("IN_PROGRESS_PREFIX", in_progress_key_prefix)


class QueueConsumer(arq.Worker):
    """arq's consumer, woken by enqueues instead of polling.

    arq polls its queue every `poll_delay`; this one sleeps on `wake` (set by the worker's
    pub/sub listener when an enqueue names this queue, or by its own jobs ending while the
    last look left jobs behind) and looks at the queue at least every `fallback_poll_s`,
    so a lost wake-up costs a delay, never an execution. A job put back with a delay wakes
    it when due. An idle replica therefore costs Redis nothing but the fallback poll.

    It also minds what it runs itself: a restarted Redis may have lost the last second of
    writes, among them the "in progress" mark of a job running here, and arq would start
    that job a second time in this very consumer (the claim would refuse it, but arq's own
    bookkeeping of the pair breaks)."""

    def __init__(self, *args: Any, wake: asyncio.Event, fallback_poll_s: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.wake = wake
        self.fallback_poll_s = fallback_poll_s
        self.fallback_pickups = 0  # jobs started by a fallback poll: their wake-up was lost
        self._backlog = False  # the last look left jobs this consumer may take later
        self._next_due_s: float | None = None  # when the earliest delayed job is due
        self._started = 0  # jobs this consumer started, in all
        self._start_script: Any = None

    async def main(self) -> None:
        if self._pool is None:
            self._pool = await create_pool(
                self.redis_settings,
                job_deserializer=self.job_deserializer,
                job_serializer=self.job_serializer,
                default_queue_name=self.queue_name,
                expires_extra_ms=self.expires_extra_ms,
            )
        self.ctx["redis"] = self.pool
        if self.on_startup:
            await self.on_startup(self.ctx)
        by_fallback = False
        while True:
            self.wake.clear()  # before the look: a wake-up arriving during it is kept
            started = self._started
            await self._poll_iteration()
            if by_fallback:
                self.fallback_pickups += self._started - started
            delay = self.fallback_poll_s
            if self._next_due_s is not None:
                delay = min(delay, max(self._next_due_s, 0.0) + 0.002)
            try:
                await asyncio.wait_for(self.wake.wait(), delay)
                by_fallback = False
            except TimeoutError:
                by_fallback = delay >= self.fallback_poll_s

    async def _poll_iteration(self) -> None:
        self._next_due_s = None
        if self.allow_pick_jobs and self.job_counter < self.max_jobs:
            now = timestamp_ms()
            async with self.pool.pipeline(transaction=False) as pipe:
                pipe.zrangebyscore(
                    self.queue_name,
                    min=float("-inf"),
                    max=now,
                    start=self._queue_read_offset,
                    num=self.queue_read_limit,
                )
                pipe.zrangebyscore(
                    self.queue_name, min=now + 1, max=float("inf"), start=0, num=1, withscores=True
                )
                job_ids, later = await pipe.execute()
            await self.start_jobs(job_ids)
            # Jobs seen but not started here (all slots taken, or running elsewhere): look
            # again when one of ours ends.
            self._backlog = any(job_id.decode() not in self.tasks for job_id in job_ids)
            if later:
                self._next_due_s = later[0][1] / 1000 - time.time()
        else:
            self._backlog = self.allow_pick_jobs
        for job_id, task in list(self.tasks.items()):
            if task.done():
                del self.tasks[job_id]
                task.result()  # as arq does: errors of run_job propagate
        await self.heart_beat()

    def _release_sem_dec_counter_on_complete(self) -> None:
        super()._release_sem_dec_counter_on_complete()
        if self._backlog:
            self.wake.set()

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """arq's start, in one round trip for all `job_ids` instead of four per job: the
        script marks in progress, atomically, each that is neither in progress (here or
        elsewhere) nor gone from the queue nor delayed, up to the free slots."""
        running = {job_id for job_id, task in self.tasks.items() if not task.done()}
        wanted = [j.decode() for j in job_ids]
        wanted = [j for j in wanted if j not in running]
        free = self.max_jobs - self.job_counter
        if not wanted or free <= 0:
            return
        if self._start_script is None:
            self._start_script = self.pool.register_script(_START_JOBS_SCRIPT)
        started = await self._start_script(
            keys=[self.queue_name],
            args=[timestamp_ms(), int(self.in_progress_timeout_s * 1000), free, *wanted],
        )
        for job_id_b, score in zip(started[::2], started[1::2], strict=True):
            job_id = job_id_b.decode()
            await self.sem.acquire()  # arq's accounting: never blocks, the script kept count
            self.job_counter += 1
            task = self.loop.create_task(self.run_job(job_id, int(float(score))))
            task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
            self.tasks[job_id] = task
            self._started += 1
