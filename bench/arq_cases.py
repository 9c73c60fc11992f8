"""Baselines: a bare arq no-op on the same Redis, and `docker run` per call."""

from __future__ import annotations

import asyncio
import contextlib
import random
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from arq.connections import ArqRedis, RedisSettings, create_pool

from bench.cpu import CpuMeter
from bench.cpu import delta as cpu_delta
from bench.ferry_cases import JITTER_S
from bench.stack import REPO, tail
from bench.stats import summary_ms


def _spawn_worker(
    redis_url: str, queue: str, poll_delay: float, max_jobs: int, log_path: Any
) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.arq_worker",
                "--redis",
                redis_url,
                "--queue",
                queue,
                "--poll-delay",
                str(poll_delay),
                "--max-jobs",
                str(max_jobs),
            ],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@contextlib.asynccontextmanager
async def arq_worker(
    redis_url: str, queue: str, poll_delay: float, max_jobs: int, log_path: Any, meter: CpuMeter
) -> AsyncIterator[subprocess.Popen[bytes]]:
    process = await asyncio.to_thread(
        _spawn_worker, redis_url, queue, poll_delay, max_jobs, log_path
    )
    meter.roots[process.pid] = "arq worker"
    try:
        yield process
    finally:
        meter.roots.pop(process.pid, None)
        if process.poll() is None:
            process.terminate()
            try:
                await asyncio.to_thread(process.wait, 15)
            except subprocess.TimeoutExpired:
                process.kill()
                await asyncio.to_thread(process.wait, 10)


async def _one(redis: ArqRedis, queue: str, poll_delay: float) -> float:
    t0 = time.perf_counter()
    job = await redis.enqueue_job("noop", _queue_name=queue)
    assert job is not None
    await job.result(timeout=30, poll_delay=poll_delay)
    return time.perf_counter() - t0


async def arq_latency(
    redis_url: str,
    poll_delay: float,
    *,
    runs: int,
    warmup: int,
    budget_s: float,
    log_path: Any,
    meter: CpuMeter,
) -> dict[str, Any]:
    """Enqueue → `job.result()`, sequentially; worker and result polling at `poll_delay`."""
    queue = f"bench:arq:{uuid.uuid4().hex[:8]}"
    redis = await create_pool(RedisSettings.from_dsn(redis_url))
    try:
        async with arq_worker(redis_url, queue, poll_delay, 10, log_path, meter) as process:
            # The first job waits for the worker process to start.
            first = await redis.enqueue_job("noop", _queue_name=queue)
            assert first is not None
            try:
                await first.result(timeout=30, poll_delay=0.01)
            except TimeoutError:
                raise RuntimeError(f"the arq worker did not answer:\n{tail(log_path)}") from None
            for _ in range(warmup):
                await _one(redis, queue, poll_delay)
            samples = []
            deadline = time.monotonic() + budget_s
            before = await asyncio.to_thread(meter.snapshot)
            for _ in range(runs):
                if time.monotonic() > deadline or process.poll() is not None:
                    break
                await asyncio.sleep(random.uniform(0, JITTER_S))  # as for Ferry's runs
                samples.append(await _one(redis, queue, poll_delay))
            after = await asyncio.to_thread(meter.snapshot)
    finally:
        await redis.delete(queue)
        await redis.aclose()
    return {
        "poll_delay_s": poll_delay,
        "runs": len(samples),
        "complete": len(samples) == runs,
        "enqueue_to_result": summary_ms(samples),
        "cpu": cpu_delta(before, after, len(samples)),
    }


async def arq_throughput(
    redis_url: str,
    poll_delay: float,
    *,
    total: int,
    max_jobs: int,
    budget_s: float,
    log_path: Any,
    meter: CpuMeter,
) -> dict[str, Any]:
    """Enqueue `total` jobs (50 enqueues in flight), time until the queue is empty."""
    queue = f"bench:arq:{uuid.uuid4().hex[:8]}"
    redis = await create_pool(RedisSettings.from_dsn(redis_url))
    try:
        async with arq_worker(redis_url, queue, poll_delay, max_jobs, log_path, meter) as process:
            first = await redis.enqueue_job("noop", _queue_name=queue)
            assert first is not None
            await first.result(timeout=30, poll_delay=0.01)
            gate = asyncio.Semaphore(50)

            async def enqueue() -> None:
                async with gate:
                    await redis.enqueue_job("noop", _queue_name=queue)

            deadline = time.monotonic() + budget_s
            before = await asyncio.to_thread(meter.snapshot)
            t0 = time.perf_counter()
            await asyncio.gather(*(enqueue() for _ in range(total)))
            t_enqueued = time.perf_counter()
            # arq removes a job from the queue (sorted set) in the same transaction as it
            # stores the result: an empty queue means every job finished.
            while await redis.zcard(queue) and time.monotonic() < deadline:
                if process.poll() is not None:
                    break
                await asyncio.sleep(0.01)
            t_done = time.perf_counter()
            after = await asyncio.to_thread(meter.snapshot)
            left = await redis.zcard(queue)
    finally:
        await redis.delete(queue)
        await redis.aclose()
    elapsed = t_done - t0
    return {
        "poll_delay_s": poll_delay,
        "jobs": total,
        "max_jobs": max_jobs,
        "complete": left == 0,
        "enqueue_s": round(t_enqueued - t0, 3),
        "elapsed_s": round(elapsed, 3),
        "jobs_per_s": round((total - left) / elapsed, 1),
        "cpu": cpu_delta(before, after, total - left),
    }


def docker_run(image: str, calls: int, budget_s: float) -> dict[str, Any]:
    """`docker run --rm IMAGE python3 -c pass`, one after another (plus one not counted)."""
    command = ["docker", "run", "--rm", image, "python3", "-c", "pass"]
    samples: list[float] = []
    deadline = time.monotonic() + budget_s
    for index in range(calls + 1):
        if time.monotonic() > deadline:
            break
        t0 = time.perf_counter()
        done = subprocess.run(command, capture_output=True, timeout=120, check=False)
        elapsed = time.perf_counter() - t0
        if done.returncode != 0:
            raise RuntimeError(f"docker run failed: {done.stderr.decode(errors='replace')[:500]}")
        if index:
            samples.append(elapsed)
    return {
        "image": image,
        "calls": len(samples),
        "command": " ".join(command),
        "per_call": summary_ms(samples),
    }
