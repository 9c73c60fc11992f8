"""The agent through its real protocol: a real agent subprocess (process runtime), no mocks."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from tests.agent_helpers import BASIC_FUNCTIONS, Replica, make_spec, new_id, start_replica
from worker.agent_client import AgentConnection, AgentInitError, AgentStartError
from worker.runtimes import ProcessRuntime


@pytest.fixture(scope="module")
async def replica(tmp_path_factory):
    """One warm replica shared by the tests that leave it serving."""
    runtime = ProcessRuntime()
    # 1 GB: room to encode a 65 MB output (a few copies of it) under the execution's bound.
    spec = make_spec(tmp_path_factory.mktemp("agent"), memory_mb=1024)
    started = await start_replica(runtime, spec)
    yield started
    await started.close()


@pytest.fixture
async def own_replica(tmp_path_factory):
    """A replica for a test that kills or disconnects it."""
    runtime = ProcessRuntime()
    started = await start_replica(runtime, make_spec(tmp_path_factory.mktemp("own")))
    yield started
    await started.close()


def process_gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")  # a zombie left to an init that does not reap is dead too


async def wait_for(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def test_ready_frame(replica: Replica):
    ready = replica.ready
    assert ready["type"] == "ready"
    assert ready["agent_version"] == 1
    assert ready["pid"] == int(replica.handle.ref)
    assert ready["python"].count(".") == 2
    assert ready["functions"] == sorted(BASIC_FUNCTIONS)


async def test_class_instantiated_once_and_state_not_carried(tmp_path_factory):
    spec = make_spec(
        tmp_path_factory.mktemp("cls"),
        codebase="stateful",
        entry_point="model.py",
        class_name="Runner",
        init_inputs={"greeting": "hi", "weights": 5},
        functions={"hello": {"inputs": ["name"], "outputs": ["greeting"]}, "state": {}},
    )
    started = await start_replica(ProcessRuntime(), spec)
    try:
        states = [(await started.call("state")).outcome.output for _ in range(6)]
        hello = await started.call("hello", name="Ann")
    finally:
        await started.close()
    assert hello.outcome.output == {"greeting": "hi, Ann"}
    agent_pid = started.ready["pid"]
    for state in states:
        assert state["inits"] == 1  # __init__ ran once, in the agent
        assert state["instance"] == states[0]["instance"]
        assert state["loaded_in"] == agent_pid == state["agent"]
        assert state["weights"] == [0, 1, 2, 3, 4]
        assert state["calls"] == 1  # what one execution mutates is gone for the next


async def test_output_shaping(replica: Replica):
    assert (await replica.call("add", a=1, b=2)).outcome.output == {"sum": 3}
    assert (await replica.call("identity", value=7)).outcome.output == {"value": 7}
    assert (await replica.call("identity", value={"value": 2})).outcome.output == {"value": 2}
    wrapped = await replica.call("identity", value={"other": 1})
    assert wrapped.outcome.output == {"value": {"other": 1}}
    assert (await replica.call("pair", a=2, b=3)).outcome.output == {"sum": 5, "product": 6}
    assert (await replica.call("no_outputs")).outcome.output == [1, "two", None]
    assert (await replica.call("echo")).outcome.output is None
    bad = await replica.call("bad_pair")
    assert bad.outcome.status == "failed"
    assert bad.outcome.error["type"] == "OutputError"
    assert "a, b" in bad.outcome.error["message"]


@pytest.mark.parametrize("function", ["not_json", "nan"])
async def test_unserialisable_output_is_output_error(replica: Replica, function: str):
    call = await replica.call(function)
    assert call.outcome.status == "failed"
    assert call.outcome.error["type"] == "OutputError"
    assert "JSON" in call.outcome.error["message"]


async def test_large_output_and_frame_limit(replica: Replica):
    big = await replica.call("big", megabytes=8)
    assert big.outcome.status == "success"
    assert len(big.outcome.output) == 8 * 1024 * 1024
    too_big = await replica.call("big", megabytes=65)
    assert too_big.outcome.error["type"] == "OutputError"
    assert "limit" in too_big.outcome.error["message"]


async def test_progress_and_context(replica: Replica):
    execution_id = new_id()
    progress = []
    outcome = await replica.conn.execute(
        execution_id,
        "report",
        {},
        context={"attempt": 2, "service_id": "svc-1", "project_id": "prj-1"},
        on_progress=lambda percent, message: progress.append((percent, message)),
    )
    assert outcome.status == "success", outcome.error
    assert progress == [(50, "half"), (100, None)]
    assert outcome.output["execution_id"] == execution_id
    assert outcome.output["attempt"] == 2
    assert outcome.output["service_id"] == "svc-1"
    assert outcome.output["context"]["project_id"] == "prj-1"


async def test_logs_arrive_in_order_before_the_result(replica: Replica):
    logs = []

    async def on_log(stream, text, at):  # async callbacks are awaited in order
        await asyncio.sleep(0)
        logs.append((stream, text, at))

    outcome = await replica.conn.execute(new_id(), "chatter", {"lines": 3}, on_log=on_log)
    assert outcome.output == "done"
    stdout = [text for stream, text, _ in logs if stream == "stdout"]
    stderr = [text for stream, text, _ in logs if stream == "stderr"]
    assert stdout == [
        "out 0",
        "out 1",
        "out 2",
        "raw fd write",
        "from a subprocess",
        "no newline at the end",
    ]
    assert stderr == ["err 0", "err 1", "err 2", "INFO basic: logged info"]
    times = [at for _, _, at in logs]
    assert all(abs(at - time.time()) < 60 for at in times)


async def test_long_lines_are_split(replica: Replica):
    call = await replica.call("long_line", size=40_000)
    assert [len(line) for line in call.lines("stdout")] == [16384, 16384, 40_000 - 2 * 16384]


async def test_flood_of_output_arrives_complete(replica: Replica):
    call = await replica.call("flood", lines=50_000)
    stdout = call.lines("stdout")
    assert call.outcome.output == 50_000
    assert len(stdout) == 50_000
    assert stdout[0].startswith("0 z") and stdout[-1].startswith("49999 z")


async def test_processes_left_running_are_killed(replica: Replica):
    started = time.monotonic()
    call = await replica.call("background")
    assert call.outcome.status == "success"
    # Not held up by the pipe `sleep` keeps open for 30 s (a bound for a busy machine).
    assert time.monotonic() - started < 10
    await wait_for(lambda: process_gone(call.outcome.output), timeout_s=10)


async def test_a_forked_process_returning_does_not_report(replica: Replica):
    call = await replica.call("fork_and_return")
    assert call.outcome.output == "parent"
    assert (await replica.call("add", a=1, b=2)).outcome.output == {"sum": 3}


async def test_exception_gives_error_with_traceback(replica: Replica):
    call = await replica.call("fail", message="size must be positive")
    error = call.outcome.error
    assert call.outcome.status == "failed"
    assert error["type"] == "ValueError"
    assert error["message"] == "size must be positive"
    assert "raise ValueError(message)" in error["traceback"]
    assert "agent.py" not in error["traceback"]


async def test_async_function(replica: Replica):
    assert (await replica.call("async_add", a=2, b=3)).outcome.output == {"sum": 5}


async def test_unknown_function(replica: Replica):
    call = await replica.call("nope")
    assert call.outcome.status == "failed"
    assert call.outcome.error["type"] == "FunctionNotFound"


async def test_timeout_kills_at_the_deadline(replica: Replica):
    call = await replica.call("sleep", timeout_s=1, seconds=60)
    assert call.outcome.status == "timeout"
    # The agent's own record: killed at its 1 s deadline, long before the 60 s sleep ended.
    assert 1000 <= call.outcome.duration_ms < 10_000
    pid = int(call.lines("stdout")[0].split("pid=")[1])
    assert process_gone(pid)


async def test_stop_kills_after_a_grace_period(replica: Replica):
    execution_id = new_id()
    pids = []
    task = asyncio.create_task(
        replica.conn.execute(
            execution_id,
            "sleep",
            {"seconds": 60},
            on_log=lambda stream, text, at: pids.append(int(text.split("pid=")[1])),
        )
    )
    await wait_for(lambda: pids)
    asked = time.monotonic()
    await replica.conn.stop(execution_id)
    outcome = await asyncio.wait_for(task, 30)
    assert outcome.status == "terminated"
    # SIGTERM, then SIGKILL a second later: ended long before the 60 s the sleep asked for
    # (a bound with room for a busy machine).
    assert time.monotonic() - asked < 15
    assert process_gone(pids[0])


async def test_concurrency_slots_and_heartbeat(replica: Replica):
    ids = [new_id() for _ in range(4)]
    tasks = [asyncio.create_task(replica.conn.execute(i, "sleep", {"seconds": 1})) for i in ids]
    await wait_for(lambda: set(replica.conn.running) == set(ids))
    busy = await replica.call("echo", value=1)  # a fifth one, beyond concurrency 4
    assert busy.outcome.status == "failed"
    assert busy.outcome.error["type"] == "AgentBusy"
    outcomes = await asyncio.gather(*tasks)
    assert [o.output for o in outcomes] == [1, 1, 1, 1]
    # All four ran at once (a heartbeat listed them together, above), and heartbeats go on
    # after them: the next one lists none.
    await wait_for(lambda: replica.conn.running == [])


@pytest.mark.parametrize(
    ("function", "expected"),
    [
        ("exit_hard", "exited with code 9"),
        ("kill_self", "signal 9 (SIGKILL)"),
        ("segfault", "signal 11 (SIGSEGV)"),
    ],
)
async def test_crash_is_reported_and_replica_keeps_serving(
    replica: Replica, function: str, expected: str
):
    call = await replica.call(function)
    assert call.outcome.status == "crashed"
    assert call.outcome.error["type"] == "Crashed"
    assert expected in call.outcome.error["message"]
    assert (await replica.call("add", a=1, b=1)).outcome.output == {"sum": 2}
    assert (await replica.runtime.exit_info(replica.handle)) is None


async def test_init_failed(tmp_path_factory):
    runtime = ProcessRuntime()
    spec = make_spec(tmp_path_factory.mktemp("broken"), codebase="broken", functions={})
    with pytest.raises(AgentInitError) as caught:
        await start_replica(runtime, spec)
    error = caught.value.error
    assert error["type"] == "RuntimeError"
    assert error["message"] == "boom at import"
    assert "main.py" in error["traceback"]


async def test_init_failed_leaves_exit_code_and_output(tmp_path_factory):
    runtime = ProcessRuntime()
    spec = make_spec(tmp_path_factory.mktemp("broken"), codebase="broken", functions={})
    handle = await runtime.start(spec)
    conn = AgentConnection()
    await conn.connect(runtime.socket_path(handle), 10)
    with pytest.raises(AgentInitError):
        await conn.wait_ready()
    replica = Replica(runtime, handle, conn, {}, 0)
    info = await replica.wait_exit()
    await replica.close()
    assert info.exit_code == 3
    assert "importing a module that cannot load" in info.detail
    assert "boom at import" in info.detail


async def test_declared_function_missing_from_module(tmp_path_factory):
    spec = make_spec(tmp_path_factory.mktemp("missing"), functions={"nope": {}})
    with pytest.raises(AgentInitError) as caught:
        await start_replica(ProcessRuntime(), spec)
    assert caught.value.error["type"] == "AttributeError"
    assert "'nope'" in caught.value.error["message"]


async def test_agent_death_resolves_pending_executions(own_replica: Replica):
    pids = []
    task = asyncio.create_task(
        own_replica.conn.execute(
            new_id(),
            "sleep",
            {"seconds": 30},
            on_log=lambda stream, text, at: pids.append(int(text.split("pid=")[1])),
        )
    )
    await wait_for(lambda: pids)
    os.kill(int(own_replica.handle.ref), signal.SIGKILL)
    outcome = await asyncio.wait_for(task, 10)
    assert outcome.status == "crashed"
    assert outcome.error["type"] == "AgentLost"
    await wait_for(lambda: process_gone(pids[0]), timeout_s=10)  # no orphan left running
    assert (await own_replica.wait_exit()).exit_code == 128 + signal.SIGKILL
    later = await own_replica.call("echo", value=1)
    assert later.outcome.error["type"] == "AgentLost"


async def test_agent_exits_when_the_worker_disconnects(own_replica: Replica):
    pids = []
    task = asyncio.create_task(
        own_replica.conn.execute(
            new_id(),
            "sleep",
            {"seconds": 30},
            on_log=lambda stream, text, at: pids.append(int(text.split("pid=")[1])),
        )
    )
    await wait_for(lambda: pids)
    own_replica.conn.close()
    assert (await task).status == "crashed"
    info = await own_replica.wait_exit(timeout_s=10)
    assert info.exit_code == 2
    await wait_for(lambda: process_gone(pids[0]), timeout_s=10)


async def test_shutdown(own_replica: Replica):
    await own_replica.conn.shutdown()
    assert (await own_replica.wait_exit(timeout_s=10)).exit_code == 0
    await own_replica.runtime.stop(own_replica.handle)
    await own_replica.runtime.stop(own_replica.handle)  # idempotent


async def test_connect_gives_up_with_a_clear_error(tmp_path):
    started = time.monotonic()
    with pytest.raises(AgentStartError, match="did not accept a connection"):
        await AgentConnection().connect(tmp_path / "agent.sock", timeout_s=0.2)
    assert time.monotonic() - started < 10  # gave up, rather than waiting on forever


async def test_socket_path_too_long_is_refused():
    with pytest.raises(AgentStartError, match="over 107 bytes"):
        await AgentConnection().connect("/tmp/" + "x" * 120, timeout_s=1)


# -- a service that reuses processes (`executions_per_process` above 1) ------------------


async def test_a_reused_process_carries_state_up_to_its_limit(tmp_path_factory):
    spec = make_spec(
        tmp_path_factory.mktemp("reuse"),
        codebase="stateful",
        entry_point="model.py",
        class_name="Runner",
        init_inputs={"greeting": "hi"},
        functions={"state": {}},
        concurrency=1,
        executions_per_process=3,
    )
    started = await start_replica(ProcessRuntime(), spec)
    try:
        states = [(await started.call("state")).outcome.output for _ in range(7)]
    finally:
        await started.close()
    # What an execution mutates is there for the next one the same process runs, and a
    # process runs three, then a new one (forked from the agent's state) takes over.
    assert [s["calls"] for s in states] == [1, 2, 3, 1, 2, 3, 1]
    pids = [s["pid"] for s in states]
    assert pids[0] == pids[1] == pids[2] != pids[3] == pids[4] == pids[5] != pids[6]
    assert len({pids[0], pids[3], pids[6]}) == 3
    assert {s["inits"] for s in states} == {1}
    assert {s["agent"] for s in states} == {started.ready["pid"]}
    assert all(process_gone(pid) for pid in (pids[0], pids[3]))


@pytest.fixture(scope="module")
async def reusing_replica(tmp_path_factory):
    spec = make_spec(tmp_path_factory.mktemp("reusing"), memory_mb=256, executions_per_process=1000)
    started = await start_replica(ProcessRuntime(), spec)
    yield started
    await started.close()


async def test_a_reused_process_keeps_each_executions_output_apart(reusing_replica: Replica):
    calls = [await reusing_replica.call("chatter", lines=i) for i in (3, 1, 2)]
    for lines, call in zip((3, 1, 2), calls, strict=True):
        assert call.outcome.output == "done"
        assert call.lines("stdout") == [
            *(f"out {i}" for i in range(lines)),
            "raw fd write",
            "from a subprocess",
            "no newline at the end",
        ]
        assert call.lines("stderr") == [
            *(f"err {i}" for i in range(lines)),
            "INFO basic: logged info",
        ]
    flood = await reusing_replica.call("flood", lines=20_000)
    after = await reusing_replica.call("chatter", lines=1)
    assert len(flood.lines("stdout")) == 20_000 and flood.outcome.output == 20_000
    assert after.lines("stdout")[0] == "out 0" and len(after.lines("stdout")) == 4


async def test_a_reused_process_is_replaced_after_a_kill_or_running_out_of_memory(
    reusing_replica: Replica,
):
    first = (await reusing_replica.call("pids")).outcome.output["child"]
    assert (await reusing_replica.call("pids")).outcome.output["child"] == first
    errors = await reusing_replica.call("fail", message="bad")
    assert errors.outcome.status == "failed"
    assert (await reusing_replica.call("pids")).outcome.output["child"] == first  # kept

    timed_out = await reusing_replica.call("sleep", timeout_s=1, seconds=60)
    assert timed_out.outcome.status == "timeout"
    slept_in = int(timed_out.lines("stdout")[0].split("pid=")[1])
    assert process_gone(slept_in)
    second = (await reusing_replica.call("pids")).outcome.output["child"]
    assert second != slept_in

    hog = await reusing_replica.call("allocate", megabytes=400)  # over its 192 MB bound
    assert hog.outcome.status == "oom" and hog.outcome.error["type"] == "OutOfMemory"
    third = (await reusing_replica.call("pids")).outcome.output["child"]
    assert third != second  # a process that ran out of memory runs nothing more
    assert (await reusing_replica.call("add", a=2, b=3)).outcome.output == {"sum": 5}


async def test_reused_processes_run_side_by_side(reusing_replica: Replica):
    calls = await asyncio.gather(*(reusing_replica.call("sleep", seconds=0.3) for _ in range(4)))
    assert [c.outcome.status for c in calls] == ["success"] * 4
    pids = {int(c.lines("stdout")[0].split("pid=")[1]) for c in calls}
    assert len(pids) == 4  # concurrency 4: four processes at once
    again = await asyncio.gather(*(reusing_replica.call("pids") for _ in range(4)))
    assert {c.outcome.output["child"] for c in again} <= pids  # and they wait to be reused
