"""The Celery baseline: a `chain` of three no-ops and a `chord` of N no-ops into one callback,
on the same Redis as Ferry (its own database number), prefork workers.

Celery is needed by the benchmark only. When the running interpreter has it (`pip install
-e '.[bench]'`), that one runs the worker and the client; otherwise a venv of its own is
made once under `bench/.venv-celery` (git-ignored) and Celery is pip-installed into it,
with a message saying so. The client runs as a child process (`bench/celery_app.py`), so
its CPU is charged to the benchmark's client, not to the system under test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from bench.cpu import CpuMeter
from bench.cpu import delta as cpu_delta
from bench.stack import REPO, tail
from bench.stats import summary_ms

VENV = REPO / "bench" / ".venv-celery"
REQUIREMENT = "celery[redis]>=5.4,<6"
# The database Celery's broker and results use on Ferry's Redis: Ferry uses db 0.
REDIS_DB = 3


def _has_celery(python: str) -> bool:
    done = subprocess.run(
        [python, "-c", "import celery, redis"], capture_output=True, timeout=60, check=False
    )
    return done.returncode == 0


def celery_python(say: Any = print) -> str:
    """An interpreter that can import Celery: this one, or the benchmark's own venv."""
    if _has_celery(sys.executable):
        return sys.executable
    python = VENV / "bin" / "python"
    if python.exists() and _has_celery(str(python)):
        return str(python)
    say(
        f"Celery is not installed here (it is only the benchmark's baseline): installing "
        f"{REQUIREMENT!r} into {VENV.relative_to(REPO)} (once; `pip install -e '.[bench]'` "
        f"makes this unnecessary)"
    )
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, timeout=300)
    subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            REQUIREMENT,
        ],
        check=True,
        timeout=600,
    )
    return str(python)


def broker_url(redis_url: str) -> str:
    """Ferry's `unix:///path` (or `redis://host:port/n`) as a Celery URL on REDIS_DB."""
    if redis_url.startswith("unix://"):
        path = redis_url.removeprefix("unix://").split("?", 1)[0]
        return f"redis+socket://{path}?virtual_host={REDIS_DB}"
    base = redis_url.rsplit("/", 1)[0] if redis_url.count("/") > 2 else redis_url
    return f"{base}/{REDIS_DB}"


class CeleryBaseline:
    """One prefork worker process tree for the whole baseline; `stop()` ends it."""

    def __init__(
        self, python: str, redis_url: str, concurrency: int, log_dir: Path, meter: CpuMeter
    ) -> None:
        self.python = python
        self.concurrency = concurrency
        self.meter = meter
        self.log_path = log_dir / "celery-worker.log"
        self.env = {
            **os.environ,
            "FERRY_BENCH_CELERY_BROKER": broker_url(redis_url),
            "FERRY_BENCH_CELERY_QUEUE": f"bench-{uuid.uuid4().hex[:8]}",
            "PYTHONPATH": str(REPO),
        }
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 90) -> None:
        command = [
            self.python,
            "-m",
            "celery",
            "-A",
            "bench.celery_app",
            "worker",
            "--pool",
            "prefork",
            "--concurrency",
            str(self.concurrency),
            "--loglevel",
            "warning",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "-Q",
            self.env["FERRY_BENCH_CELERY_QUEUE"],
            "-n",
            f"bench-{uuid.uuid4().hex[:6]}@%h",
        ]
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(
                command,
                cwd=REPO,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.meter.roots[self.process.pid] = "celery worker"
        try:
            self._client(["ping", "--timeout", str(timeout_s)], timeout_s + 10)
        except RuntimeError as exc:
            raise RuntimeError(
                f"the Celery worker did not answer: {exc}\n{tail(self.log_path)}"
            ) from None

    def _client(self, args: list[str], timeout_s: float) -> dict[str, Any]:
        try:
            done = subprocess.run(
                [self.python, "-m", "bench.celery_app", *args],
                cwd=REPO,
                env=self.env,
                capture_output=True,
                text=True,
                timeout=timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"celery client {args[0]}: no answer in {timeout_s:g} s") from None
        if done.returncode != 0:
            raise RuntimeError(
                f"celery client {args[0]} exited {done.returncode}: {done.stderr[-1500:]}"
            )
        return json.loads(done.stdout.strip().splitlines()[-1])

    def _alive(self) -> None:
        if self.process is None or self.process.poll() is not None:
            raise RuntimeError(f"the Celery worker died:\n{tail(self.log_path)}")

    def chains(self, runs: int, warmup: int, jitter_s: float, budget_s: float) -> dict[str, Any]:
        before = self.meter.snapshot()
        answer = self._client(
            [
                "chain",
                "--runs",
                str(runs),
                "--warmup",
                str(warmup),
                "--jitter",
                str(jitter_s),
                "--budget",
                str(budget_s),
            ],
            budget_s + 60,
        )
        after = self.meter.snapshot()
        self._alive()
        samples = answer["samples_s"]
        return {
            "runs": len(samples),
            "complete": len(samples) == runs,
            "warmup": warmup,
            "end_to_end": summary_ms(samples),
            "hop": summary_ms(answer["hops_s"]),
            "cpu": _celery_cpu(cpu_delta(before, after, 3 * len(samples)), answer["client_cpu_s"]),
        }

    def chords(self, size: int, repeats: int, budget_s: float) -> dict[str, Any]:
        before = self.meter.snapshot()
        answer = self._client(
            ["chord", "--size", str(size), "--repeats", str(repeats), "--budget", str(budget_s)],
            budget_s + 150,
        )
        after = self.meter.snapshot()
        self._alive()
        samples = answer["samples_s"]
        return {
            "size": size,
            "repeats": len(samples),
            "complete": len(samples) == repeats,
            "wall": summary_ms(samples),
            "client_sent": summary_ms(answer["sent_s"]),
            "cpu": _celery_cpu(
                cpu_delta(before, after, size * len(samples)), answer["client_cpu_s"]
            ),
        }

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        self.meter.roots.pop(process.pid, None)
        if process.poll() is None:
            # Celery's warm shutdown on SIGTERM: the pool children finish and exit too.
            process.terminate()
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
                process.wait(10)
        # A pool child that outlived its parent (it should not) is in the same session.
        try:
            os.killpg(process.pid, 9)
        except ProcessLookupError:
            pass


def _celery_cpu(cpu: dict[str, Any], client_cpu_s: float) -> dict[str, Any]:
    """Celery's own CPU per unit: its worker tree and Redis (Ferry idles meanwhile), and
    with the client's CPU in the timed part added: the caller builds and publishes a canvas,
    which Ferry's engine does on the server side."""
    units = cpu["units"]
    used = cpu["cpu_s"]
    own = used.get("celery worker", 0.0) + used.get("redis", 0.0)
    cpu["celery_client_cpu_s"] = round(client_cpu_s, 3)
    cpu["celery_cpu_ms_per_unit"] = round(1000 * own / units, 3) if units else None
    cpu["celery_with_client_cpu_ms_per_unit"] = (
        round(1000 * (own + client_cpu_s) / units, 3) if units else None
    )
    return cpu
