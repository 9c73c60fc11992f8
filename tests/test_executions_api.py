"""Executions through the API: validation, enqueue, idempotency, batches, lists, actions."""

from __future__ import annotations

import asyncio

from arq.constants import job_key_prefix

from core import queue, states
from tests.conftest import token_for


def run(svc, **extra):
    """An execution request for the echo service; `extra` overrides any field."""
    return {"service": svc["id"], "function": "echo", "input": {"text": "hi"}, **extra}


async def test_create_commits_then_enqueues(api, service, redis):
    status, body = await api.post("/api/v1/executions", run(service))
    assert status == 201, body
    assert body["status"] == "created" and body["attempt"] == 0
    assert body["input"] == {"text": "hi", "times": 1}  # defaults filled in
    assert body["max_attempts"] == 3 and body["timeout_s"] == 3600
    assert [e["status"] for e in body["status_log"]] == ["created"]
    assert await redis.exists(job_key_prefix + body["id"])
    assert await queue.queue_length(redis, service["id"]) == 1


async def test_input_is_validated_against_the_function(api, service):
    cases = [
        ({"input": {"text": 5}}, "input.text"),
        ({"input": {}}, "input.text"),
        ({"input": {"text": "a", "times": "3"}}, "input.times"),
        ({"input": {"text": "a", "colour": 1}}, "input.colour"),
        ({"function": "missing"}, "function"),
        ({"service": "nope"}, "service"),
        ({"timeout_s": 0}, "timeout_s"),
    ]
    for extra, field in cases:
        status, body = await api.post("/api/v1/executions", run(service, **extra))
        assert status == 422, (extra, body)
        assert body["error"]["details"][0]["field"] == field, (extra, body)


async def test_idempotency_key_returns_the_first(api, service, redis):
    first_status, first = await api.post("/api/v1/executions", run(service, idempotency_key="k1"))
    again_status, again = await api.post("/api/v1/executions", run(service, idempotency_key="k1"))
    assert (first_status, again_status) == (201, 200)
    assert again["id"] == first["id"]
    assert await queue.queue_length(redis, service["id"]) == 1


async def test_concurrent_idempotent_creates_make_one(api, service):
    results = await asyncio.gather(
        *[api.post("/api/v1/executions", run(service, idempotency_key="same")) for _ in range(10)]
    )
    assert len({body["id"] for _, body in results}) == 1
    assert sorted(status for status, _ in results).count(201) == 1


async def test_batch_is_one_transaction(api, service, redis, pool):
    bodies = [run(service, input={"text": str(i)}) for i in range(1000)]
    status, body = await api.post("/api/v1/executions/batch", {"executions": bodies})
    assert status == 201
    assert len(body["items"]) == 1000
    assert [e["input"]["text"] for e in body["items"]] == [str(i) for i in range(1000)]
    assert await queue.queue_length(redis, service["id"]) == 1000
    bad = [run(service), run(service, input={"text": 1}), run(service, function="nope")]
    status, body = await api.post("/api/v1/executions/batch", {"executions": bad})
    assert status == 422
    fields = [d["field"] for d in body["error"]["details"]]
    assert fields == ["executions[1].input.text", "executions[2].function"]
    assert await pool.fetchval("SELECT count(*) FROM executions") == 1000  # none of the bad batch
    status, body = await api.post("/api/v1/executions/batch", {"executions": [run(service)] * 1001})
    assert status == 422 and body["error"]["details"][0]["field"] == "executions"


async def test_get_list_filters_and_counters(api, service, pool):
    ids = [(await api.post("/api/v1/executions", run(service)))[1]["id"] for _ in range(3)]
    noop = (await api.post("/api/v1/executions", run(service, function="noop", input={})))[1]
    status, one = await api.get(f"/api/v1/executions/{ids[0]}")
    assert status == 200 and one["id"] == ids[0]
    status, listed = await api.get(f"/api/v1/executions?service={service['id']}&function=noop")
    assert [e["id"] for e in listed["items"]] == [noop["id"]]
    status, listed = await api.get("/api/v1/executions?order=created_at")
    assert [e["id"] for e in listed["items"]] == [*ids, noop["id"]]
    await api.post(f"/api/v1/executions/{ids[0]}/terminate")
    status, listed = await api.get("/api/v1/executions?status=terminated")
    assert [e["id"] for e in listed["items"]] == [ids[0]]
    status, body = await api.get("/api/v1/executions?status=bogus")
    assert status == 422 and body["error"]["details"][0]["field"] == "status"
    status, body = await api.get("/api/v1/executions?created_after=yesterday")
    assert status == 422 and body["error"]["details"][0]["field"] == "created_after"
    status, counts = await api.get(f"/api/v1/executions/counters?service={service['id']}")
    assert counts["created"] == 3 and counts["terminated"] == 1 and counts["total"] == 4
    assert counts["in-progress"] == 0


async def test_pagination_neither_skips_nor_repeats_under_concurrent_inserts(api, service):
    status, body = await api.post(
        "/api/v1/executions/batch", {"executions": [run(service) for _ in range(120)]}
    )
    existing = {e["id"] for e in body["items"]}
    seen: list[str] = []
    cursor = None
    inserting = True

    async def insert_meanwhile():
        while inserting:
            await api.post("/api/v1/executions", run(service))
            await asyncio.sleep(0)

    for order in ("-created_at", "created_at"):
        seen.clear()
        inserting = True
        inserter = asyncio.create_task(insert_meanwhile())
        cursor = None
        while True:
            path = f"/api/v1/executions?limit=7&order={order}" + (
                f"&cursor={cursor}" if cursor else ""
            )
            status, page = await api.get(path)
            assert status == 200
            seen.extend(e["id"] for e in page["items"])
            cursor = page["next_cursor"]
            if not cursor or (order == "created_at" and existing <= set(seen) and len(seen) > 400):
                break
        inserting = False
        await inserter
        assert len(seen) == len(set(seen)), "a row was repeated"
        assert existing <= set(seen), "a row was skipped"
    status, body = await api.get("/api/v1/executions?cursor=garbage")
    assert status == 422 and body["error"]["details"][0]["field"] == "cursor"


async def test_terminate_rerun_and_progress(api, service, pool):
    _, created = await api.post("/api/v1/executions", run(service))
    status, body = await api.post(
        f"/api/v1/executions/{created['id']}/progress", {"percent": 40, "message": "x"}
    )
    assert status == 200 and body["progress"] == {"percent": 40, "message": "x"}
    status, body = await api.post(f"/api/v1/executions/{created['id']}/progress", {"percent": 140})
    assert status == 422 and body["error"]["details"][0]["field"] == "percent"
    status, body = await api.post(f"/api/v1/executions/{created['id']}/terminate")
    assert status == 202 and body["status"] == "terminated"
    status, body = await api.post(f"/api/v1/executions/{created['id']}/terminate")
    assert status == 409
    status, body = await api.post(f"/api/v1/executions/{created['id']}/progress", {"percent": 50})
    assert status == 409
    status, rerun = await api.post(f"/api/v1/executions/{created['id']}/rerun")
    assert status == 201 and rerun["rerun_of"] == created["id"] and rerun["status"] == "created"
    assert rerun["input"] == created["input"]


async def test_status_never_moves_backwards(api, service, pool):
    _, created = await api.post("/api/v1/executions", run(service))
    async with pool.acquire() as conn:
        claimed = await states.claim(conn, created["id"], worker_id="w", replica_id="r", lease_s=30)
        assert claimed["status"] == "in-progress" and claimed["attempt"] == 1
        assert (
            await states.claim(conn, created["id"], worker_id="w2", replica_id="r", lease_s=30)
            is None
        )
        done = await states.finish(
            conn, created["id"], 1, states.ExecutionStatus.success, output={"text": "hi"}
        )
        assert done["status"] == "success"
        # A late, stale finish and a late terminate change nothing.
        assert await states.finish(conn, created["id"], 1, states.ExecutionStatus.failed) is None
    assert await states.terminate_created(pool, created["id"]) is None
    status, body = await api.get(f"/api/v1/executions/{created['id']}")
    assert body["status"] == "success" and body["output"] == {"text": "hi"}
    assert [e["status"] for e in body["status_log"]] == ["created", "in-progress", "success"]
    attempts = await pool.fetch(
        "SELECT * FROM execution_attempts WHERE execution_id = $1", created["id"]
    )
    assert [(a["attempt"], a["status"]) for a in attempts] == [(1, "success")]


async def test_wait_returns_at_finish_or_timeout(api, service, pool):
    _, created = await api.post("/api/v1/executions", run(service))
    status, body = await api.get(f"/api/v1/executions/{created['id']}/wait?timeout=0.2")
    assert status == 200 and body["status"] == "created"

    async def finish_soon():
        await asyncio.sleep(0.3)
        async with pool.acquire() as conn:
            await states.claim(conn, created["id"], worker_id="w", replica_id="r", lease_s=30)
            await states.finish(
                conn, created["id"], 1, states.ExecutionStatus.success, output={"text": "x"}
            )

    task = asyncio.create_task(finish_soon())
    loop = asyncio.get_running_loop()
    started = loop.time()
    status, body = await api.get(f"/api/v1/executions/{created['id']}/wait?timeout=10")
    await task
    assert body["status"] == "success"
    assert loop.time() - started < 5


async def test_isolation_and_roles(api, pool, project, service):
    _, created = await api.post("/api/v1/executions", run(service))
    viewer = api.as_token(await token_for(pool, "viewer", project["id"]))
    assert (await viewer.get(f"/api/v1/executions/{created['id']}"))[0] == 200
    assert (await viewer.post("/api/v1/executions", run(service)))[0] == 403
    assert (await viewer.post(f"/api/v1/executions/{created['id']}/terminate"))[0] == 403
    _, other = await api.post("/api/v1/projects", {"name": "beta"})
    stranger = api.as_token(await token_for(pool, "developer", other["id"]))
    assert (await stranger.get(f"/api/v1/executions/{created['id']}"))[0] == 404
    assert (await stranger.get(f"/api/v1/executions/{created['id']}/logs"))[0] == 404
    assert (await stranger.post(f"/api/v1/executions/{created['id']}/terminate"))[0] == 404
    status, body = await stranger.post("/api/v1/executions", run(service))
    assert status == 422 and body["error"]["details"][0]["field"] == "service"
    status, listed = await stranger.get("/api/v1/executions")
    assert listed["items"] == []
    assert (await stranger.get(f"/api/v1/executions?project={project['id']}"))[0] == 404


async def test_logs_page_by_seq(api, service, pool):
    _, created = await api.post("/api/v1/executions", run(service))
    await pool.executemany(
        "INSERT INTO execution_logs (execution_id, seq, at, stream, text) VALUES ($1, $2, now(), 'stdout', $3)",
        [(created["id"], i, f"line {i}") for i in range(1, 6)],
    )
    status, page = await api.get(f"/api/v1/executions/{created['id']}/logs?limit=3")
    assert [line["text"] for line in page["items"]] == ["line 1", "line 2", "line 3"]
    status, page = await api.get(
        f"/api/v1/executions/{created['id']}/logs?cursor={page['next_cursor']}"
    )
    assert [line["seq"] for line in page["items"]] == [4, 5]
