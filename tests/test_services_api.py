"""Services through the API: create, validate, patch (generations), pause, status."""

from __future__ import annotations

from tests.conftest import token_for


async def test_create_has_defaults_and_hides_secrets(api, project, package, service, pool):
    assert service["package_revision"] == 1 and service["module"] == "main"
    assert service["runtime"]["concurrency"] == 4 and service["runtime"]["min_replicas"] == 0
    assert service["secrets"] == ["API_KEY"]
    assert service["status"] == "active" and service["generation"] == 1
    stored = await pool.fetchval(
        "SELECT secrets->>'API_KEY' FROM services WHERE id = $1", service["id"]
    )
    assert stored and "s3cr3t-value" not in stored  # encrypted at rest
    status, fetched = await api.get(f"/api/v1/services/{service['id']}")
    assert "s3cr3t-value" not in str(fetched)


async def test_create_validation(api, project, package):
    base = {"project": project["id"], "name": "svc", "package": package["id"]}
    cases = [
        ({"module": "missing"}, "module"),
        ({"package_revision": 5}, "package_revision"),
        ({"runtime": {"min_replicas": 3, "max_replicas": 1}}, "runtime"),
        ({"runtime": {"memory_mb": 1}}, "runtime.memory_mb"),
        ({"env": {"1BAD": "x"}}, "env"),
        ({"on_reset": "explode"}, "on_reset"),
        ({"name": "Bad Name"}, "name"),
        ({"package": "nope"}, "package"),
    ]
    for extra, field in cases:
        status, body = await api.post("/api/v1/services", {**base, **extra})
        assert status == 422, (extra, body)
        assert body["error"]["details"][0]["field"].startswith(field), (extra, body)
    assert (await api.post("/api/v1/services", base))[0] == 201
    assert (await api.post("/api/v1/services", base))[0] == 409


async def test_patch_bumps_generation_only_for_rolling_changes(api, service, package):
    sid = service["id"]
    status, body = await api.patch(f"/api/v1/services/{sid}", {"max_attempts": 5})
    assert status == 200 and body["generation"] == 1 and body["max_attempts"] == 5
    status, body = await api.patch(f"/api/v1/services/{sid}", {"runtime": {"concurrency": 8}})
    assert status == 200 and body["generation"] == 2
    assert body["runtime"]["concurrency"] == 8 and body["runtime"]["memory_mb"] == 512
    status, body = await api.patch(
        f"/api/v1/services/{sid}", {"secrets": {"API_KEY": None, "B": "x-value"}}
    )
    assert body["secrets"] == ["B"] and body["generation"] == 3
    # Scaling, and values a replica already runs with, leave the replicas alone.
    for patch in (
        {"runtime": {"max_replicas": 5, "min_replicas": 1, "idle_timeout_s": 60}},
        {"runtime": {"target_queue_per_replica": 3, "concurrency": 8}},
        {"secrets": {"B": "x-value"}, "execution_timeout_s": 60, "on_reset": "failed"},
    ):
        status, body = await api.patch(f"/api/v1/services/{sid}", patch)
        assert status == 200 and body["generation"] == 3, (patch, body)
    assert body["runtime"]["max_replicas"] == 5 and body["on_reset"] == "failed"
    status, body = await api.patch(f"/api/v1/services/{sid}", {"runtime": {"min_replicas": 9}})
    assert status == 422 and body["error"]["details"][0]["field"].startswith("runtime")
    status, body = await api.patch(f"/api/v1/services/{sid}", {"package_revision": 7})
    assert status == 422 and body["error"]["details"][0]["field"] == "package_revision"


async def test_pause_resume_and_status(api, service):
    sid = service["id"]
    status, body = await api.post(f"/api/v1/services/{sid}/pause")
    assert status == 200 and body["status"] == "paused"
    status, listed = await api.get("/api/v1/services?status=paused")
    assert [s["id"] for s in listed["items"]] == [sid]
    status, body = await api.post(f"/api/v1/services/{sid}/resume")
    assert body["status"] == "active"
    status, body = await api.get(f"/api/v1/services/{sid}/status")
    assert status == 200
    assert body == {
        "queue_length": 0,
        "in_progress": 0,
        "desired_replicas": 0,
        "replicas": [],
        "last_failure": None,
    }


async def test_roles_and_isolation(api, pool, project, service):
    viewer = api.as_token(await token_for(pool, "viewer", project["id"]))
    developer = api.as_token(await token_for(pool, "developer", project["id"]))
    assert (await viewer.get(f"/api/v1/services/{service['id']}"))[0] == 200
    assert (await viewer.post(f"/api/v1/services/{service['id']}/pause"))[0] == 403
    assert (await developer.post(f"/api/v1/services/{service['id']}/pause"))[0] == 200
    assert (await developer.delete(f"/api/v1/services/{service['id']}"))[0] == 403
    status, other = await api.post("/api/v1/projects", {"name": "beta"})
    outsider = api.as_token(await token_for(pool, "admin", None))
    assert (await outsider.get(f"/api/v1/services/{service['id']}"))[0] == 200
    stranger = api.as_token(await token_for(pool, "owner", other["id"]))
    for method, path in [
        ("GET", f"/api/v1/services/{service['id']}"),
        ("GET", f"/api/v1/services/{service['id']}/status"),
        ("PATCH", f"/api/v1/services/{service['id']}"),
        ("DELETE", f"/api/v1/services/{service['id']}"),
    ]:
        status, _ = await stranger.call(method, path, {} if method == "PATCH" else None)
        assert status == 404, (method, path)
    assert (await api.delete(f"/api/v1/services/{service['id']}"))[0] == 204
