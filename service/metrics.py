"""The API's `/metrics`: request latency by route template, and cluster-wide gauges read
from PostgreSQL and Redis when scraped.

The cluster figures come from cheap, index-backed queries (live executions through the
partial index `executions_live`, recent ones through `executions_service_created`) and are
cached for `CLUSTER_CACHE_S`, so any number of scrapers cost the database one round of
queries per interval.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator
from typing import Any

import asyncpg
from aiohttp import web
from arq.connections import ArqRedis
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from core import queue, replica_store
from core.errors import Forbidden, Unauthorized
from core.metrics_server import metrics_refusal
from core.outages import REDIS_UNAVAILABLE
from service.http import Handler, Route
from service.keys import SETTINGS

CLUSTER_CACHE_S = 10.0
RECENT_WINDOW_S = 3600  # terminal executions are counted over this window, not all history
WORKER_ALIVE_S = 20.0  # as the reconciler's WORKER_DEAD_AFTER_S
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

_LIVE_EXECUTIONS = """
    SELECT service_id, status, count(*) AS n FROM executions
    WHERE status IN ('created', 'in-progress')
    GROUP BY service_id, status"""
_RECENT_EXECUTIONS = """
    SELECT s.id AS service_id, e.status, e.n FROM services s
    CROSS JOIN LATERAL (
        SELECT status, count(*) AS n FROM executions
        WHERE service_id = s.id AND created_at > now() - make_interval(secs => $1)
          AND status IN ('success', 'failed', 'terminated')
        GROUP BY status) e"""


class ClusterCollector(Collector):
    """Cluster-wide gauges. `refresh()` (async, from the scrape handler) reads PostgreSQL
    and Redis at most every `CLUSTER_CACHE_S`; `collect()` renders the last snapshot."""

    def __init__(self, db: asyncpg.Pool, redis: ArqRedis) -> None:
        self.db = db
        self.redis = redis
        self._snapshot: dict[str, Any] | None = None
        self._taken_at = -math.inf
        self._lock = asyncio.Lock()

    async def refresh(self) -> None:
        if time.monotonic() - self._taken_at < CLUSTER_CACHE_S:
            return
        async with self._lock:
            if time.monotonic() - self._taken_at < CLUSTER_CACHE_S:
                return
            async with self.db.acquire() as conn:
                executions = await conn.fetch(_LIVE_EXECUTIONS)
                executions += await conn.fetch(_RECENT_EXECUTIONS, RECENT_WINDOW_S)
                replicas = await replica_store.count_by_status(
                    conn, stopped_within_s=RECENT_WINDOW_S
                )
                workers = await replica_store.count_live_workers(
                    conn, heartbeat_within_s=WORKER_ALIVE_S
                )
                service_ids = [r["id"] for r in await conn.fetch("SELECT id FROM services")]
            lengths: list[int] = []
            if service_ids:
                try:
                    async with self.redis.pipeline(transaction=False) as pipe:
                        for service_id in service_ids:
                            pipe.zcard(queue.queue_name(service_id))
                        lengths = await pipe.execute()
                except REDIS_UNAVAILABLE:
                    service_ids = []  # Redis is down: the rest is still worth scraping
            self._snapshot = {
                "executions": [(r["service_id"], r["status"], r["n"]) for r in executions],
                "replicas": [(r["service_id"], r["status"], r["n"]) for r in replicas],
                "queues": list(zip(service_ids, lengths, strict=True)),
                "workers": workers,
            }
            self._taken_at = time.monotonic()

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield from self._families()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        executions, queues, replicas, workers = families = self._families()
        snapshot = self._snapshot
        if snapshot is None:
            return
        for service_id, status, count in snapshot["executions"]:
            executions.add_metric([service_id, status], count)
        for service_id, length in snapshot["queues"]:
            queues.add_metric([service_id], length)
        for service_id, status, count in snapshot["replicas"]:
            replicas.add_metric([service_id, status], count)
        workers.add_metric([], snapshot["workers"])
        yield from families

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, ...]:
        return (
            GaugeMetricFamily(
                "ferry_executions",
                "Executions by service and status: all created/in-progress ones, and the "
                "success/failed/terminated ones created in the last hour",
                labels=["service", "status"],
            ),
            GaugeMetricFamily(
                "ferry_queue_length",
                "Executions waiting in a service's Redis queue",
                labels=["service"],
            ),
            GaugeMetricFamily(
                "ferry_replicas",
                "Replicas by service and status: live ones, and those stopped or failed "
                "in the last hour",
                labels=["service", "status"],
            ),
            GaugeMetricFamily("ferry_workers_alive", "Workers that heartbeated recently"),
        )


class ApiMetrics:
    def __init__(self, db: asyncpg.Pool, redis: ArqRedis) -> None:
        self.registry = CollectorRegistry()
        self.request_duration = Histogram(
            "ferry_api_request_duration_seconds",
            "API request latency by method, route template and status",
            ["method", "route", "status"],
            buckets=REQUEST_BUCKETS,
            registry=self.registry,
        )
        self.cluster = ClusterCollector(db, redis)
        self.registry.register(self.cluster)


METRICS = web.AppKey("metrics", ApiMetrics)


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Times every request, labelled with its route template so ids do not explode the
    series count (unmatched paths share one label)."""
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        request.app[METRICS].request_duration.labels(request.method, route, str(status)).observe(
            time.perf_counter() - started
        )


async def scrape(request: web.Request, body: Any, query: Any) -> web.Response:
    token = request.app[SETTINGS].metrics_token
    refusal = metrics_refusal(request.remote, request.headers.get("Authorization"), token)
    if refusal is not None:
        raise Unauthorized(refusal) if token else Forbidden(refusal)
    metrics = request.app[METRICS]
    await metrics.cluster.refresh()
    response = web.Response(body=generate_latest(metrics.registry))
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


METRICS_ROUTE = Route(
    "GET",
    "/metrics",
    scrape,
    "Prometheus metrics: request latency and cluster-wide gauges. Loopback clients only, "
    "or any client with the bearer token FERRY_METRICS_TOKEN when it is set",
    "health",
    auth=False,
    # 401/403: see core/metrics_server.py; 503: the cluster gauges are read at each scrape.
    errors=(401, 403, 503),
    extra_responses={"content": {"text/plain": {"schema": {"type": "string"}}}},
)
