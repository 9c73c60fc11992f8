"""Metrics and structured process logs: the API's /metrics (request latency, cluster
gauges), a worker's and the reconciler's own registries, and request/execution ids on log
lines."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
import urllib.request
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from core.log_context import ContextFilter
from core.logging_setup import JsonFormatter
from scheduler.reconciler import Reconciler
from service.app import create_app
from tests.engine_helpers import running_worker, wait_for_status


def samples(text: str) -> dict[str, list[Any]]:
    found: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append(sample)
    return found


def value(found: dict[str, list[Any]], name: str, **labels: str) -> float:
    return sum(
        s.value for s in found.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items())
    )


async def scrape(client) -> dict[str, list[Any]]:
    response = await client.get("/metrics")  # no token needed from loopback
    assert response.status == 200
    assert response.content_type == "text/plain"
    return samples(await response.text())


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def test_metrics_answer_without_a_token_and_time_requests_by_route(client, api, project):
    status, _ = await api.get(f"/api/v1/projects/{project['id']}")
    assert status == 200
    found = await scrape(client)
    assert (
        value(
            found,
            "ferry_api_request_duration_seconds_count",
            method="GET",
            route="/api/v1/projects/{id}",
            status="200",
        )
        == 1
    ), [s for s in found["ferry_api_request_duration_seconds_count"]]
    # Raw paths never become labels.
    routes = {s.labels["route"] for s in found["ferry_api_request_duration_seconds_count"]}
    assert not any(project["id"] in route for route in routes)
    assert value(found, "ferry_workers_alive") == 0


async def test_a_worker_counts_what_it_ran_and_the_cluster_gauges_agree(
    client, api, service, settings, pool, redis
):
    port = free_port()
    async with running_worker(
        settings, pool, redis, runtime="process", worker_id="w1", metrics_port_worker=port
    ) as host:
        for index in range(3):
            status, created = await api.post(
                "/api/v1/executions",
                {"service": service["id"], "function": "echo", "input": {"text": str(index)}},
            )
            assert status == 201, created
            finished = await wait_for_status(api, created["id"])
            assert finished["status"] == "success", finished
        worker = samples(await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/metrics"))
        cluster = await scrape(client)
        assert value(cluster, "ferry_workers_alive") == 1
        assert value(cluster, "ferry_replicas", service=service["id"], status="ready") == 1
    # The same registry, read in-process without HTTP.
    assert (
        host.metrics.registry.get_sample_value(
            "ferry_worker_executions_finished_total",
            {"service": service["id"], "status": "success", "reason": ""},
        )
        == 3
    )
    sid = service["id"]
    assert (
        value(worker, "ferry_worker_executions_finished_total", service=sid, status="success") == 3
    )
    assert value(worker, "ferry_worker_execution_duration_seconds_count", service=sid) == 3
    assert value(worker, "ferry_worker_queue_wait_seconds_count", service=sid) == 3
    assert value(worker, "ferry_worker_cold_starts_total", service=sid, outcome="ready") == 1
    assert value(worker, "ferry_worker_cold_start_seconds_count", service=sid) == 1
    assert value(worker, "ferry_worker_replicas", service=sid, status="ready") == 1
    assert value(cluster, "ferry_executions", service=sid, status="success") == 3
    assert value(cluster, "ferry_queue_length", service=sid) == 0


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


async def test_reconciler_counts_a_requeue(api, service, pool, redis):
    status, created = await api.post(
        "/api/v1/executions", {"service": service["id"], "function": "noop"}
    )
    assert status == 201, created
    await redis.flushdb()
    await asyncio.sleep(2.2)  # past the reconciler's grace for just-created executions
    reconciler = Reconciler(pool, redis)
    report = await reconciler.run_once()
    assert report.requeued == 1
    found = samples(_exposition(reconciler.metrics.registry))
    assert value(found, "ferry_scheduler_reconciler_actions_total", kind="requeued") == 1
    assert value(found, "ferry_scheduler_reconciler_actions_total", kind="retried") == 0
    assert value(found, "ferry_scheduler_reconcile_round_seconds_count") == 1


def _exposition(registry: Any) -> str:
    from prometheus_client import generate_latest

    return generate_latest(registry).decode()


async def test_log_lines_in_a_request_carry_its_request_id(settings, pool, redis):
    logger = logging.getLogger("ferry.test.request")

    async def logs_something(_request: web.Request) -> web.Response:
        logger.warning("inside the request")
        return web.Response(text="ok")

    app = create_app(settings, pool, redis, settings.database_url)
    app.router.add_get("/test/log", logs_something)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(ContextFilter())
    logger.addHandler(handler)
    try:
        async with TestClient(TestServer(app)) as client:
            response = await client.get("/test/log", headers={"X-Request-Id": "req-12345"})
            assert response.status == 200
            assert response.headers["X-Request-Id"] == "req-12345"
    finally:
        logger.removeHandler(handler)
    entry = json.loads(stream.getvalue().splitlines()[0])
    assert entry["message"] == "inside the request"
    assert entry["request_id"] == "req-12345"
