"""Idle cost and load: an idle warm replica, many idle services on one worker, and
executions arriving from many concurrent clients.

CPU comes from /proc per component (bench/cpu.py); memory from /proc of the agents (RSS and
PSS, the agent and its children: a ready child forked ahead of time, if any).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from bench.cpu import CpuMeter, _processes
from bench.cpu import delta as cpu_delta
from bench.ferry_cases import BenchError, FerryClient
from bench.stats import percentile, summary_ms


def _per_s(cpu: dict[str, Any], parts: tuple[str, ...]) -> float:
    wall = cpu["wall_s"] or 1
    return round(1000 * sum(cpu["cpu_s"].get(p, 0.0) for p in parts) / wall, 2)


async def idle_cpu(meter: CpuMeter, seconds: float) -> dict[str, Any]:
    """CPU per second of every component while nothing is asked of Ferry."""
    before = await asyncio.to_thread(meter.snapshot)
    await asyncio.sleep(seconds)
    after = await asyncio.to_thread(meter.snapshot)
    cpu = cpu_delta(before, after, 0)
    parts = [n for n in cpu["cpu_s"] if n not in ("others (not this benchmark)", "bench client")]
    return {
        "seconds": seconds,
        "cpu": cpu,
        "ms_per_s": {n: _per_s(cpu, (n,)) for n in parts},
        "worker_redis_ms_per_s": _per_s(cpu, ("worker", "redis")),
        "worker_redis_agents_ms_per_s": _per_s(cpu, ("worker", "redis", "agents")),
        "all_ms_per_s": _per_s(cpu, tuple(parts)),
        "others_pct_of_machine": cpu["others_pct_of_machine"],
    }


def _memory_kb(pid: int) -> tuple[int, int]:
    rss = pss = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


def agent_memory(meter: CpuMeter, worker_pid: int) -> dict[str, Any]:
    """RSS and PSS per replica: its agent process plus its children (a ready child)."""
    procs = _processes()
    roots = set(meter._container_roots())
    roots |= {p.pid for p in procs.values() if "agent.py" in p.cmdline and p.ppid == worker_pid}
    children: dict[int, list[int]] = {}
    for proc in procs.values():
        children.setdefault(proc.ppid, []).append(proc.pid)
    per_replica_rss, per_replica_pss, agent_only = [], [], []
    for root in roots:
        tree, stack = [], [root]
        while stack:
            pid = stack.pop()
            tree.append(pid)
            stack += children.get(pid, [])
        sizes = [_memory_kb(pid) for pid in tree]
        per_replica_rss.append(sum(s[0] for s in sizes) / 1024)
        per_replica_pss.append(sum(s[1] for s in sizes) / 1024)
        agent_only.append(sizes[0][0] / 1024)
    n = len(roots)
    return {
        "replicas": n,
        "rss_mb_per_replica_p50": round(percentile(per_replica_rss, 50), 1) if n else None,
        "rss_mb_per_replica_max": round(max(per_replica_rss), 1) if n else None,
        "pss_mb_per_replica_p50": round(percentile(per_replica_pss, 50), 1) if n else None,
        "agent_process_rss_mb_p50": round(percentile(agent_only, 50), 1) if n else None,
        "worker_rss_mb": round(_memory_kb(worker_pid)[0] / 1024, 1),
        "note": "per replica: the agent process and its children (RSS counts shared pages "
        "in each process; PSS shares them out).",
    }


async def _ready_replicas(dsn: str, service_ids: list[str]) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(
            "SELECT count(*) FROM replicas WHERE service_id = ANY($1::text[]) AND status = 'ready'",
            service_ids,
        )
    finally:
        await conn.close()


async def many_services(
    client: FerryClient,
    dsn: str,
    project: str,
    package: str,
    *,
    count: int,
    idle_s: float,
    meter: CpuMeter,
    worker_pid: int,
    budget_s: float,
) -> dict[str, Any]:
    started = time.monotonic()
    runtime = {"concurrency": 1, "min_replicas": 1, "max_replicas": 1}
    ids = [
        await client.create_service(project, package, f"many-{i}", runtime) for i in range(count)
    ]
    deadline = time.monotonic() + budget_s
    ready = 0
    while time.monotonic() < deadline:
        ready = await _ready_replicas(dsn, ids)
        if ready >= count:
            break
        await asyncio.sleep(1.0)
    start_s = time.monotonic() - started
    report: dict[str, Any] = {"services": count, "ready": ready, "all_ready_s": round(start_s, 1)}
    if ready < count:
        report["error"] = f"only {ready} of {count} replicas ready after {budget_s:g} s"
        return {**report, "service_ids": ids}
    await asyncio.sleep(5)  # the start-up's last writes and log lines settle
    report["idle"] = await idle_cpu(meter, idle_s)
    idle = report["idle"]
    report["idle_cores"] = round(idle["all_ms_per_s"] / 1000, 3)
    report["worker_redis_ms_per_s_per_replica"] = round(idle["worker_redis_ms_per_s"] / count, 3)
    report["memory"] = await asyncio.to_thread(agent_memory, meter, worker_pid)
    # Then one execution on each, 20 at a time.
    gate = asyncio.Semaphore(20)
    samples: list[float] = []

    async def one(service_id: str) -> None:
        async with gate:
            run = await client.run_one(service_id)
            samples.append(run["total_s"])

    before = await asyncio.to_thread(meter.snapshot)
    t0 = time.perf_counter()
    await asyncio.gather(*(one(s) for s in ids))
    elapsed = time.perf_counter() - t0
    after = await asyncio.to_thread(meter.snapshot)
    report["one_each"] = {
        "executions": len(samples),
        "elapsed_s": round(elapsed, 2),
        "post_to_terminal": summary_ms(samples),
        "cpu": cpu_delta(before, after, len(samples)),
    }
    return {**report, "service_ids": ids}


async def concurrent_clients(
    url: str,
    token: str,
    service_id: str,
    *,
    clients: int,
    total: int,
    budget_s: float,
    meter: CpuMeter,
) -> dict[str, Any]:
    """`clients` tasks, each POST → /wait → next, until `total` executions ended.

    The client is aiohttp, not the httpx of the other phases: at 50 requests in flight
    httpx spent more CPU than Ferry did, and the phase measured the client."""
    headers = {"Authorization": f"Bearer {token}"}
    connector = aiohttp.TCPConnector(limit=clients * 2 + 4)
    left = [total]
    samples: list[float] = []
    failed: list[str] = []
    deadline = time.monotonic() + budget_s
    body = {"service": service_id, "function": "noop"}

    async def one(http: aiohttp.ClientSession) -> None:
        t0 = time.perf_counter()
        async with http.post(f"{url}/api/v1/executions", json=body) as response:
            if response.status != 201:
                raise BenchError(f"POST /executions: {response.status} {await response.text()}")
            created = await response.json()
        async with http.get(
            f"{url}/api/v1/executions/{created['id']}/wait", params={"timeout": "60"}
        ) as response:
            done = await response.json()
        samples.append(time.perf_counter() - t0)
        if done.get("status") != "success":
            failed.append(created["id"])

    async def client(http: aiohttp.ClientSession) -> None:
        while left[0] > 0 and time.monotonic() < deadline:
            left[0] -= 1
            await one(http)

    async with aiohttp.ClientSession(
        connector=connector, headers=headers, timeout=aiohttp.ClientTimeout(total=90)
    ) as http:
        left[0] = clients  # warm-up: every client once, untimed
        await asyncio.gather(*(client(http) for _ in range(clients)))
        samples.clear()
        left[0] = total
        before = await asyncio.to_thread(meter.snapshot)
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        elapsed = time.perf_counter() - t0
        after = await asyncio.to_thread(meter.snapshot)
    if len(samples) < total:
        raise BenchError(f"load phase: only {len(samples)} of {total} ended in {budget_s:g} s")
    return {
        "clients": clients,
        "executions": len(samples),
        "not_success": len(failed),
        "elapsed_s": round(elapsed, 2),
        "executions_per_s": round(len(samples) / elapsed, 1),
        "post_to_terminal": summary_ms(samples),
        "cpu": cpu_delta(before, after, len(samples)),
        "note": f"{clients} concurrent clients (aiohttp), each POST /executions → /wait → "
        "the next; one service, 2 warm replicas x concurrency 16.",
    }
