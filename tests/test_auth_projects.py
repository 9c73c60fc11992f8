"""Projects, tokens, and the 401/403/404 rules of API.md."""

from __future__ import annotations

from service.keys import PRINCIPAL_CACHE
from tests.conftest import token_for


async def test_health_needs_no_token(client):
    assert (await client.get("/healthz")).status == 200
    response = await client.get("/readyz")
    assert response.status == 200
    assert (await response.json())["checks"] == {"postgres": "ok", "redis": "ok"}


async def test_missing_and_bad_tokens_are_401(api):
    status, body = await api.as_token(None).get("/api/v1/projects")
    assert status == 401
    assert body["error"]["code"] == "unauthorized"
    status, _ = await api.as_token("fry_not-a-real-token").get("/api/v1/projects")
    assert status == 401


async def test_project_crud(api):
    status, created = await api.post("/api/v1/projects", {"name": "vision", "description": "cv"})
    assert status == 201
    assert created["name"] == "vision" and created["created_at"].endswith("Z")
    status, again = await api.post("/api/v1/projects", {"name": "vision"})
    assert status == 409
    status, fetched = await api.get(f"/api/v1/projects/{created['id']}")
    assert status == 200 and fetched == created
    status, patched = await api.patch(f"/api/v1/projects/{created['id']}", {"description": "new"})
    assert status == 200 and patched["description"] == "new"
    status, listed = await api.get("/api/v1/projects")
    assert [p["id"] for p in listed["items"]] == [created["id"]]
    assert (await api.delete(f"/api/v1/projects/{created['id']}"))[0] == 204
    assert (await api.get(f"/api/v1/projects/{created['id']}"))[0] == 404


async def test_project_validation_names_the_field(api):
    status, body = await api.post("/api/v1/projects", {"name": "Bad Name!"})
    assert status == 422
    assert body["error"]["details"][0]["field"] == "name"
    status, body = await api.post("/api/v1/projects", {"name": "ok", "colour": "red"})
    assert status == 422
    assert body["error"]["details"][0]["field"] == "colour"


async def test_malformed_json_is_400(api):
    status, body = await api.call(
        "POST", "/api/v1/projects", data=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert status == 400
    assert body["error"]["code"] == "bad_request"


async def test_unknown_route_and_method_use_the_error_shape(api):
    status, body = await api.get("/api/v1/nothing-here")
    assert status == 404 and body["error"]["code"] == "not_found"
    status, body = await api.call("PUT", "/api/v1/projects")
    assert status == 405 and "not allowed" in body["error"]["message"]


async def test_roles(api, pool, project):
    viewer = api.as_token(await token_for(pool, "viewer", project["id"]))
    developer = api.as_token(await token_for(pool, "developer", project["id"]))
    owner = api.as_token(await token_for(pool, "owner", project["id"]))
    # Only admins create projects.
    assert (await owner.post("/api/v1/projects", {"name": "other"}))[0] == 403
    # A viewer reads its project but may not change it.
    assert (await viewer.get(f"/api/v1/projects/{project['id']}"))[0] == 200
    assert (await viewer.patch(f"/api/v1/projects/{project['id']}", {"description": "x"}))[0] == 403
    assert (await developer.patch(f"/api/v1/projects/{project['id']}", {"description": "x"}))[
        0
    ] == 403
    assert (await owner.patch(f"/api/v1/projects/{project['id']}", {"description": "x"}))[0] == 200
    # Owners manage tokens of their project; developers do not.
    status, body = await owner.post(
        "/api/v1/tokens", {"name": "ci", "role": "developer", "project": project["id"]}
    )
    assert status == 201 and body["token"].startswith("fry_")
    assert (
        await developer.post(
            "/api/v1/tokens", {"name": "ci", "role": "viewer", "project": project["id"]}
        )
    )[0] == 403
    assert (await owner.post("/api/v1/tokens", {"name": "root", "role": "admin"}))[0] == 403
    assert (await viewer.get("/api/v1/tokens"))[0] == 403


async def test_cross_project_isolation(api, pool, project):
    status, other = await api.post("/api/v1/projects", {"name": "beta"})
    assert status == 201
    owner_of_other = api.as_token(await token_for(pool, "owner", other["id"]))
    assert (await owner_of_other.get(f"/api/v1/projects/{project['id']}"))[0] == 404
    assert (await owner_of_other.patch(f"/api/v1/projects/{project['id']}", {"description": "x"}))[
        0
    ] == 404
    status, listed = await owner_of_other.get("/api/v1/projects")
    assert [p["id"] for p in listed["items"]] == [other["id"]]
    assert (
        await owner_of_other.post(
            "/api/v1/tokens", {"name": "x", "role": "viewer", "project": project["id"]}
        )
    )[0] == 404


async def test_token_secret_shown_once_and_revocable(api, project, client):
    status, created = await api.post(
        "/api/v1/tokens", {"name": "bot", "role": "developer", "project": project["id"]}
    )
    assert status == 201
    status, listed = await api.get("/api/v1/tokens")
    assert all("token" not in t for t in listed["items"])
    assert created["id"] in [t["id"] for t in listed["items"]]
    bot = api.as_token(created["token"])
    assert (await bot.get(f"/api/v1/projects/{project['id']}"))[0] == 200
    assert (await api.delete(f"/api/v1/tokens/{created['id']}"))[0] == 204
    client.server.app[PRINCIPAL_CACHE].clear()  # the 2 s token cache, not waited out
    assert (await bot.get(f"/api/v1/projects/{project['id']}"))[0] == 401


async def test_expired_token_is_401(api, project):
    status, created = await api.post(
        "/api/v1/tokens",
        {
            "name": "old",
            "role": "viewer",
            "project": project["id"],
            "expires_at": "2001-01-01T00:00:00Z",
        },
    )
    assert status == 201
    assert (await api.as_token(created["token"]).get("/api/v1/projects"))[0] == 401


async def test_token_validation(api, project):
    status, body = await api.post("/api/v1/tokens", {"name": "x", "role": "developer"})
    assert status == 422 and body["error"]["details"][0]["field"] == "project"
    status, body = await api.post(
        "/api/v1/tokens", {"name": "x", "role": "wizard", "project": project["id"]}
    )
    assert status == 422 and body["error"]["details"][0]["field"] == "role"
