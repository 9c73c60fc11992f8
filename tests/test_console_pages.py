"""The console's pages and assets as HTTP answers (the browser tests are in test_console.py)."""

from __future__ import annotations

import pytest

from service.console import PAGES


@pytest.mark.parametrize("path", [p for p, _, _ in PAGES])
async def test_every_page_is_html_with_a_strict_policy(client, path):
    response = await client.get(path.replace("{id}", "01m9000000000000000000000a"))
    assert response.status == 200
    assert response.content_type == "text/html"
    policy = response.headers["Content-Security-Policy"]
    assert "default-src 'self'" in policy and "script-src 'self'" in policy
    text = await response.text()
    assert '<script src="/console/static/console.js" defer></script>' in text
    assert "http://" not in text and "https://" not in text  # nothing from another host


async def test_page_parameters_are_escaped(client):
    response = await client.get("/executions/%3Cscript%3Ex%3C%2Fscript%3E")
    text = await response.text()
    assert "<script>x</script>" not in text
    assert "&lt;script&gt;" in text or "\\u003cscript" in text or "&#x27;" in text


async def test_assets_are_served_from_the_package(client):
    for name, kind in (("console.js", "javascript"), ("console.css", "text/css")):
        response = await client.get(f"/console/static/{name}")
        assert response.status == 200, name
        assert kind in response.content_type
        assert "://" not in (await response.text()).replace("http://www.w3.org/", "")


async def test_the_api_still_answers_json_404_for_unknown_paths(client):
    response = await client.get("/api/v1/nothing-here")
    assert response.status == 404
    assert (await response.json())["error"]["code"] == "not_found"
    response = await client.get("/no-such-page")
    assert response.status == 404
    assert (await response.json())["error"]["code"] == "not_found"


async def test_the_current_token_tells_its_role(api, client, pool, project):
    from tests.conftest import token_for

    secret = await token_for(pool, "viewer", project["id"])
    status, body = await api.as_token(secret).get("/api/v1/tokens/current")
    assert status == 200, body
    assert (body["role"], body["project"], body["name"]) == (
        "viewer",
        project["id"],
        "viewer token",
    )
    assert "token" not in body  # the secret is never shown again
    status, body = await api.as_token("fry_nope").get("/api/v1/tokens/current")
    assert status == 401
