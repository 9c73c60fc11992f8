"""The execution list at 100,000 rows: every filter keeps its order and its cursors across
pages (compared with the rows PostgreSQL orders itself), several statuses at once too."""

from __future__ import annotations

from urllib.parse import urlencode

_FILL = """
    INSERT INTO executions (id, project_id, service_id, function, status, input, max_attempts,
                            timeout_s, trigger_id, trigger_fire_time, created_at, updated_at)
    SELECT lpad(to_hex(i), 26, '0'), $1, $2, 'echo',
           CASE WHEN i % 100 < 80 THEN 'success' WHEN i % 100 < 95 THEN 'failed'
                WHEN i % 100 < 98 THEN 'terminated' WHEN i % 100 < 99 THEN 'created'
                ELSE 'in-progress' END,
           '{}'::jsonb, 3, 600,
           CASE WHEN i % 10 = 0 THEN 'trig-' || (i % 3) END,
           CASE WHEN i % 10 = 0 THEN now() - make_interval(secs => $3 - i) END,
           -- every 7th row shares its time with the next: the id breaks the tie
           now() - make_interval(secs => ($3 - i - i % 7 % 2) * 0.5),
           now()
    FROM generate_series(1, $3) AS i
"""


async def pages(api, params: dict, limit: int) -> tuple[list[str], int]:
    ids: list[str] = []
    cursor, requests = None, 0
    while True:
        query = {**params, "limit": limit, **({"cursor": cursor} if cursor else {})}
        status, body = await api.get(f"/api/v1/executions?{urlencode(query)}")
        assert status == 200, body
        requests += 1
        ids.extend(item["id"] for item in body["items"])
        cursor = body["next_cursor"]
        if cursor is None:
            return ids, requests


async def test_filters_keep_order_and_cursors_across_pages(api, pool, project, service):
    await pool.execute(_FILL, project["id"], service["id"], 100_000)
    await pool.execute("ANALYZE executions")
    cases = [
        ({"status": "created,in-progress"}, "status IN ('created', 'in-progress')"),
        ({"status": "in-progress,created,created"}, "status IN ('created', 'in-progress')"),
        ({"status": "terminated", "project": project["id"]}, "status = 'terminated'"),
        (
            {"status": "failed,terminated", "service": service["id"], "trigger": "trig-1"},
            "status IN ('failed', 'terminated') AND trigger_id = 'trig-1'",
        ),
        ({"trigger": "trig-2", "function": "echo"}, "trigger_id = 'trig-2'"),
    ]
    for params, where in cases:
        for order, direction in (("-created_at", "DESC"), ("created_at", "ASC")):
            expected = [
                r["id"]
                for r in await pool.fetch(
                    f"""SELECT id FROM executions WHERE {where}
                        ORDER BY created_at {direction}, id {direction}"""
                )
            ]
            got, requests = await pages(api, {**params, "order": order}, 1000)
            assert got == expected, (params, order)
            assert requests == max(1, -(-len(expected) // 1000))  # no empty last page
    # The whole table, newest first, a few pages deep.
    expected = [
        r["id"] for r in await pool.fetch(
            "SELECT id FROM executions ORDER BY created_at DESC, id DESC LIMIT 3000"
        )
    ]  # fmt: skip
    ids: list[str] = []
    cursor = None
    for _ in range(3):
        query = {"limit": 1000, **({"cursor": cursor} if cursor else {})}
        status, body = await api.get(f"/api/v1/executions?{urlencode(query)}")
        ids.extend(item["id"] for item in body["items"])
        cursor = body["next_cursor"]
    assert ids == expected
