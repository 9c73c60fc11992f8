"""The agent forks each execution's child ahead of time: a child waits, ready, and the next
execution runs in it. Kill on timeout and terminate work on it as on a child forked on
demand; a ready child that dies is replaced; secrets reach it only with its execution."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from tests.agent_helpers import Replica, make_spec, new_id, start_replica
from tests.test_agent import process_gone, wait_for
from worker.runtimes import ProcessRuntime


@pytest.fixture
async def own_replica(tmp_path_factory):
    started = await start_replica(ProcessRuntime(), make_spec(tmp_path_factory.mktemp("pre")))
    yield started
    await started.close()


def live_children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(c) for c in text.split() if not process_gone(int(c))]


def _group_leader(pid: int) -> bool:
    try:
        return os.getpgid(pid) == pid
    except ProcessLookupError:
        return False


async def ready_child(replica: Replica, not_one_of: tuple[int, ...] = ()) -> int:
    """The agent's child waiting for an execution: once it has its own process group."""
    agent = int(replica.handle.ref)

    def waiting() -> list[int]:
        return [c for c in live_children(agent) if c not in not_one_of and _group_leader(c)]

    await wait_for(waiting)
    [child] = waiting()
    return child


async def test_the_next_execution_runs_in_the_child_forked_ahead(own_replica: Replica):
    agent = int(own_replica.handle.ref)
    child = await ready_child(own_replica)  # its own process group: a kill takes it all

    first = await own_replica.call("pids")
    assert first.outcome.status == "success"
    assert first.outcome.output == {"agent": agent, "child": child, "uid": os.getuid()}
    # Another one is ready for the next execution.
    following = await ready_child(own_replica, not_one_of=(child,))
    second = await own_replica.call("pids")
    assert second.outcome.output["child"] == following


async def test_timeout_and_terminate_kill_a_preforked_child(
    own_replica: Replica,
):
    child = await ready_child(own_replica)
    timed_out = await own_replica.call("sleep", timeout_s=1, seconds=60)
    assert timed_out.outcome.status == "timeout"
    assert int(timed_out.lines("stdout")[0].split("pid=")[1]) == child
    # The agent's own record: killed at its 1 s deadline, long before the 60 s sleep ended.
    assert 1000 <= timed_out.outcome.duration_ms < 10_000
    assert process_gone(child)

    child = await ready_child(own_replica)
    execution_id = new_id()
    pids: list[int] = []
    task = asyncio.create_task(
        own_replica.conn.execute(
            execution_id,
            "sleep",
            {"seconds": 60},
            on_log=lambda stream, text, at: pids.append(int(text.split("pid=")[1])),
        )
    )
    await wait_for(lambda: pids)
    assert pids == [child]
    asked = time.monotonic()
    await own_replica.conn.stop(execution_id)
    outcome = await asyncio.wait_for(task, 30)
    assert outcome.status == "terminated"
    assert time.monotonic() - asked < 15  # not the 60 s it asked for (room for a busy machine)
    assert process_gone(child)


async def test_a_ready_child_that_dies_is_replaced(own_replica: Replica):
    child = await ready_child(own_replica)
    os.kill(child, signal.SIGKILL)
    await wait_for(lambda: process_gone(child))
    # The next execution runs all the same (in a replacement, or forked on demand)...
    call = await own_replica.call("pids")
    assert call.outcome.status == "success", call.outcome
    assert call.outcome.output["child"] != child
    # ...and a child is ready again afterwards (not the one that ran it: that one goes once
    # it has reported, but may not be reaped yet).
    ran_in = call.outcome.output["child"]
    replacement = await ready_child(own_replica, not_one_of=(child, ran_in))
    await wait_for(lambda: process_gone(ran_in))
    assert not process_gone(replacement)


async def test_secrets_sent_after_the_fork_reach_the_ready_child(own_replica: Replica):
    child = await ready_child(own_replica)  # forked before the agent had any secret
    await own_replica.conn.send_secrets({"API_TOKEN": "t0ps3cret"})
    call = await own_replica.call("environment", name="API_TOKEN")
    assert call.outcome.output["value"] == "t0ps3cret"
    ran_in = await own_replica.call("pids")
    assert ran_in.outcome.output["child"] != child  # each execution its own child


async def test_shutdown_takes_the_ready_child_along(own_replica: Replica):
    child = await ready_child(own_replica)
    await own_replica.conn.shutdown(timeout_s=5)
    info = await own_replica.wait_exit()
    assert info.exit_code == 0
    await wait_for(lambda: process_gone(child))
