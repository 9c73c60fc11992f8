"""The hand-chained baseline: a client runs the pipeline benchmark's functions through
Ferry's executions API itself — POST, wait, POST the next one with the previous output —
on the same services as the engine's cases (`bench/pipeline_cases.py`)."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from typing import Any

from bench.cpu import CpuMeter
from bench.cpu import delta as cpu_delta
from bench.ferry_cases import JITTER_S, BenchError, FerryClient, db_times
from bench.pipeline_cases import CHAIN
from bench.stats import percentile, summary_ms


async def _execute(
    client: FerryClient, service: str, function: str, payload: dict[str, Any]
) -> dict[str, Any]:
    created = await client.call(
        "POST",
        "/api/v1/executions",
        json={"service": service, "function": function, "input": payload},
    )
    done = await client.call(
        "GET", f"/api/v1/executions/{created['id']}/wait", params={"timeout": 30}
    )
    if done["status"] != "success":
        raise BenchError(f"execution {done['id']} ended {done['status']}: {done.get('error')}")
    return done


async def _hand_chain_once(client: FerryClient, service: str) -> dict[str, Any]:
    wall = time.time()
    t0 = time.perf_counter()
    ids, x = [], 0
    for _ in CHAIN:
        done = await _execute(client, service, "step", {"x": x})
        ids.append(done["id"])
        x = done["output"]["x"]
    return {"ids": ids, "wall_start": wall, "total_s": time.perf_counter() - t0}


async def hand_chain(
    client: FerryClient,
    dsn: str,
    service: str,
    *,
    runs: int,
    warmup: int,
    budget_s: float,
    meter: CpuMeter,
) -> dict[str, Any]:
    for _ in range(warmup):
        await _hand_chain_once(client, service)
    results = []
    deadline = time.monotonic() + budget_s
    before = await asyncio.to_thread(meter.snapshot)
    for _ in range(runs):
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(random.uniform(0, JITTER_S))
        results.append(await _hand_chain_once(client, service))
    after = await asyncio.to_thread(meter.snapshot)
    times = await db_times(dsn, [i for r in results for i in r["ids"]])
    hops: list[float] = []
    to_created: list[float] = []
    created_to_started: list[float] = []
    for run in results:
        rows = [times.get(i) for i in run["ids"]]
        for up, down in itertools.pairwise(rows):
            if up is None or down is None or up["finished"] is None or down["started"] is None:
                continue
            hops.append(down["started"] - up["finished"])
            to_created.append(down["created"] - up["finished"])
            created_to_started.append(down["started"] - down["created"])
    return {
        "runs": len(results),
        "warmup": warmup,
        "complete": len(results) == runs,
        "end_to_end": summary_ms([r["total_s"] for r in results]),
        "hop": summary_ms(hops),
        "steps_p50_ms": {
            "hop_finished_to_next_created": round(
                percentile([v * 1000 for v in to_created], 50), 2
            ),
            "hop_created_to_started": round(
                percentile([v * 1000 for v in created_to_started], 50), 2
            ),
        },
        "cpu": cpu_delta(before, after, 3 * len(results)),
        "note": "the client POSTs A, waits (/wait), POSTs B with A's output, ... Hop as for "
        "the engine: finished_at -> the next one's started_at; it includes the "
        "client's round trips.",
    }


async def _terminal_since(client: FerryClient, service: str) -> int:
    counts = await client.call("GET", "/api/v1/executions/counters", params={"service": service})
    return sum(counts.get(k, 0) for k in ("success", "failed", "terminated"))


async def _hand_fanout_once(
    client: FerryClient, service: str, size: int, batch: int, timeout_s: float
) -> dict[str, Any]:
    t0 = time.perf_counter()
    first = await _execute(client, service, "spread", {"n": size})
    items = first["output"]["items"]
    base = await _terminal_since(client, service)
    ids: list[str] = []
    for start in range(0, len(items), batch):
        answer = await client.call(
            "POST",
            "/api/v1/executions/batch",
            json={
                "executions": [
                    {"service": service, "function": "step", "input": {"x": x}}
                    for x in items[start : start + batch]
                ]
            },
        )
        ids += [e["id"] for e in answer["items"]]
    deadline = time.monotonic() + timeout_s
    while await _terminal_since(client, service) < base + len(ids):
        if time.monotonic() > deadline:
            raise BenchError(f"hand-chained fan-out: not every element ended in {timeout_s:g} s")
        await asyncio.sleep(0.02)
    # Gather the outputs in element order: one list request per 1,000 executions.
    outputs: dict[str, Any] = {}
    cursor = None
    while True:
        params: dict[str, Any] = {
            "service": service,
            "function": "step",
            "limit": 1000,
            "created_after": first["created_at"],
        }
        if cursor:
            params["cursor"] = cursor
        page = await client.call("GET", "/api/v1/executions", params=params)
        for item in page["items"]:
            outputs[item["id"]] = item
        cursor = page.get("next_cursor")
        if not cursor:
            break
    missing = [i for i in ids if i not in outputs]
    if missing:
        raise BenchError(f"hand-chained fan-out: {len(missing)} executions not listed")
    failed = [i for i in ids if outputs[i]["status"] != "success"]
    if failed:
        raise BenchError(f"hand-chained fan-out: {len(failed)} elements did not succeed")
    merged = [outputs[i]["output"]["x"] for i in ids]
    last = await _execute(client, service, "total", {"xs": merged})
    if last["output"]["count"] != size:
        raise BenchError(f"hand-chained fan-out: total saw {last['output']['count']} values")
    return {"total_s": time.perf_counter() - t0, "elements": len(ids)}


async def hand_fanout(
    client: FerryClient,
    service: str,
    *,
    size: int,
    repeats: int,
    batch: int,
    budget_s: float,
    meter: CpuMeter,
) -> dict[str, Any]:
    await _hand_fanout_once(client, service, min(size, 20), batch, 60)  # warm-up
    results = []
    deadline = time.monotonic() + budget_s
    before = await asyncio.to_thread(meter.snapshot)
    for _ in range(repeats):
        if time.monotonic() > deadline:
            break
        results.append(await _hand_fanout_once(client, service, size, batch, 120))
    after = await asyncio.to_thread(meter.snapshot)
    return {
        "size": size,
        "repeats": len(results),
        "complete": len(results) == repeats,
        "wall": summary_ms([r["total_s"] for r in results]),
        "cpu": cpu_delta(before, after, size * len(results)),
        "note": "the client runs spread, POSTs one step per element (/executions/batch of "
        f"{batch}), polls /executions/counters every 20 ms until all ended, lists "
        "their outputs, and runs total on the list.",
    }
