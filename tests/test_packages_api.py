"""Package uploads, revisions, downloads and deletes through the API."""

from __future__ import annotations

import hashlib
import io
import tarfile

import yaml

from service.keys import SETTINGS
from tests.conftest import ECHO_MANIFEST, echo_archive, make_zip, token_for


async def test_upload_returns_the_api_shape(api, project):
    archive = echo_archive()
    status, body = await api.upload(project["id"], archive)
    assert status == 201, body
    assert body["name"] == "echo" and body["revision"] == 1 and body["project"] == project["id"]
    assert body["codebase"] == {"sha256": hashlib.sha256(archive).hexdigest(), "size": len(archive)}
    function = body["modules"][0]["functions"][0]
    assert function["name"] == "echo"
    assert (
        function["inputs"][1]
        == {"name": "times", "type": "integer", "default": 1, "required": False, "description": ""}
        or function["inputs"][1]["default"] == 1
    )


async def test_same_name_is_409_and_revisions_grow(api, project, package):
    status, body = await api.upload(project["id"], echo_archive())
    assert status == 409 and "revisions" in body["error"]["message"]
    status, second = await api.upload(
        None,
        echo_archive(code="def echo(text, times=1):\n    return text\ndef noop():\n    pass\n"),
        path=f"/api/v1/packages/{package['id']}/revisions",
    )
    assert status == 201, second
    assert second["revision"] == 2 and second["id"] == package["id"]
    status, latest = await api.get(f"/api/v1/packages/{package['id']}")
    assert latest["revision"] == 2
    status, first = await api.get(f"/api/v1/packages/{package['id']}?revision=1")
    assert first["revision"] == 1 and first["codebase"] == package["codebase"]
    status, revisions = await api.get(f"/api/v1/packages/{package['id']}/revisions")
    assert [r["revision"] for r in revisions["items"]] == [1, 2]
    assert (await api.get(f"/api/v1/packages/{package['id']}?revision=9"))[0] == 404


async def test_revision_must_keep_the_name(api, package):
    manifest = {**ECHO_MANIFEST, "name": "renamed"}
    status, body = await api.upload(
        None, echo_archive(manifest), path=f"/api/v1/packages/{package['id']}/revisions"
    )
    assert status == 422 and body["error"]["details"][0]["field"] == "manifest.name"


async def test_codebase_download_round_trips(api, project, package, client):
    response = await client.get(
        f"/api/v1/packages/{package['id']}/codebase", headers=api._headers()
    )
    assert response.status == 200
    data = await response.read()
    assert hashlib.sha256(data).hexdigest() == package["codebase"]["sha256"]


async def test_tar_gz_and_manifest_field(api, project):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        code = b"def echo(text, times=1):\n    return text\ndef noop():\n    pass\n"
        info = tarfile.TarInfo("main.py")
        info.size = len(code)
        archive.addfile(info, io.BytesIO(code))
    status, body = await api.upload(
        project["id"], buffer.getvalue(), filename="code.tar.gz", manifest=ECHO_MANIFEST
    )
    assert status == 201, body


async def test_bad_uploads_name_the_field(api, project):
    status, body = await api.upload(project["id"], b"this is not an archive")
    assert status == 422 and body["error"]["details"][0]["field"].startswith("codebase")
    status, body = await api.upload(project["id"], make_zip({"main.py": "x = 1"}))
    assert status == 422 and body["error"]["details"][0]["field"] == "manifest"
    broken = {
        **ECHO_MANIFEST,
        "modules": [{**ECHO_MANIFEST["modules"][0], "entry_point": "nope.py"}],
    }
    status, body = await api.upload(project["id"], echo_archive(broken))
    assert status == 422
    assert body["error"]["details"][0]["field"] == "manifest.modules[0].entry_point"
    bad_type = yaml.safe_dump(
        {
            **ECHO_MANIFEST,
            "modules": [
                {
                    **ECHO_MANIFEST["modules"][0],
                    "functions": [{"name": "f", "inputs": [{"name": "x", "type": "int"}]}],
                }
            ],
        }
    )
    status, body = await api.upload(
        project["id"], make_zip({"ferry.yaml": bad_type, "main.py": ""})
    )
    assert status == 422
    assert body["error"]["details"][0]["field"] == "manifest.modules[0].functions[0].inputs[0].type"
    zip_slip = make_zip(
        {"ferry.yaml": yaml.safe_dump(ECHO_MANIFEST), "main.py": "", "../evil.py": ""}
    )
    status, body = await api.upload(project["id"], zip_slip)
    assert status == 422 and "codebase" in body["error"]["details"][0]["field"]


async def test_oversize_upload_is_413(api, project, client):
    limit = client.server.app[SETTINGS].max_upload_mb
    big = b"\0" * (limit * 1024 * 1024 + 1)
    status, body = await api.upload(project["id"], big)
    assert status == 413 and body["error"]["code"] == "too_large"


async def test_missing_codebase_and_project(api, project):
    status, body = await api.call("POST", "/api/v1/packages", data={"project": project["id"]})
    assert status == 415  # a form, but not multipart
    status, body = await api.upload(None, echo_archive())
    assert status == 422 and body["error"]["details"][0]["field"] == "project"


async def test_list_filters_and_isolation(api, pool, project, package):
    status, listed = await api.get(f"/api/v1/packages?project={project['id']}&name=echo")
    assert [p["id"] for p in listed["items"]] == [package["id"]]
    status, listed = await api.get("/api/v1/packages?name=other")
    assert listed["items"] == []
    status, other = await api.post("/api/v1/projects", {"name": "beta"})
    outsider = api.as_token(await token_for(pool, "owner", other["id"]))
    assert (await outsider.get(f"/api/v1/packages/{package['id']}"))[0] == 404
    assert (await outsider.get(f"/api/v1/packages/{package['id']}/codebase"))[0] == 404
    assert (await outsider.delete(f"/api/v1/packages/{package['id']}"))[0] == 404
    assert (await outsider.get(f"/api/v1/packages?project={project['id']}"))[0] == 404
    status, body = await outsider.upload(project["id"], echo_archive())
    assert status == 404
    viewer = api.as_token(await token_for(pool, "viewer", project["id"]))
    status, body = await viewer.upload(project["id"], echo_archive())
    assert status == 403


async def test_delete_in_use_is_409_unless_forced(api, package, service):
    status, body = await api.delete(f"/api/v1/packages/{package['id']}")
    assert status == 409 and "force" in body["error"]["message"]
    assert (await api.delete(f"/api/v1/packages/{package['id']}?force=true"))[0] == 204
    assert (await api.get(f"/api/v1/services/{service['id']}"))[0] == 404
