"""Live log benchmark: how fast a printed line reaches an SSE follower, and how many
followers of one execution one API process serves.

    python -m bench.logs [--quick] [--runtime process|docker] [--keep] [--out PATH]

(a) latency: a function prints `time.time()` on each of 200 lines, 0.02 s apart, while one
    follower (`GET /api/v1/executions/{id}/logs?follow=true`, `Accept: text/event-stream`,
    httpx streaming) reads them; latency = receive time - printed time (same host, same
    clock).
(b) followers: K followers (100, 250, 500, 1000; 100, 250, 500 with --quick) of one running
    execution printing a timestamped line every 0.1 s for ~10 s. The followers run in 4
    separate client processes (asyncio + httpx, K/4 each), not in the API's process.

Only 127.0.0.1 is used; every process is stopped in `finally`; every loop is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import multiprocessing
import os
import resource
import sys
import time
import traceback
import zipfile
from pathlib import Path
from typing import Any

import httpx
import yaml
from redis.asyncio import Redis

from bench.api import Api as BaseApi
from bench.stack import FerryStack
from bench.stats import summary_ms
from core.events import log_stream_key

RESULTS = Path(__file__).resolve().parent / "results"
CLIENT_PROCESSES = 4
TARGET_P50_MS = 5.0
TARGET_FOLLOWERS = 500
P99_LIMIT_MS = 100.0

MANIFEST = {
    "name": "logbench",
    "description": "timestamped log lines for the log benchmark",
    "modules": [
        {
            "name": "main",
            "entry_point": "main.py",
            "functions": [
                {
                    "name": "ticker",
                    "inputs": [
                        {"name": "lines", "type": "integer"},
                        {"name": "interval", "type": "number"},
                        {"name": "delay", "type": "number"},
                    ],
                    "outputs": [],
                }
            ],
        }
    ],
}
CODE = """\
import time


def ticker(lines, interval, delay):
    time.sleep(delay)
    start = time.time()
    for i in range(lines):
        # Print on the planned beat, not after the previous print: no drift.
        pause = start + i * interval - time.time()
        if pause > 0:
            time.sleep(pause)
        print(f"T {time.time():.6f} {i}", flush=True)
    return None
"""


def package_archive() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("ferry.yaml", yaml.safe_dump(MANIFEST))
        archive.writestr("main.py", CODE)
    return buffer.getvalue()


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def printed_time(text: str) -> float | None:
    parts = text.split()
    if len(parts) >= 3 and parts[0] == "T":
        try:
            return float(parts[1])
        except ValueError:
            return None
    return None


# -- one follower ------------------------------------------------------------------------------


async def follow(
    http: httpx.AsyncClient,
    execution_id: str,
    deadline: float,
    connected: asyncio.Event | None = None,
    timeline: dict[int, tuple[float, float]] | None = None,
) -> dict[str, Any]:
    """Follows one execution's log to its `end` event (or the deadline); per line
    (receive time - printed time), the seqs seen, whether `end` came. With `timeline`, each
    line's (printed, received) times by seq."""
    latencies: list[float] = []
    seqs: set[int] = set()
    ended = False
    connected_at = None
    error = None
    event = None
    try:
        async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
            async with http.stream(
                "GET",
                f"/api/v1/executions/{execution_id}/logs",
                params={"follow": "true"},
                headers={"Accept": "text/event-stream"},
            ) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise RuntimeError(f"{response.status_code} {response.text[:200]}")
                connected_at = time.time()
                if connected is not None:
                    connected.set()
                async for line in response.aiter_lines():
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:"):
                        if event == "end":
                            ended = True
                            break
                        received = time.time()
                        payload = json.loads(line[5:])
                        stamp = printed_time(payload.get("text", ""))
                        if stamp is not None:
                            seqs.add(int(payload["seq"]))
                            latencies.append(received - stamp)
                            if timeline is not None:
                                timeline[int(payload["seq"])] = (stamp, received)
                    elif not line:
                        event = None
    except TimeoutError:
        error = "timeout"
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"[:300]
    if connected is not None:
        connected.set()
    return {
        "latencies": latencies,
        "lines": len(seqs),
        "ended": ended,
        "connected_at": connected_at,
        "error": error,
    }


# -- client processes (for the K followers) -------------------------------------------------


def client_process(
    url: str, token: str, execution_id: str, count: int, budget_s: float, ready, results
) -> None:
    """Holds `count` followers of one execution; puts its findings on `results`."""
    try:
        raise_nofile()
        results.put(asyncio.run(_client_main(url, token, execution_id, count, budget_s, ready)))
    except Exception:
        results.put({"fatal": traceback.format_exc()[-2000:]})


async def _client_main(
    url: str, token: str, execution_id: str, count: int, budget_s: float, ready
) -> dict[str, Any]:
    deadline = time.monotonic() + budget_s
    limits = httpx.Limits(max_connections=count + 10, max_keepalive_connections=count + 10)
    async with httpx.AsyncClient(
        base_url=url,
        headers={"Authorization": f"Bearer {token}"},
        limits=limits,
        timeout=httpx.Timeout(30.0, read=None),
    ) as http:
        events = [asyncio.Event() for _ in range(count)]
        tasks = [asyncio.create_task(follow(http, execution_id, deadline, e)) for e in events]
        start = time.monotonic()
        try:
            async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
                await asyncio.gather(*(e.wait() for e in events))
        except TimeoutError:
            pass
        ready.put(time.monotonic() - start)
        outcomes = await asyncio.gather(*tasks)
    latencies = [lat for o in outcomes for lat in o["latencies"]]
    errors = [o["error"] for o in outcomes if o["error"]]
    return {
        "latencies": latencies,
        "lines": [o["lines"] for o in outcomes],
        "ended": sum(o["ended"] for o in outcomes),
        "connected": sum(o["connected_at"] is not None for o in outcomes),
        "errors": errors[:5],
        "error_count": len(errors),
    }


# -- the benchmark ------------------------------------------------------------------------------


class Api(BaseApi):
    """The shared client, plus what this benchmark asks of the API."""

    async def start(self, service: str, lines: int, interval: float, delay: float) -> str:
        created = await self.call(
            "POST",
            "/api/v1/executions",
            json={
                "service": service,
                "function": "ticker",
                "input": {"lines": lines, "interval": interval, "delay": delay},
            },
        )
        return created["id"]

    async def wait(self, execution_id: str, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"execution {execution_id} not finished in {timeout_s:g} s")
            done = await self.call(
                "GET",
                f"/api/v1/executions/{execution_id}/wait",
                params={"timeout": max(1, min(30, int(left)))},
            )
            if done["status"] in ("success", "failed", "terminated"):
                return done


async def setup(api: Api, runtime: str) -> str:
    project = await api.call("POST", "/api/v1/projects", json={"name": "logbench"})
    package = await api.call(
        "POST",
        "/api/v1/packages",
        data={"project": project["id"]},
        files={"codebase": ("code.zip", package_archive(), "application/zip")},
    )
    service = await api.call(
        "POST",
        "/api/v1/services",
        json={
            "project": project["id"],
            "name": "ticker",
            "package": package["id"],
            "runtime": {"concurrency": 4, "min_replicas": 1, "max_replicas": 1},
            "max_attempts": 1,
        },
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status = await api.call("GET", f"/api/v1/services/{service['id']}/status")
        if any(r["status"] == "ready" for r in status["replicas"]):
            return service["id"]
        await asyncio.sleep(0.1)
    raise RuntimeError(f"no ready replica in 120 s ({runtime} runtime)")


async def single_follower(
    api: Api, stack: FerryStack, service: str, lines: int, interval: float
) -> dict[str, Any]:
    execution_id = await api.start(service, lines, interval, delay=1.0)
    timeline: dict[int, tuple[float, float]] = {}
    async with httpx.AsyncClient(
        base_url=stack.url,
        headers={"Authorization": f"Bearer {stack.token}"},
        timeout=httpx.Timeout(30.0, read=None),
    ) as http:
        outcome = await follow(
            http, execution_id, time.monotonic() + 60 + lines * interval, timeline=timeline
        )
    await api.wait(execution_id, 60)
    return {
        "breakdown": await _breakdown(stack.redis_url, execution_id, timeline),
        "lines_printed": lines,
        "interval_s": interval,
        "lines_received": outcome["lines"],
        "ended": outcome["ended"],
        "error": outcome["error"],
        "latency": summary_ms(outcome["latencies"]),
    }


async def _breakdown(
    redis_url: str, execution_id: str, timeline: dict[int, tuple[float, float]]
) -> dict[str, Any]:
    """Where a line's time goes, split at the moment the worker appended it to the execution's
    Redis stream (the entry id is Redis' clock in ms; one host, one clock): printed → XADD
    (agent to worker, the log sink's batch, its PostgreSQL write, the XADD itself) and XADD →
    received (the API's stream read, the SSE write, this client's parse)."""
    redis = Redis.from_url(redis_url)
    try:
        entries = await redis.xrange(log_stream_key(execution_id))
    finally:
        await redis.aclose()
    to_xadd, to_client = [], []
    for entry_id, fields in entries:
        seq = int(fields[b"seq"])
        if seq not in timeline:
            continue
        printed, received = timeline[seq]
        added = int(entry_id.split(b"-")[0]) / 1000
        to_xadd.append(added - printed)
        to_client.append(received - added)
    return {
        "printed_to_xadd": summary_ms(to_xadd),
        "xadd_to_received": summary_ms(to_client),
        "note": "Redis entry ids have ms resolution: each half is +-1 ms",
    }


def many_followers(
    url: str, token: str, execution_id: str, k: int, budget_s: float
) -> dict[str, Any]:
    """Starts the client processes (spawned, not forked); returns merged findings."""
    context = multiprocessing.get_context("spawn")
    ready, results = context.Queue(), context.Queue()
    counts = [k // CLIENT_PROCESSES + (i < k % CLIENT_PROCESSES) for i in range(CLIENT_PROCESSES)]
    processes = [
        context.Process(
            target=client_process,
            args=(url, token, execution_id, n, budget_s, ready, results),
            daemon=True,
        )
        for n in counts
        if n
    ]
    for p in processes:
        p.start()
    merged: dict[str, Any] = {
        "latencies": [],
        "lines": [],
        "ended": 0,
        "connected": 0,
        "errors": [],
        "error_count": 0,
        "fatal": [],
        "connect_s": [],
    }
    try:
        for _ in processes:
            merged["connect_s"].append(ready.get(timeout=budget_s + 30))
        for _ in processes:
            part = results.get(timeout=budget_s + 30)
            if "fatal" in part:
                merged["fatal"].append(part["fatal"])
                continue
            merged["latencies"].extend(part["latencies"])
            merged["lines"].extend(part["lines"])
            for key in ("ended", "connected", "error_count"):
                merged[key] += part[key]
            merged["errors"].extend(part["errors"])
    finally:
        for p in processes:
            p.join(10)
            if p.is_alive():
                p.terminate()
                p.join(5)
    return merged


def api_rss(pid: int) -> int:
    """Resident bytes of the API process and its children (`--workers`)."""
    import psutil

    try:
        root = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
    except psutil.Error:
        return 0


async def followers_case(
    api: Api,
    url: str,
    token: str,
    service: str,
    k: int,
    lines: int,
    interval: float,
    api_pid: int,
) -> dict[str, Any]:
    # The function waits before its first line so that every follower is connected by then.
    delay = 3.0 + k / 100
    execution_id = await api.start(service, lines, interval, delay=delay)
    budget = delay + lines * interval + 60
    baseline = api_rss(api_pid)
    peak = baseline
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, api_rss(api_pid))
            await asyncio.sleep(0.5)

    sampler = asyncio.create_task(sample())
    try:
        merged = await asyncio.to_thread(many_followers, url, token, execution_id, k, budget)
    finally:
        done.set()
        await sampler
    await api.wait(execution_id, 60)
    latency = summary_ms(merged["latencies"])
    complete = sum(n == lines for n in merged["lines"])
    return {
        "followers": k,
        "lines_printed": lines,
        "interval_s": interval,
        "start_delay_s": delay,
        "connected": merged["connected"],
        "connect_s_per_client_process": [round(s, 2) for s in merged["connect_s"]],
        "got_every_line": complete,
        "got_end_event": merged["ended"],
        "errors": merged["error_count"],
        "error_samples": merged["errors"][:5],
        "fatal": merged["fatal"],
        "latency": latency,
        "api_rss_mb_before": round(baseline / 2**20, 1),
        "api_rss_mb_peak": round(peak / 2**20, 1),
        "api_kb_per_follower": round((peak - baseline) / 1024 / k, 1),
    }


async def run(args: argparse.Namespace, stack: FerryStack) -> dict[str, Any]:
    api = Api(stack.url, stack.token)
    try:
        service = await setup(api, args.runtime)
        single = await single_follower(api, stack, service, 200, 0.02)
        print(f"single follower: {json.dumps(single['latency'])}", flush=True)
        cases = []
        sizes = args.followers or ((100, 250, 500) if args.quick else (100, 250, 500, 1000))
        for k in sizes:
            stack.check_alive()
            case = await followers_case(
                api, stack.url, stack.token, service, k, 100, 0.1, stack.pid("api")
            )
            print(
                f"K={k}: {case['got_every_line']}/{k} complete, {json.dumps(case['latency'])}, "
                f"API {case['api_kb_per_follower']} KB/follower",
                flush=True,
            )
            cases.append(case)
    finally:
        await api.http.aclose()
    passing = [
        c["followers"]
        for c in cases
        if c["latency"].get("p99_ms", 1e9) < P99_LIMIT_MS and c["got_every_line"] == c["followers"]
    ]
    return {
        "single_follower": single,
        "followers": cases,
        "max_followers_p99_under_100ms": max(passing) if passing else 0,
    }


def machine() -> dict[str, Any]:
    mem = ""
    try:
        mem = next(
            line
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        )
    except (OSError, StopIteration):
        pass
    return {"cores": os.cpu_count(), "memory": mem, "load_avg": os.getloadavg()}


def print_table(report: dict[str, Any]) -> None:
    single = report["single_follower"]["latency"]
    print("\nLive log latency (one follower, 200 lines 0.02 s apart)")
    print(
        f"  p50 {single.get('p50_ms')} ms   p99 {single.get('p99_ms')} ms   "
        f"(target p50 <= {TARGET_P50_MS:g} ms)"
    )
    split = report["single_follower"].get("breakdown")
    if split:
        worker, api = split["printed_to_xadd"], split["xadd_to_received"]
        print(
            f"  printed -> in the Redis stream p50 {worker.get('p50_ms')} ms; "
            f"stream -> received p50 {api.get('p50_ms')} ms (each +-1 ms)"
        )
    print(
        f"\nFollowers of one execution ({report['api_workers']} API process(es), 100 lines "
        "0.1 s apart)"
    )
    print(
        f"  {'K':>6} {'connected':>10} {'complete':>9} {'p50 ms':>9} {'p99 ms':>9} "
        f"{'max ms':>9} {'API KB/follower':>16}"
    )
    for case in report["followers"]:
        lat = case["latency"]
        print(
            f"  {case['followers']:>6} {case['connected']:>10} {case['got_every_line']:>9} "
            f"{lat.get('p50_ms', '-'):>9} {lat.get('p99_ms', '-'):>9} "
            f"{lat.get('max_ms', '-'):>9} {case['api_kb_per_follower']:>16}"
        )
    print(
        f"\n  largest K with p99 < {P99_LIMIT_MS:g} ms and every line delivered: "
        f"{report['max_followers_p99_under_100ms']} (target >= {TARGET_FOLLOWERS})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.logs", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runtime", choices=("process", "docker"), default="process")
    parser.add_argument("--api-workers", type=int, default=1, help="`ferry api --workers N`")
    parser.add_argument(
        "--followers",
        type=lambda text: tuple(int(k) for k in text.split(",")),
        default=None,
        help="follower counts, comma-separated (default 100,250,500,1000)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (process logs)")
    parser.add_argument("--out", type=Path, default=RESULTS / "logs-latest.json")
    args = parser.parse_args(argv)
    nofile = raise_nofile()  # inherited by the API process too
    stack = FerryStack(runtime=args.runtime, keep_dir=args.keep, api_workers=args.api_workers)
    started = time.time()
    try:
        stack.start()
        results = asyncio.run(run(args, stack))
        stack.check_alive()
    finally:
        stack.stop()
    report = {
        "benchmark": "logs",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": round(time.time() - started, 1),
        "quick": args.quick,
        "runtime": args.runtime,
        "api_workers": args.api_workers,
        "client_processes": CLIENT_PROCESSES,
        "rlimit_nofile": nofile,
        "machine": machine(),
        "targets": {
            "single_follower_p50_ms": TARGET_P50_MS,
            "followers_with_p99_under_100ms": TARGET_FOLLOWERS,
        },
        **results,
    }
    report["met"] = {
        "single_follower_p50": report["single_follower"]["latency"].get("p50_ms", 1e9)
        <= TARGET_P50_MS,
        "followers": report["max_followers_p99_under_100ms"] >= TARGET_FOLLOWERS,
    }
    print_table(report)
    text = json.dumps(report, indent=2)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
