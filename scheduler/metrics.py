"""A scheduler process's metrics, in its own registry (served on `metrics_port_scheduler`)."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram

if TYPE_CHECKING:
    from scheduler.reconciler import RoundReport

ROUND_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class SchedulerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.reconciler_actions = Counter(
            "ferry_scheduler_reconciler_actions",
            "What the reconciler did, by kind: leases_expired, retried, failed, "
            "workers_lost, requeued",
            ["kind"],
            registry=self.registry,
        )
        self.round_duration = Histogram(
            "ferry_scheduler_reconcile_round_seconds",
            "Duration of one reconcile round",
            buckets=ROUND_BUCKETS,
            registry=self.registry,
        )
        self.lag = Histogram(
            "ferry_scheduler_lag_seconds",
            "How late a scheduler round started against when it was due",
            buckets=ROUND_BUCKETS,
            registry=self.registry,
        )

    def round_done(self, report: RoundReport, seconds: float) -> None:
        self.round_duration.observe(seconds)
        for kind, count in asdict(report).items():
            # Touch every kind so each series exists (at 0) from the first round.
            self.reconciler_actions.labels(kind).inc(count)
