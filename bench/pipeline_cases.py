"""The pipeline measurements through Ferry's public API: a chain A->B->C and a fan-out of N
elements into a merge and one node, run by Ferry's pipeline engine
(`POST /pipelines/{id}/execute`). `bench/hand_chained.py` runs the same functions chained
by a client.

Afterwards PostgreSQL's own timestamps of the node executions (created_at, started_at,
finished_at; pipeline_execution_id and pipeline_node for the engine's) split each figure
into steps. Hop = the upstream execution's finished_at -> the downstream one's started_at.
"""

from __future__ import annotations

import asyncio
import io
import random
import time
import zipfile
from typing import Any

import asyncpg
import yaml

from bench.cpu import CpuMeter
from bench.cpu import delta as cpu_delta
from bench.ferry_cases import JITTER_S, BenchError, FerryClient
from bench.stats import percentile, summary_ms

MANIFEST = {
    "name": "pipebench",
    "description": "no-op functions for the pipeline benchmark",
    "modules": [
        {
            "name": "main",
            "entry_point": "main.py",
            "functions": [
                {
                    "name": "step",
                    "inputs": [{"name": "x", "type": "integer"}],
                    "outputs": [{"name": "x", "type": "integer"}],
                },
                {
                    "name": "spread",
                    "inputs": [{"name": "n", "type": "integer"}],
                    "outputs": [{"name": "items", "type": "list[integer]"}],
                },
                {
                    "name": "total",
                    "inputs": [{"name": "xs", "type": "list[integer]"}],
                    "outputs": [{"name": "count", "type": "integer"}],
                },
            ],
        }
    ],
}
# No-ops that pass a value along: a connection joins an output port to an input port.
CODE = (
    "def step(x):\n    return x\n\n\n"
    "def spread(n):\n    return list(range(n))\n\n\n"
    "def total(xs):\n    return len(xs)\n"
)
CHAIN = ("A", "B", "C")


def package_archive() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("ferry.yaml", yaml.safe_dump(MANIFEST))
        archive.writestr("main.py", CODE)
    return buffer.getvalue()


async def setup(client: FerryClient) -> tuple[str, str]:
    project = await client.call("POST", "/api/v1/projects", json={"name": "pipebench"})
    package = await client.call(
        "POST",
        "/api/v1/packages",
        data={"project": project["id"]},
        files={"codebase": ("code.zip", package_archive(), "application/zip")},
    )
    return project["id"], package["id"]


async def warm_service(
    client: FerryClient, project: str, package: str, name: str, replicas: int, concurrency: int
) -> str:
    service_id = await client.create_service(
        project,
        package,
        name,
        {"concurrency": concurrency, "min_replicas": replicas, "max_replicas": replicas},
    )
    await client.wait_replicas(service_id, replicas)
    return service_id


# -- graphs ----------------------------------------------------------------------------------


def _link(source: str, out: str, target: str, port: str) -> dict[str, Any]:
    return {"source": {"node": source, "port": out}, "target": {"node": target, "port": port}}


def chain_graph(service: str) -> dict[str, Any]:
    """A -> B -> C, each `step(x) -> x`; A's x is static."""
    nodes = [{"id": n, "type": "function", "service": service, "function": "step"} for n in CHAIN]
    nodes[0]["input"] = {"x": 0}
    return {"nodes": nodes, "connections": [_link("A", "x", "B", "x"), _link("B", "x", "C", "x")]}


def fanout_graph(service: str, size: int) -> dict[str, Any]:
    """spread(n) -> list of n -> step per element -> merge -> total(xs)."""
    return {
        "variables": [{"name": "n", "type": "integer", "default": size}],
        "nodes": [
            {
                "id": "spread",
                "type": "function",
                "service": service,
                "function": "spread",
                "input": {"n": {"variable": "n"}},
            },
            {"id": "each", "type": "function", "service": service, "function": "step"},
            {"id": "merge", "type": "merge"},
            {"id": "total", "type": "function", "service": service, "function": "total"},
        ],
        "connections": [
            _link("spread", "items", "each", "x"),
            _link("each", "x", "merge", "xs"),
            _link("merge", "xs", "total", "xs"),
        ],
        "settings": {"fanout_cap": max(size, 1)},
    }


def check_graph(graph: dict[str, Any]) -> None:
    """The body is what Ferry's graph model accepts (before any request is sent)."""
    from core.pipeline_graph import Graph

    Graph.model_validate(graph)


# -- Ferry's pipeline engine -----------------------------------------------------------------


async def pipelines_available(client: FerryClient, project: str) -> bool:
    """Whether this Ferry serves the pipelines API at all (it may predate it)."""
    response = await client.http.get("/api/v1/pipelines", params={"project": project})
    return response.status_code == 200


async def create_pipeline(
    client: FerryClient, project: str, name: str, graph: dict[str, Any]
) -> str:
    check_graph(graph)
    body = {"project": project, "name": name, "description": "benchmark", **graph}
    pipeline = await client.call("POST", "/api/v1/pipelines", json=body)
    await client.call("POST", f"/api/v1/pipelines/{pipeline['id']}/install")
    return pipeline["id"]


async def run_pipeline(
    client: FerryClient,
    pipeline: str,
    variables: dict[str, Any] | None = None,
    timeout_s: float = 30,
) -> dict[str, Any]:
    """POST execute, long-poll to a terminal status; client times included."""
    wall = time.time()
    t0 = time.perf_counter()
    created = await client.call(
        "POST",
        f"/api/v1/pipelines/{pipeline}/execute",
        json={"input": {}, "variables": variables or {}},
    )
    t1 = time.perf_counter()
    deadline = time.monotonic() + timeout_s * 4
    done = created
    while done["status"] not in ("success", "failed", "terminated"):
        if time.monotonic() > deadline:
            raise BenchError(f"pipeline execution {created['id']} still {done['status']}")
        done = await client.call(
            "GET",
            f"/api/v1/pipeline-executions/{created['id']}/wait",
            params={"timeout": timeout_s},
        )
    t2 = time.perf_counter()
    if done["status"] != "success":
        raise BenchError(
            f"pipeline execution {done['id']} ended {done['status']}: {done.get('error')}"
        )
    return {
        "id": created["id"],
        "wall_start": wall,
        "post_s": t1 - t0,
        "total_s": t2 - t0,
        "output": done.get("output"),
    }


async def _node_times(
    dsn: str, pipeline_execution_ids: list[str]
) -> dict[str, dict[str, list[dict[str, float]]]]:
    """{pipeline execution: {node: [{created, started, finished}, ...]}} and the pipeline
    executions' own created/started/ended under the node name ''."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            """SELECT pipeline_execution_id AS pe, pipeline_node AS node,
                      extract(epoch FROM created_at)::float8 AS created,
                      extract(epoch FROM started_at)::float8 AS started,
                      extract(epoch FROM finished_at)::float8 AS finished
               FROM executions WHERE pipeline_execution_id = ANY($1::text[])""",
            pipeline_execution_ids,
        )
        runs = await conn.fetch(
            """SELECT id AS pe, '' AS node,
                      extract(epoch FROM created_at)::float8 AS created,
                      extract(epoch FROM started_at)::float8 AS started,
                      extract(epoch FROM ended_at)::float8 AS finished
               FROM pipeline_executions WHERE id = ANY($1::text[])""",
            pipeline_execution_ids,
        )
    finally:
        await conn.close()
    found: dict[str, dict[str, list[dict[str, float]]]] = {}
    for row in [*rows, *runs]:
        found.setdefault(row["pe"], {}).setdefault(row["node"], []).append(
            {"created": row["created"], "started": row["started"], "finished": row["finished"]}
        )
    return found


def chain_steps(
    runs: list[dict[str, Any]], times: dict[str, dict[str, list[dict[str, float]]]]
) -> dict[str, Any]:
    """Per hop and in total: where a pipeline run's time goes, from PostgreSQL's clock."""
    hops: list[float] = []
    steps: dict[str, list[float]] = {
        "client_to_pipeline_execution_row": [],
        "pipeline_row_to_A_created": [],
        "hop_finished_to_next_created": [],
        "hop_created_to_started": [],
        "node_started_to_finished": [],
        "C_finished_to_pipeline_ended": [],
        "pipeline_ended_to_client_answered": [],
    }
    per_hop: dict[str, list[float]] = {"A->B": [], "B->C": []}
    for run in runs:
        nodes = times.get(run["id"], {})
        try:
            a, b, c = (nodes[n][0] for n in CHAIN)
            pe = nodes[""][0]
        except (KeyError, IndexError):
            continue
        if any(t["started"] is None or t["finished"] is None for t in (a, b, c)):
            continue
        for name, up, down in (("A->B", a, b), ("B->C", b, c)):
            hop = down["started"] - up["finished"]
            hops.append(hop)
            per_hop[name].append(hop)
            steps["hop_finished_to_next_created"].append(down["created"] - up["finished"])
            steps["hop_created_to_started"].append(down["started"] - down["created"])
        for t in (a, b, c):
            steps["node_started_to_finished"].append(t["finished"] - t["started"])
        steps["client_to_pipeline_execution_row"].append(pe["created"] - run["wall_start"])
        steps["pipeline_row_to_A_created"].append(a["created"] - pe["created"])
        if pe["finished"] is not None:
            steps["C_finished_to_pipeline_ended"].append(pe["finished"] - c["finished"])
            steps["pipeline_ended_to_client_answered"].append(
                run["wall_start"] + run["total_s"] - pe["finished"]
            )
    return {
        "hop": summary_ms(hops),
        "per_hop": {name: summary_ms(values) for name, values in per_hop.items()},
        "steps_p50_ms": {
            name: round(percentile([v * 1000 for v in values], 50), 2)
            for name, values in steps.items()
        },
    }


async def ferry_chain(
    client: FerryClient,
    dsn: str,
    project: str,
    service: str,
    *,
    runs: int,
    warmup: int,
    budget_s: float,
    meter: CpuMeter,
) -> dict[str, Any]:
    pipeline = await create_pipeline(client, project, "hop", chain_graph(service))
    for _ in range(warmup):
        await run_pipeline(client, pipeline)
    results = []
    deadline = time.monotonic() + budget_s
    before = await asyncio.to_thread(meter.snapshot)
    for _ in range(runs):
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(random.uniform(0, JITTER_S))  # arrive at a random phase
        results.append(await run_pipeline(client, pipeline))
    after = await asyncio.to_thread(meter.snapshot)
    times = await _node_times(dsn, [r["id"] for r in results])
    return {
        "pipeline": pipeline,
        "runs": len(results),
        "warmup": warmup,
        "complete": len(results) == runs,
        "end_to_end": summary_ms([r["total_s"] for r in results]),
        "post_only": summary_ms([r["post_s"] for r in results]),
        **chain_steps(results, times),
        "cpu": cpu_delta(before, after, 3 * len(results)),
        "note": "hop: upstream finished_at -> downstream started_at (PostgreSQL's clock); "
        "end_to_end: client, POST execute -> /wait answered success; cpu per node "
        "execution.",
    }


def fanout_steps(
    runs: list[dict[str, Any]], times: dict[str, dict[str, list[dict[str, float]]]]
) -> dict[str, float]:
    """Where a fan-out's time goes (p50 over the runs), from PostgreSQL's timestamps."""
    steps: dict[str, list[float]] = {
        "pipeline_row_to_spread_finished": [],
        "spread_finished_to_first_element_created": [],
        "first_to_last_element_created": [],
        "first_element_started_to_last_finished": [],
        "last_element_finished_to_total_created": [],
        "total_created_to_finished": [],
        "total_finished_to_pipeline_ended": [],
    }
    for run in runs:
        nodes = times.get(run["id"], {})
        try:
            pe, spread, total = nodes[""][0], nodes["spread"][0], nodes["total"][0]
            each = nodes["each"]
        except (KeyError, IndexError):
            continue
        rows = [pe, spread, total, *each]
        if any(t["finished"] is None or t["created"] is None for t in rows):
            continue
        if any(t["started"] is None for t in each):
            continue
        last_finished = max(t["finished"] for t in each)
        steps["pipeline_row_to_spread_finished"].append(spread["finished"] - pe["created"])
        steps["spread_finished_to_first_element_created"].append(
            min(t["created"] for t in each) - spread["finished"]
        )
        steps["first_to_last_element_created"].append(
            max(t["created"] for t in each) - min(t["created"] for t in each)
        )
        steps["first_element_started_to_last_finished"].append(
            last_finished - min(t["started"] for t in each)
        )
        steps["last_element_finished_to_total_created"].append(total["created"] - last_finished)
        steps["total_created_to_finished"].append(total["finished"] - total["created"])
        steps["total_finished_to_pipeline_ended"].append(pe["finished"] - total["finished"])
    return {
        name: round(percentile([v * 1000 for v in values], 50), 1)
        for name, values in steps.items()
        if values
    }


async def ferry_fanout(
    client: FerryClient,
    dsn: str,
    project: str,
    service: str,
    *,
    size: int,
    repeats: int,
    budget_s: float,
    meter: CpuMeter,
) -> dict[str, Any]:
    pipeline = await create_pipeline(client, project, "fanout", fanout_graph(service, size))
    # Warm-up: a small fan-out through the same nodes.
    await run_pipeline(client, pipeline, {"n": min(size, 20)})
    results = []
    deadline = time.monotonic() + budget_s
    before = await asyncio.to_thread(meter.snapshot)
    for _ in range(repeats):
        if time.monotonic() > deadline:
            break
        run = await run_pipeline(client, pipeline, {"n": size}, timeout_s=60)
        output = (run.get("output") or {}).get("total")
        if isinstance(output, dict):
            output = output.get("count")
        if output is not None and output != size:
            raise BenchError(f"the merge delivered {output} values, not {size}")
        results.append(run)
    after = await asyncio.to_thread(meter.snapshot)
    times = await _node_times(dsn, [r["id"] for r in results])
    server = []
    for run in results:
        pe = times.get(run["id"], {}).get("", [{}])[0]
        if pe.get("finished") is not None:
            server.append(pe["finished"] - pe["created"])
    return {
        "steps_p50_ms": fanout_steps(results, times),
        "pipeline": pipeline,
        "size": size,
        "repeats": len(results),
        "complete": len(results) == repeats,
        "wall": summary_ms([r["total_s"] for r in results]),
        "server_created_to_ended": summary_ms(server),
        "cpu": cpu_delta(before, after, size * len(results)),
        "note": "wall: client, POST execute -> /wait answered success; cpu per element "
        "(all Ferry processes).",
    }
