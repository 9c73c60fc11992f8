"""Small statistics helpers: percentiles by linear interpolation, summaries in milliseconds."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear interpolation between closest ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary_ms(seconds: Sequence[float]) -> dict[str, float | int]:
    """n, p50, p90, p99, mean, min, max of durations given in seconds, reported in ms."""
    if not seconds:
        return {"n": 0}
    ms = [s * 1000 for s in seconds]
    return {
        "n": len(ms),
        "p50_ms": round(percentile(ms, 50), 2),
        "p90_ms": round(percentile(ms, 90), 2),
        "p99_ms": round(percentile(ms, 99), 2),
        "mean_ms": round(sum(ms) / len(ms), 2),
        "min_ms": round(min(ms), 2),
        "max_ms": round(max(ms), 2),
    }


def save_report(report: dict[str, Any], out: Path, dated_name: str) -> Path:
    """Write the JSON report to `out` and a dated copy beside it; returns the copy's path."""
    text = json.dumps(report, indent=2, default=str)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    dated = out.parent / dated_name
    dated.write_text(text + "\n")
    return dated


def exit_status(report: dict[str, Any], error: BaseException | None) -> int:
    """0 when every measurement ran (targets are printed, not asserted)."""
    if error is None:
        return 0
    if isinstance(error, KeyboardInterrupt):
        return 130
    print(f"error: {report['error']}", file=sys.stderr)
    return 1
