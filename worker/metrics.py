"""A worker process's metrics, in its own registry (served on `metrics_port_worker`).

Replicas call one method per event (`cold_start`, `claimed`, `finished`); the replica,
capacity and running gauges are read when scraped, through the callables the worker gives.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# Functions run from milliseconds to hours.
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400)
WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)
COLD_START_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 30, 60, 120, 300)


class WorkerMetrics:
    def __init__(
        self,
        capacity: int,
        replica_states: Callable[[], Iterable[tuple[str, str]]],
        running_count: Callable[[], int],
    ) -> None:
        """`replica_states` gives (service id, status) for each replica on this worker and
        `running_count` the executions it runs now; both are called at scrape time, possibly
        from the metrics server's thread."""
        self.registry = CollectorRegistry()
        self.executions_finished = Counter(
            "ferry_worker_executions_finished",
            "Execution attempts this worker finished, by outcome; status 'retrying' means "
            "handed back for another attempt",
            ["service", "status", "reason"],
            registry=self.registry,
        )
        self.execution_duration = Histogram(
            "ferry_worker_execution_duration_seconds",
            "From an execution's first start to its end, for executions finished here",
            ["service"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "ferry_worker_queue_wait_seconds",
            "From an execution's creation to its first start (started_at - created_at)",
            ["service"],
            buckets=WAIT_BUCKETS,
            registry=self.registry,
        )
        self.cold_starts = Counter(
            "ferry_worker_cold_starts",
            "Replica starts on this worker, by outcome (ready or failed)",
            ["service", "outcome"],
            registry=self.registry,
        )
        self.cold_start_duration = Histogram(
            "ferry_worker_cold_start_seconds",
            "From a replica's start to its agent being ready",
            ["service"],
            buckets=COLD_START_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_WorkerCollector(capacity, replica_states, running_count))

    def cold_start(self, service_id: str, seconds: float | None) -> None:
        """A replica became ready after `seconds`, or failed to start (None)."""
        self.cold_starts.labels(service_id, "ready" if seconds is not None else "failed").inc()
        if seconds is not None:
            self.cold_start_duration.labels(service_id).observe(seconds)

    def claimed(self, row: Any) -> None:
        if row["attempt"] == 1 and row["started_at"] and row["created_at"]:
            wait = (row["started_at"] - row["created_at"]).total_seconds()
            self.queue_wait.labels(row["service_id"]).observe(max(wait, 0.0))

    def finished(self, row: Any) -> None:
        status = "retrying" if row["status"] == "in-progress" else row["status"]
        self.executions_finished.labels(row["service_id"], status, row["reason"] or "").inc()
        if status != "retrying" and row["started_at"] and row["finished_at"]:
            duration = (row["finished_at"] - row["started_at"]).total_seconds()
            self.execution_duration.labels(row["service_id"]).observe(max(duration, 0.0))


class _WorkerCollector(Collector):
    """Gauges read at scrape time."""

    def __init__(
        self,
        capacity: int,
        replica_states: Callable[[], Iterable[tuple[str, str]]],
        running_count: Callable[[], int],
    ) -> None:
        self.capacity = capacity
        self.replica_states = replica_states
        self.running_count = running_count

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield from self._families()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        replicas, capacity, running = self._families()
        counts: dict[tuple[str, str], int] = {}
        for key in self.replica_states():
            counts[key] = counts.get(key, 0) + 1
        for (service_id, status), count in sorted(counts.items()):
            replicas.add_metric([service_id, status], count)
        capacity.add_metric([], self.capacity)
        running.add_metric([], self.running_count())
        yield from (replicas, capacity, running)

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                "ferry_worker_replicas",
                "Replicas on this worker by status",
                labels=["service", "status"],
            ),
            GaugeMetricFamily("ferry_worker_capacity", "Replicas this worker may host"),
            GaugeMetricFamily(
                "ferry_worker_executions_running", "Executions running on this worker now"
            ),
        )
