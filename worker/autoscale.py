"""How many replicas a service wants, from its queue and its recent activity."""

from __future__ import annotations

import math
from typing import Any


def desired_replicas(
    runtime: dict[str, Any],
    *,
    active: bool,
    queued: int,
    in_progress: int,
    live: int,
    idle_for_s: float,
) -> int:
    """Replicas to run: enough for `target_queue_per_replica` executions each, within
    min..max; a busy service keeps its warm replicas until it has been idle for
    `idle_timeout_s`, then falls back to `min_replicas` (zero by default)."""
    if not active:
        return 0
    load = queued + in_progress
    want = math.ceil(load / runtime["target_queue_per_replica"]) if load else 0
    want = max(runtime["min_replicas"], min(runtime["max_replicas"], want))
    if want < live and idle_for_s < runtime["idle_timeout_s"]:
        want = min(live, runtime["max_replicas"])
    return want
