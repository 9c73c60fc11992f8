"""The Ferry measurements, through the public API only: warm latency, throughput, cold start.

Timestamps PostgreSQL recorded (created_at, started_at, finished_at; microseconds, the same
clock as the client on one machine) are read afterwards, straight from the database, to
split each figure into the steps of the execution path.
"""

from __future__ import annotations

import asyncio
import io
import random
import time
import zipfile
from typing import Any

import asyncpg
import httpx
import yaml

from bench.cpu import CpuMeter
from bench.cpu import delta as cpu_delta
from bench.stats import percentile, summary_ms

TERMINAL = ("success", "failed", "terminated")
# Untimed random pause before each sequential run. Back-to-back runs have a fixed period,
# which can lock onto the worker's fixed queue-poll period and land every job just before
# (or just after) a poll: the median would then swing by up to a poll delay between runs.
JITTER_S = 0.01

MANIFEST = {
    "name": "bench",
    "description": "no-op functions for the benchmark",
    "modules": [
        {
            "name": "main",
            "entry_point": "main.py",
            "functions": [{"name": "noop", "inputs": [], "outputs": []}],
        }
    ],
}
CODE = "def noop():\n    return None\n"


def package_archive(tag: str = "") -> bytes:
    """The no-op package; a tag (a comment) makes a codebase no worker has seen yet."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("ferry.yaml", yaml.safe_dump(MANIFEST))
        archive.writestr("main.py", CODE + (f"# {tag}\n" if tag else ""))
    return buffer.getvalue()


class BenchError(RuntimeError):
    pass


class FerryClient:
    """The API over one keep-alive connection pool; raises on any unexpected status."""

    def __init__(self, url: str, token: str) -> None:
        self.http = httpx.AsyncClient(
            base_url=url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(60.0),
            limits=httpx.Limits(max_connections=20),
        )

    async def close(self) -> None:
        await self.http.aclose()

    async def call(
        self, method: str, path: str, expect: tuple[int, ...] = (200, 201), **kwargs: Any
    ) -> Any:
        response = await self.http.request(method, path, **kwargs)
        if response.status_code not in expect:
            raise BenchError(f"{method} {path}: {response.status_code} {response.text[:500]}")
        return response.json() if response.content else None

    async def setup_package(self, name: str) -> tuple[str, str]:
        project = await self.call("POST", "/api/v1/projects", json={"name": name})
        package = await self.call(
            "POST",
            "/api/v1/packages",
            data={"project": project["id"]},
            files={"codebase": ("code.zip", package_archive(), "application/zip")},
        )
        return project["id"], package["id"]

    async def add_revision(self, package: str, tag: str) -> int:
        answer = await self.call(
            "POST",
            f"/api/v1/packages/{package}/revisions",
            files={"codebase": ("code.zip", package_archive(tag), "application/zip")},
        )
        return answer["revision"]

    async def create_service(
        self,
        project: str,
        package: str,
        name: str,
        runtime: dict[str, Any],
        revision: int | None = None,
    ) -> str:
        body = {
            "project": project,
            "name": name,
            "package": package,
            "runtime": runtime,
            "max_attempts": 1,
        }
        if revision is not None:
            body["package_revision"] = revision
        return (await self.call("POST", "/api/v1/services", json=body))["id"]

    async def wait_replicas(self, service_id: str, ready: int, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = await self.call("GET", f"/api/v1/services/{service_id}/status")
            if sum(r["status"] == "ready" for r in status["replicas"]) >= ready:
                return
            await asyncio.sleep(0.05)
        raise BenchError(
            f"service {service_id}: {ready} ready replica(s) not reached in {timeout_s:g} s"
        )

    async def wait_no_replicas(self, service_id: str, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = await self.call("GET", f"/api/v1/services/{service_id}/status")
            if not status["replicas"]:
                return
            await asyncio.sleep(0.1)
        raise BenchError(f"service {service_id}: replicas still live after {timeout_s:g} s")

    async def run_one(self, service_id: str) -> dict[str, Any]:
        """POST an execution, long-poll it to a terminal status; client times included."""
        wall = time.time()
        t0 = time.perf_counter()
        created = await self.call(
            "POST", "/api/v1/executions", json={"service": service_id, "function": "noop"}
        )
        t1 = time.perf_counter()
        done = await self.call(
            "GET", f"/api/v1/executions/{created['id']}/wait", params={"timeout": 30}
        )
        t2 = time.perf_counter()
        if done["status"] != "success":
            raise BenchError(f"execution {done['id']} ended {done['status']}: {done.get('error')}")
        return {"id": created["id"], "wall_start": wall, "post_s": t1 - t0, "total_s": t2 - t0}

    async def run_one_request(self, service_id: str) -> dict[str, Any]:
        """One `POST /executions?wait=`: the API answers once the execution ended."""
        t0 = time.perf_counter()
        done = await self.call(
            "POST",
            "/api/v1/executions",
            params={"wait": 30},
            json={"service": service_id, "function": "noop"},
        )
        t1 = time.perf_counter()
        if done["status"] != "success":
            raise BenchError(f"execution {done['id']} ended {done['status']}: {done.get('error')}")
        return {"id": done["id"], "total_s": t1 - t0}


async def db_times(dsn: str, ids: list[str]) -> dict[str, dict[str, float]]:
    """created/started/finished of executions as epoch seconds (microsecond resolution)."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            """SELECT id, extract(epoch FROM created_at)::float8 AS created,
                      extract(epoch FROM started_at)::float8 AS started,
                      extract(epoch FROM finished_at)::float8 AS finished
               FROM executions WHERE id = ANY($1::text[])""",
            ids,
        )
    finally:
        await conn.close()
    return {r["id"]: dict(r) for r in rows}


def _p50(values: list[float]) -> float:
    return round(percentile([v * 1000 for v in values], 50), 2)


def latency_breakdown(
    runs: list[dict[str, Any]], times: dict[str, dict[str, float]]
) -> dict[str, Any]:
    """Median of each step of the path, from client clock + PostgreSQL clock (one host)."""
    steps: dict[str, list[float]] = {
        "client_to_row_inserted": [],
        "row_inserted_to_post_answered": [],
        "row_inserted_to_claimed": [],
        "claimed_to_finished": [],
        "finished_to_client_answered": [],
    }
    for run in runs:
        t = times.get(run["id"])
        if not t or t["started"] is None or t["finished"] is None:
            continue
        start = run["wall_start"]
        steps["client_to_row_inserted"].append(t["created"] - start)
        steps["row_inserted_to_post_answered"].append(start + run["post_s"] - t["created"])
        steps["row_inserted_to_claimed"].append(t["started"] - t["created"])
        steps["claimed_to_finished"].append(t["finished"] - t["started"])
        steps["finished_to_client_answered"].append(start + run["total_s"] - t["finished"])
    return {
        "p50_ms": {name: _p50(values) for name, values in steps.items()},
        "p99_ms": {
            name: round(percentile([v * 1000 for v in values], 99), 2)
            for name, values in steps.items()
        },
        "note": (
            "row_inserted = executions.created_at (insert, before commit); claimed = "
            "started_at (worker's claim UPDATE); finished = finished_at (finish UPDATE, "
            "before commit + NOTIFY). Client and PostgreSQL share this host's clock."
        ),
    }


async def http_floor(client: FerryClient, count: int) -> dict[str, Any]:
    """GET /healthz round trips: what the HTTP client + aiohttp cost before any work."""
    samples = []
    for _ in range(count):
        t0 = time.perf_counter()
        await client.call("GET", "/healthz")
        samples.append(time.perf_counter() - t0)
    return summary_ms(samples)


async def warm_latency(
    client: FerryClient,
    dsn: str,
    project: str,
    package: str,
    *,
    runs: int,
    warmup: int,
    budget_s: float,
    meter: CpuMeter,
    name: str = "warm",
    runtime: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], str]:
    service_id = await client.create_service(
        project,
        package,
        name,
        {"concurrency": 4, "min_replicas": 1, "max_replicas": 1, **(runtime or {})},
    )
    await client.wait_replicas(service_id, 1)
    for _ in range(warmup):
        await client.run_one(service_id)
    results = []
    deadline = time.monotonic() + budget_s
    before = await asyncio.to_thread(meter.snapshot)
    for _ in range(runs):
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(random.uniform(0, JITTER_S))  # arrive at a random phase
        results.append(await client.run_one(service_id))
    after = await asyncio.to_thread(meter.snapshot)
    times = await db_times(dsn, [r["id"] for r in results])
    # The same executions as one request each (`POST ?wait=`), the way a synchronous
    # caller would use the API; alternated runs so both see the same machine.
    one_request = []
    for _ in range(runs):
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(random.uniform(0, JITTER_S))
        one_request.append(await client.run_one_request(service_id))
    report = {
        "runs": len(results),
        "warmup": warmup,
        "untimed_jitter_before_each_run_s": [0, JITTER_S],
        "complete": len(results) == runs,
        "post_to_terminal": summary_ms([r["total_s"] for r in results]),
        "post_only": summary_ms([r["post_s"] for r in results]),
        "one_request": summary_ms([r["total_s"] for r in one_request]),
        "one_request_note": "POST /executions?wait=30: one request, answered at the end",
        "breakdown": latency_breakdown(results, times),
        "cpu": cpu_delta(before, after, len(results)),
    }
    return report, service_id


async def _counters(client: FerryClient, service_id: str) -> dict[str, int]:
    return await client.call("GET", "/api/v1/executions/counters", params={"service": service_id})


def _terminal(counts: dict[str, int]) -> int:
    return sum(counts.get(k, 0) for k in TERMINAL)


async def _batches(client: FerryClient, service_id: str, total: int, batch: int) -> list[str]:
    ids: list[str] = []
    body = {"service": service_id, "function": "noop"}
    for start in range(0, total, batch):
        size = min(batch, total - start)
        answer = await client.call(
            "POST", "/api/v1/executions/batch", json={"executions": [body] * size}
        )
        ids += [e["id"] for e in answer["items"]]
    return ids


async def _until_terminal(
    client: FerryClient, service_id: str, target: int, deadline: float
) -> dict[str, int]:
    while True:
        counts = await _counters(client, service_id)
        if _terminal(counts) >= target or time.monotonic() > deadline:
            return counts
        await asyncio.sleep(0.1)


async def throughput(
    client: FerryClient,
    dsn: str,
    project: str,
    package: str,
    *,
    total: int,
    batch: int,
    concurrency: int,
    replicas: int,
    budget_s: float,
    meter: CpuMeter,
    name: str = "throughput",
    runtime: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], str]:
    service_id = await client.create_service(
        project,
        package,
        name,
        {
            "concurrency": concurrency,
            "min_replicas": replicas,
            "max_replicas": replicas,
            **(runtime or {}),
        },
    )
    await client.wait_replicas(service_id, replicas)
    # Warm-up: one small batch through the whole path.
    await _batches(client, service_id, min(200, total), batch)
    base = await _until_terminal(client, service_id, min(200, total), time.monotonic() + 60)
    base_terminal = _terminal(base)
    deadline = time.monotonic() + budget_s
    before = await asyncio.to_thread(meter.snapshot)
    t0 = time.perf_counter()
    poller = asyncio.create_task(
        _until_terminal(client, service_id, base_terminal + total, deadline)
    )
    ids = await _batches(client, service_id, total, batch)
    t_created = time.perf_counter()
    counts = await poller
    t_done = time.perf_counter()
    after = await asyncio.to_thread(meter.snapshot)
    done = _terminal(counts) - base_terminal
    conn = await asyncpg.connect(dsn)
    try:
        server = await conn.fetchrow(
            """SELECT extract(epoch FROM max(finished_at) - min(created_at))::float8 AS span,
                      extract(epoch FROM max(finished_at) - min(started_at))::float8 AS run_span,
                      count(*) FILTER (WHERE status = 'success') AS success,
                      count(*) FILTER (WHERE status <> 'success') AS other
               FROM executions WHERE id = ANY($1::text[])""",
            ids,
        )
    finally:
        await conn.close()
    elapsed = t_done - t0
    report = {
        "executions": total,
        "batch_size": batch,
        "replicas": replicas,
        "concurrency_per_replica": concurrency,
        "complete": done >= total,
        "terminal": done,
        "success": server["success"],
        "not_success": server["other"],
        "create_s": round(t_created - t0, 3),
        "elapsed_s": round(elapsed, 3),
        "executions_per_s": round(done / elapsed, 1) if elapsed else None,
        "create_rate_per_s": round(total / (t_created - t0), 1),
        "server_span_s": round(server["span"] or 0, 3),
        "worker_rate_per_s": round(total / server["run_span"], 1) if server["run_span"] else None,
        "cpu": cpu_delta(before, after, done),
        "note": (
            "elapsed: first batch POST sent → counters show all terminal (polled every "
            "100 ms). worker_rate: first claim → last finish, as PostgreSQL recorded."
        ),
    }
    return report, service_id


async def cold_starts(
    client: FerryClient,
    dsn: str,
    project: str,
    package: str,
    *,
    repeats: int,
    runtime: dict[str, Any] | None = None,
    name: str = "cold",
) -> dict[str, Any]:
    """`runtime` adds to each new service's runtime: a shape no warm pool keeps (another
    memory_mb, say) measures the start of a container of its own."""
    samples, replica_ms, rows = [], [], []
    for index in range(repeats):
        # A new revision with its own codebase: the worker fetches and extracts it too.
        revision = await client.add_revision(package, f"cold start {index} {time.time()}")
        service_id = await client.create_service(
            project,
            package,
            f"{name}-{index}",
            {
                "concurrency": 1,
                "min_replicas": 0,
                "max_replicas": 1,
                "idle_timeout_s": 0,
                **(runtime or {}),
            },
            revision=revision,
        )
        await asyncio.sleep(0.6)  # the worker's placement round has seen it (with 0 replicas)
        run = await client.run_one(service_id)
        samples.append(run["total_s"])
        # The replica's `ready` line in the service's log says whether it took over a warm
        # pool container (its row's message is overwritten once it scales down).
        lines = await client.call("GET", f"/api/v1/services/{service_id}/logs?limit=100")
        warm_pool = any(
            " ready: " in line["text"] and line["text"].endswith("from the warm pool")
            for line in lines["items"]
        )
        conn = await asyncpg.connect(dsn)
        try:
            replica = await conn.fetchrow(
                """SELECT cold_start_ms, extract(epoch FROM started_at)::float8 AS started
                   FROM replicas WHERE service_id = $1 ORDER BY started_at LIMIT 1""",
                service_id,
            )
            times = (await db_times(dsn, [run["id"]]))[run["id"]]
        finally:
            await conn.close()
        if replica is not None:
            replica_ms.append(replica["cold_start_ms"])
            rows.append(
                {
                    "total_ms": round(run["total_s"] * 1000, 1),
                    "post_to_replica_row_ms": round(
                        (replica["started"] - run["wall_start"]) * 1000, 1
                    ),
                    "replica_start_to_ready_ms": replica["cold_start_ms"],
                    "from_warm_pool": warm_pool,
                    "row_inserted_to_claimed_ms": round(
                        (times["started"] - times["created"]) * 1000, 1
                    ),
                    "claimed_to_finished_ms": round(
                        (times["finished"] - times["started"]) * 1000, 1
                    ),
                }
            )
        await client.call("POST", f"/api/v1/services/{service_id}/pause")
        await client.wait_no_replicas(service_id)
        await client.call("DELETE", f"/api/v1/services/{service_id}", expect=(204,))
    return {
        "repeats": len(samples),
        "post_to_terminal": summary_ms(samples),
        "replica_cold_start_ms_p50": percentile(
            [float(v) for v in replica_ms if v is not None], 50
        ),
        "runtime": runtime or {},
        "from_warm_pool": sum(1 for row in rows if row["from_warm_pool"]),
        "runs": rows,
        "note": (
            "each run: a new package revision (a codebase no worker has extracted) and a "
            "new service on it (min_replicas 0) → POST → /wait answers success. "
            "replica_start_to_ready: the worker's own cold_start_ms (codebase fetch and "
            "extraction, image check, container/process start or a warm pool container's "
            "take-over, agent connect, import). from_warm_pool: replicas that took over a "
            "pool container (the pool refills 1 s after a take, within the previous run's "
            "pause and delete: every run finds one waiting)."
        ),
    }


async def pause(client: FerryClient, service_ids: list[str]) -> None:
    """Stop the warm replicas so their queue polling does not load Redis for the baselines."""
    for service_id in service_ids:
        await client.call("POST", f"/api/v1/services/{service_id}/pause")
    for service_id in service_ids:
        await client.wait_no_replicas(service_id)
