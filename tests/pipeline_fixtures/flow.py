"""Functions the pipeline tests chain together (manifest: FLOW_MANIFEST in
tests/pipeline_helpers.py)."""

import os
import time


def add(n, plus=1, context=None):
    return {"n": n + plus, "node": context["pipeline_node"] if context else None}


def source(count):
    return list(range(count))


def square(n):
    print(f"square {n}")
    return n * n


def total(items):
    return sum(items)


def classify(n):
    return {"n": n, "kind": "even" if n % 2 == 0 else "odd"}


def fail_while(n, path):
    """Fails while the file at `path` exists: a fault the test can clear before a resume."""
    if os.path.exists(path):
        raise RuntimeError(f"{path} is there")
    return n


def hold(n, path, seconds=120.0):
    """Waits while the file at `path` exists (at most `seconds`)."""
    deadline = time.monotonic() + seconds
    while os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)
    return n


def nap(n, seconds):
    time.sleep(seconds)
    return n
