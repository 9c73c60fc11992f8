"""The Celery baseline's app, tasks and client, run with an interpreter that has Celery.

Celery is not one of Ferry's dependencies: `bench/celery_cases.py` runs this file with the
interpreter of `pip install -e '.[bench]'`, or with a venv of its own. Nothing of Ferry is
imported here, so that venv needs Celery alone.

    worker:  celery -A bench.celery_app worker --pool prefork ...   (FERRY_BENCH_CELERY_* set)
    client:  python -m bench.celery_app chain --runs N --warmup W
             python -m bench.celery_app chord --size N --repeats R

The client prints one JSON object on stdout: the samples in seconds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import sys
import time
from typing import Any

from celery import Celery, chain, chord, group

BROKER = os.environ.get("FERRY_BENCH_CELERY_BROKER", "redis://localhost:6379/0")
QUEUE = os.environ.get("FERRY_BENCH_CELERY_QUEUE", "bench")

app = Celery("bench", broker=BROKER, backend=BROKER)
app.conf.update(
    task_default_queue=QUEUE,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    # Results live as long as the run needs them; nothing is left in Redis for long.
    result_expires=600,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="noop")
def noop(*args: Any) -> None:
    """A chain passes the previous result as the first argument; it is ignored."""
    return None


@app.task(name="stamp")
def stamp(trail: list[list[float]] | None = None) -> list[list[float]]:
    """A no-op link of a chain that passes along when each link ran: [[start, end], ...].

    Celery records no start time of its own; the hop is taken inside the task bodies, so
    it also holds the prefork pool's hand-over to and from the child process."""
    started = time.time()
    return [*(trail or []), [started, time.time()]]


@app.task(name="collect")
def collect(results: list[Any]) -> int:
    """A chord's callback gets the header's results as one list."""
    return len(results)


def run_chains(runs: int, warmup: int, jitter_s: float, timeout_s: float) -> dict[str, Any]:
    samples: list[float] = []
    hops: list[float] = []
    deadline = time.monotonic() + timeout_s
    cpu0 = 0.0
    for index in range(warmup + runs):
        if index == warmup:
            cpu0 = time.process_time()
        if time.monotonic() > deadline:
            break
        time.sleep(random.uniform(0, jitter_s))  # as before Ferry's sequential runs
        t0 = time.perf_counter()
        trail = chain(stamp.s(), stamp.s(), stamp.s()).apply_async().get(timeout=30)
        if index >= warmup:
            samples.append(time.perf_counter() - t0)
            hops += [down[0] - up[1] for up, down in itertools.pairwise(trail)]
    return {"samples_s": samples, "hops_s": hops, "client_cpu_s": time.process_time() - cpu0}


def run_chords(size: int, repeats: int, timeout_s: float) -> dict[str, Any]:
    """Also how long the client took to send the chord, and its CPU for it all: a canvas is
    built and published by the caller, so that is Celery's work too."""
    samples: list[float] = []
    sent: list[float] = []
    deadline = time.monotonic() + timeout_s
    cpu0 = time.process_time()
    for _ in range(repeats):
        if time.monotonic() > deadline:
            break
        t0 = time.perf_counter()
        pending = chord(group(noop.s() for _ in range(size)))(collect.s())
        sent.append(time.perf_counter() - t0)
        result = pending.get(timeout=120)
        samples.append(time.perf_counter() - t0)
        if result != size:
            raise RuntimeError(f"the chord's callback saw {result} results, not {size}")
    return {"samples_s": samples, "sent_s": sent, "client_cpu_s": time.process_time() - cpu0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.celery_app")
    sub = parser.add_subparsers(dest="case", required=True)
    chains = sub.add_parser("chain")
    chains.add_argument("--runs", type=int, required=True)
    chains.add_argument("--warmup", type=int, default=10)
    chains.add_argument("--jitter", type=float, default=0.01)
    chains.add_argument("--budget", type=float, default=300)
    chords = sub.add_parser("chord")
    chords.add_argument("--size", type=int, required=True)
    chords.add_argument("--repeats", type=int, required=True)
    chords.add_argument("--budget", type=float, default=300)
    ping = sub.add_parser("ping")
    ping.add_argument("--timeout", type=float, default=60)
    args = parser.parse_args(argv)
    if args.case == "chain":
        report = run_chains(args.runs, args.warmup, args.jitter, args.budget)
    elif args.case == "chord":
        report = run_chords(args.size, args.repeats, args.budget)
    else:  # the worker is up and consuming: one task goes through
        noop.delay().get(timeout=args.timeout)
        report = {}
    json.dump(report, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
