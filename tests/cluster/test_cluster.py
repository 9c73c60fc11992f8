"""Ferry as separate containers on a private network, under faults.

Each test asserts what PostgreSQL recorded (statuses, attempts, fire times); the figures
(executions per second, recovery times) are printed, never asserted: the machine is shared.
Counts are scaled down from the production-sized scenarios to keep the suite within its
time budget (docs/deploy.md gives them).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import httpx
import pytest

from tests.cluster.conftest import LEASE_S, Stack

pytestmark = [pytest.mark.docker, pytest.mark.cluster, pytest.mark.slow]

KILL_COUNT = 1000
THROUGHPUT_COUNT = 200
TERMINAL = ("success", "failed", "terminated")


def _submit(client: Any, service_id: str, batch: str, count: int, seconds: float) -> list[str]:
    ids: list[str] = []
    for start in range(0, count, 500):
        items = [
            {
                "service": service_id,
                "function": "work",
                "input": {"seconds": seconds, "batch": batch},
            }
            for _ in range(min(500, count - start))
        ]
        answer = client.request("POST", "/executions/batch", json={"executions": items})
        ids += [item["id"] for item in answer["items"]]
    return ids


def _live(stack: Stack, batch: str) -> int:
    return int(
        stack.scalar(
            "SELECT count(*) FROM executions WHERE input->>'batch' = "
            f"'{batch}' AND status NOT IN ('success', 'failed', 'terminated')"
        )
    )


def _wait_ended(stack: Stack, batch: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (left := _live(stack, batch)) and time.monotonic() < deadline:
        time.sleep(1)
    assert left == 0, f"{left} executions of {batch} still live after {timeout}s"


def _check_attempts(stack: Stack, batch: str, max_attempt: int) -> dict[str, int]:
    """Every execution of `batch` succeeded once, within `max_attempt` attempts, each of
    which is a recorded row; returns counts by attempt number."""
    rows = stack.sql(
        f"""SELECT e.id, e.status, e.attempt, count(a.*),
                   count(a.*) FILTER (WHERE a.status = 'success')
              FROM executions e LEFT JOIN execution_attempts a ON a.execution_id = e.id
             WHERE e.input->>'batch' = '{batch}'
             GROUP BY e.id"""
    )
    assert rows
    by_status = Counter(r[1] for r in rows)
    if by_status != {"success": len(rows)}:
        failed = stack.sql(
            "SELECT e.id, e.status, e.reason, e.error::text, (SELECT string_agg(a.attempt || ':' "
            "|| a.worker_id || ':' || a.status || ':' || coalesce(a.reason, ''), ' ') FROM "
            "execution_attempts a WHERE a.execution_id = e.id) FROM executions e "
            f"WHERE e.input->>'batch' = '{batch}' AND e.status <> 'success' LIMIT 5"
        )
        raise AssertionError(f"{by_status}: {failed}")
    for execution_id, _status, attempt, recorded, successes in rows:
        assert 1 <= int(attempt) <= max_attempt, (execution_id, attempt)
        assert int(recorded) == int(attempt), (execution_id, attempt, recorded)
        assert int(successes) == 1, (execution_id, "outcomes", successes)
    return dict(Counter(int(r[2]) for r in rows))


def _rate(stack: Stack, batch: str) -> float:
    seconds = float(
        stack.scalar(
            "SELECT extract(epoch FROM max(finished_at) - min(created_at)) FROM executions "
            f"WHERE input->>'batch' = '{batch}'"
        )
    )
    count = int(stack.scalar(f"SELECT count(*) FROM executions WHERE input->>'batch' = '{batch}'"))
    return count / seconds


def _wait_worker_up(stack: Stack, service: str, after: set[str], timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fresh = [w for w in stack.worker_ids(service) if w not in after]
        if fresh:
            return fresh[-1]
        time.sleep(0.5)
    raise AssertionError(f"no new worker registered as {service}")


@pytest.mark.timeout(400)
def test_throughput_with_one_and_two_workers(stack: Stack, client: Any, service_id: str) -> None:
    stack.compose("stop", "-t", "15", "worker-2")
    try:
        _submit(client, service_id, "one-worker", THROUGHPUT_COUNT, 0.0)
        _wait_ended(stack, "one-worker", 180)
    finally:
        before = set(stack.worker_ids("worker-2"))
        stack.compose("start", "worker-2")
        _wait_worker_up(stack, "worker-2", before)
    _submit(client, service_id, "two-workers", THROUGHPUT_COUNT, 0.0)
    _wait_ended(stack, "two-workers", 180)
    _check_attempts(stack, "one-worker", 1)
    _check_attempts(stack, "two-workers", 1)
    print(
        f"\nthroughput ({THROUGHPUT_COUNT} executions of an empty function): "
        f"1 worker {_rate(stack, 'one-worker'):.1f}/s, 2 workers {_rate(stack, 'two-workers'):.1f}/s"
    )


@pytest.mark.timeout(400)
def test_worker_killed_mid_way(stack: Stack, client: Any, service_id: str) -> None:
    killed = stack.worker_ids("worker-2")[-1]
    container = stack.container("worker-2")  # looked up first: compose is slow to start
    ids = _submit(client, service_id, "kill", KILL_COUNT, 1.0)
    assert len(ids) == KILL_COUNT
    deadline = time.monotonic() + 180
    held: list[str] = []
    while time.monotonic() < deadline:
        done, held_text = stack.sql(
            "SELECT (SELECT count(*) FROM executions WHERE input->>'batch' = 'kill' "
            "AND status = 'success'), (SELECT string_agg(id, ',') FROM executions "
            f"WHERE input->>'batch' = 'kill' AND status = 'in-progress' AND worker_id = '{killed}')"
        )[0]
        held = [i for i in held_text.split(",") if i]
        if int(done) >= KILL_COUNT // 4 and held:
            break
        time.sleep(0.2)
    assert held, "worker-2 held nothing of the batch"
    try:
        killed_at = time.time()  # the containers share this host's clock with PostgreSQL
        stack.docker("kill", container)
        _wait_ended(stack, "kill", 300)
        attempts = _check_attempts(stack, "kill", 2)
        # Every second attempt replaced one the killed worker held, and is on the other worker.
        rows = stack.sql(
            """SELECT a1.worker_id, a1.status, a2.worker_id
                 FROM execution_attempts a2
                 JOIN execution_attempts a1 ON a1.execution_id = a2.execution_id AND a1.attempt = 1
                 JOIN executions e ON e.id = a2.execution_id
                WHERE e.input->>'batch' = 'kill' AND a2.attempt = 2"""
        )
        assert rows, "the kill interrupted no execution"
        for first_worker, first_status, second_worker in rows:
            assert first_worker == killed and first_status != "success"
            assert second_worker != killed
        workers = stack.sql(
            "SELECT DISTINCT a.worker_id FROM execution_attempts a JOIN executions e "
            "ON e.id = a.execution_id WHERE e.input->>'batch' = 'kill'"
        )
        assert len(workers) >= 2
        recovered = float(
            stack.scalar(
                "SELECT extract(epoch FROM min(a.started_at)) FROM execution_attempts a "
                "JOIN executions e ON e.id = a.execution_id WHERE e.input->>'batch' = 'kill' AND a.attempt = 2"
            )
        )
        print(
            f"\nkill: {KILL_COUNT} executions, 1 worker killed, attempts {attempts}, lost 0, "
            f"duplicated outcomes 0; from the kill to the first retry elsewhere "
            f"{recovered - killed_at:.1f}s (lease {LEASE_S}s)"
        )
    finally:
        before = set(stack.worker_ids("worker-2"))
        stack.compose("start", "worker-2")
        _wait_worker_up(stack, "worker-2", before)


@pytest.mark.timeout(300)
def test_worker_cut_off_longer_than_its_lease(stack: Stack, client: Any, service_id: str) -> None:
    """Cut off for longer than its lease, worker-1 loses its executions to worker-2; its
    functions end after it is back, and their results are refused: the outcome is attempt 2's."""
    network = stack.network()
    worker = stack.container("worker-1")
    cut_s = LEASE_S * 3
    # As many as both workers have slots (2 replicas x concurrency 8 each): worker-1 gets some.
    _submit(client, service_id, "partition", 32, cut_s + 4)  # they end after the cut is over
    deadline = time.monotonic() + 120
    held: list[str] = []
    cut_worker = stack.worker_ids("worker-1")[-1]
    while time.monotonic() < deadline and not held:
        held = [
            r[0]
            for r in stack.sql(
                "SELECT id FROM executions WHERE input->>'batch' = 'partition' "
                f"AND status = 'in-progress' AND worker_id = '{cut_worker}'"
            )
        ]
        time.sleep(0.2)
    assert held, "worker-1 never ran an execution of the batch"
    stack.docker("network", "disconnect", network, worker)
    try:
        time.sleep(cut_s)
    finally:
        stack.docker("network", "connect", network, worker)
    _wait_ended(stack, "partition", 180)
    time.sleep(LEASE_S * 2)  # worker-1's functions have ended and it has tried to report them
    _check_attempts(stack, "partition", 3)
    held_list = ",".join(f"'{i}'" for i in held)
    rows = stack.sql(
        f"""SELECT e.id, e.attempt, e.worker_id, a.status, a.reason,
                   (SELECT count(*) FROM jsonb_array_elements(e.status_log) s
                     WHERE s->>'status' IN ('success', 'failed', 'terminated'))
              FROM executions e
              JOIN execution_attempts a ON a.execution_id = e.id AND a.attempt = 1
             WHERE e.id IN ({held_list})"""
    )
    assert len(rows) == len(held)
    for execution_id, attempt, final_worker, first_status, first_reason, terminal_entries in rows:
        # Retried elsewhere; the cut-off worker's attempt is on record as lost, not an outcome.
        assert int(attempt) >= 2, execution_id
        assert final_worker != cut_worker, execution_id
        assert (first_status, first_reason) == ("failed", "lost"), execution_id
        assert int(terminal_entries) == 1, execution_id
    # worker-1 is back: it heartbeats again (registering anew if the reconciler forgot it)
    # once the calls it had in flight on connections the cut left half-open have timed out
    # (the pool's command timeout, 60 s), and then takes new executions again.
    back_started = time.monotonic()
    while time.monotonic() - back_started < 150:
        fresh = stack.scalar(
            "SELECT count(*) FROM workers WHERE id = "
            f"'{cut_worker}' AND heartbeat_at > clock_timestamp() - interval '2 seconds'"
        )
        if fresh == "1":
            break
        time.sleep(1)
    assert fresh == "1", "worker-1 never heartbeated again"
    back_s = time.monotonic() - back_started
    _submit(client, service_id, "partition-after", 60, 0.1)
    _wait_ended(stack, "partition-after", 120)
    _check_attempts(stack, "partition-after", 1)
    by_cut = stack.scalar(
        f"SELECT count(*) FROM executions WHERE input->>'batch' = 'partition-after' AND worker_id = '{cut_worker}'"
    )
    print(
        f"\npartition: worker-1 cut off {cut_s:.0f}s (lease {LEASE_S}s) holding {len(held)} "
        f"executions: all retried on worker-2, attempt 1 of each recorded lost, late results "
        f"refused, duplicated outcomes 0; worker-1 heartbeating again {back_s:.0f}s after the "
        f"checks began, then ran {by_cut} of 60 new executions"
    )


def _load_through(
    stack: Stack, service_id: str, batch: str, outage: Any, *, timeout_s: float = 10
) -> tuple[list[str], Counter[int | str], float, float]:
    """Post executions one by one while `outage()` runs; returns the accepted ids, answers
    by status, the slowest answer while the outage lasted (a refusal or an acceptance) and
    the time from the outage's end to the next 201."""
    accepted: list[str] = []
    answers: Counter[int | str] = Counter()
    slowest_refusal = 0.0
    stop = threading.Event()
    ended_at: list[float] = []
    first_after: list[float] = []
    headers = {"Authorization": f"Bearer {stack.token}"}
    body = {"service": service_id, "function": "work", "input": {"seconds": 0.05, "batch": batch}}

    def post() -> None:
        nonlocal slowest_refusal
        with httpx.Client(base_url=stack.url, headers=headers, timeout=timeout_s) as http:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    response = http.post("/api/v1/executions", json=body)
                except httpx.HTTPError as exc:
                    answers[type(exc).__name__] += 1
                    continue
                answers[response.status_code] += 1
                if outage_on.is_set():
                    slowest_refusal = max(slowest_refusal, time.monotonic() - started)
                if response.status_code == 201:
                    accepted.append(response.json()["id"])
                    if ended_at and not first_after:
                        first_after.append(time.monotonic())
                else:
                    time.sleep(0.05)
                time.sleep(0.02)

    outage_on = threading.Event()
    thread = threading.Thread(target=post)
    thread.start()
    try:
        time.sleep(2)
        outage_on.set()
        outage()
        ended_at.append(time.monotonic())
        outage_on.clear()
        deadline = time.monotonic() + 60
        while not first_after and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(2)
    finally:
        stop.set()
        thread.join(timeout=30)
    back = first_after[0] - ended_at[0] if first_after else float("inf")
    return accepted, answers, slowest_refusal, back


@pytest.mark.timeout(300)
def test_postgres_restarted_under_load(stack: Stack, service_id: str) -> None:
    statuses: list[int] = []

    def outage() -> None:
        stack.compose("stop", "-t", "10", "postgres")
        time.sleep(4)
        with httpx.Client(base_url=stack.url, timeout=10) as http:
            statuses.append(http.get("/readyz").status_code)
        stack.compose("start", "postgres")

    accepted, answers, slowest, back = _load_through(stack, service_id, "postgres-down", outage)
    assert statuses == [503]
    assert set(answers) <= {201, 503}, answers  # refused at once, never a hang or a 500
    assert answers[503] > 0 and answers[201] > 0
    _wait_ended(stack, "postgres-down", 180)
    counted = int(
        stack.scalar("SELECT count(*) FROM executions WHERE input->>'batch' = 'postgres-down'")
    )
    assert counted >= len(accepted)
    _check_attempts(stack, "postgres-down", 3)
    workers_back = _heartbeats_after_outage(stack)
    print(
        f"\npostgres restart: {len(accepted)} accepted, {answers[503]} refused with 503 "
        f"(slowest answer during the outage {slowest:.2f}s), lost 0; first 201 {back:.1f}s after it was started again; "
        f"workers heartbeating: {workers_back}"
    )


def _heartbeats_after_outage(stack: Stack) -> int:
    deadline = time.monotonic() + 30
    fresh = 0
    while time.monotonic() < deadline:
        fresh = int(
            stack.scalar(
                "SELECT count(*) FROM workers WHERE heartbeat_at > clock_timestamp() - interval '3 seconds' "
                "AND host IN ('worker-1', 'worker-2')"
            )
        )
        if fresh >= 2:
            break
        time.sleep(0.5)
    assert fresh >= 2
    return fresh


@pytest.mark.timeout(300)
def test_redis_lost_under_load(stack: Stack, service_id: str) -> None:
    """Redis removed with its volume (its queues gone), then started empty: the reconciler
    requeues every accepted execution from PostgreSQL."""

    def outage() -> None:
        stack.compose("rm", "-s", "-f", "redis")
        stack.docker("volume", "rm", f"{stack.name}_redis")
        time.sleep(3)
        stack.compose("up", "-d", "--no-deps", "redis")

    accepted, answers, slowest, back = _load_through(stack, service_id, "redis-down", outage)
    assert set(answers) <= {201, 503}, answers
    assert answers[201] > 0
    _wait_ended(stack, "redis-down", 180)
    counted = int(
        stack.scalar("SELECT count(*) FROM executions WHERE input->>'batch' = 'redis-down'")
    )
    assert counted >= len(accepted)
    _check_attempts(stack, "redis-down", 3)
    print(
        f"\nredis lost: {len(accepted)} accepted, {answers[503]} refused with 503 "
        f"(slowest answer during the outage {slowest:.2f}s), lost 0; first 201 {back:.1f}s after it was started again"
    )


@pytest.mark.timeout(400)
def test_rolling_upgrade_of_workers(stack: Stack, client: Any, service_id: str) -> None:
    _submit(client, service_id, "rolling", 300, 0.3)
    for service in ("worker-1", "worker-2"):
        time.sleep(3)
        before = set(stack.worker_ids(service))
        stack.compose("up", "-d", "--no-deps", "--force-recreate", service, timeout=300)
        _wait_worker_up(stack, service, before)
    _wait_ended(stack, "rolling", 300)
    attempts = _check_attempts(stack, "rolling", 3)
    print(f"\nrolling upgrade: 300 executions, both workers replaced, attempts {attempts}, lost 0")


CRON_TRIGGERS = 100
CRON_SECONDS = 30


@pytest.mark.timeout(400)
def test_cron_ticks_exactly_once_across_schedulers(
    stack: Stack, client: Any, service_id: str
) -> None:
    project = client.request("GET", f"/services/{service_id}")["project"]
    triggers = []
    for i in range(CRON_TRIGGERS):
        body = {
            "project": project,
            "name": f"tick-{i}",
            "type": "cron",
            "input": {"batch": "cron"},
            "operation": {"type": "function", "service": service_id, "function": "work"},
            "spec": {"cron": "* * * * * *", "misfire": "skip"},
        }
        triggers.append(client.request("POST", "/triggers", json=body)["id"])
    time.sleep(CRON_SECONDS / 2)
    stack.docker("kill", stack.container("scheduler-1"))
    time.sleep(CRON_SECONDS / 2)
    for trigger in triggers:
        client.request("POST", f"/triggers/{trigger}/pause")
    rows = stack.sql(
        """SELECT trigger_id, count(*), count(DISTINCT trigger_fire_time),
                  extract(epoch FROM max(trigger_fire_time) - min(trigger_fire_time))
             FROM executions WHERE trigger_id IS NOT NULL AND input->>'batch' = 'cron'
            GROUP BY trigger_id"""
    )
    assert len(rows) == CRON_TRIGGERS
    total = 0
    for trigger, count, distinct, span in rows:
        assert int(count) == int(distinct), (trigger, "a tick fired twice")
        # One scheduler ran throughout: no tick between the first and the last is missing.
        assert int(count) == int(float(span)) + 1, (trigger, count, span)
        assert int(count) >= CRON_SECONDS - 5
        total += int(count)
    print(
        f"\ncron: {CRON_TRIGGERS} triggers every second for {CRON_SECONDS}s on 2 schedulers, "
        f"one killed half-way: {total} ticks, each once, none missing"
    )
    stack.compose("start", "scheduler-1")
