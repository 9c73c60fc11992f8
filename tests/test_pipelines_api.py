"""Pipeline definitions through the API: create, versions, install, validation, access."""

from __future__ import annotations

import pytest

from core.ids import new_id
from tests.conftest import echo_archive, token_for

IMAGES_MANIFEST = {
    "name": "images",
    "modules": [
        {
            "name": "main",
            "entry_point": "main.py",
            "functions": [
                {
                    "name": "list_images",
                    "inputs": [{"name": "prefix", "type": "string"}],
                    "outputs": [{"name": "images", "type": "list[string]"}],
                },
                {
                    "name": "resize",
                    "inputs": [
                        {"name": "image", "type": "string"},
                        {"name": "size", "type": "integer", "default": 128},
                    ],
                    "outputs": [{"name": "image", "type": "string"}],
                },
                {
                    "name": "label",
                    "inputs": [
                        {"name": "image", "type": "string"},
                        {"name": "text", "type": "string"},
                    ],
                    "outputs": [{"name": "labelled", "type": "string"}],
                },
                {
                    "name": "count",
                    "inputs": [{"name": "items", "type": "list[string]"}],
                    "outputs": [{"name": "count", "type": "integer"}],
                },
                {
                    "name": "inspect",
                    "inputs": [{"name": "anything", "type": "json"}],
                    "outputs": [{"name": "size", "type": "integer"}],
                },
            ],
        }
    ],
}

IMAGES_CODE = """
def list_images(prefix):
    return [prefix + "a.png", prefix + "b.png"]

def resize(image, size=128):
    return image

def label(image, text):
    return image + text

def count(items):
    return len(items)

def inspect(anything):
    return 1
"""


async def deploy_images(api, project_id: str, name: str = "images") -> dict:
    """A service whose functions declare typed inputs and outputs (no replica is started)."""
    status, package = await api.upload(project_id, echo_archive(IMAGES_MANIFEST, IMAGES_CODE))
    assert status == 201, package
    status, service = await api.post(
        "/api/v1/services", {"project": project_id, "name": name, "package": package["id"]}
    )
    assert status == 201, service
    return service


@pytest.fixture
async def images(api, project) -> dict:
    return await deploy_images(api, project["id"])


def fn(node_id: str, function: str, service: str = "images", **input_) -> dict:
    return {
        "id": node_id,
        "type": "function",
        "service": service,
        "function": function,
        "input": input_,
    }


def link(source: str, source_port: str, target: str, target_port: str, **extra) -> dict:
    return {
        "source": {"node": source, "port": source_port},
        "target": {"node": target, "port": target_port},
        **extra,
    }


def fanout_body(project: dict, **overrides) -> dict:
    body = {
        "project": project["id"],
        "name": "thumbnails",
        "description": "resize every image",
        "variables": [{"name": "size", "type": "integer", "default": 64}],
        "nodes": [
            fn("list", "list_images"),
            fn("resize", "resize", size={"variable": "size"}),
        ],
        "connections": [link("list", "images", "resize", "image")],
    }
    body.update(overrides)
    return body


async def stored_counts(pool) -> tuple[int, int, int]:
    return (
        await pool.fetchval("SELECT count(*) FROM pipelines"),
        await pool.fetchval("SELECT count(*) FROM pipeline_versions"),
        await pool.fetchval("SELECT count(*) FROM pipeline_services"),
    )


async def test_create_get_list_patch_versions_delete(api, pool, project, images):
    status, pipeline = await api.post("/api/v1/pipelines", fanout_body(project))
    assert status == 201, pipeline
    assert pipeline["version"] == 1 and pipeline["installed"] is False
    assert pipeline["description"] == "resize every image"
    # The service was named; the stored graph holds its id.
    assert [n["service"] for n in pipeline["nodes"]] == [images["id"], images["id"]]
    assert pipeline["connections"][0]["fanout"] is True
    assert pipeline["settings"] == {"fanout_cap": 10_000}
    pid = pipeline["id"]
    assert await stored_counts(pool) == (1, 1, 1)

    status, got = await api.get(f"/api/v1/pipelines/{pid}")
    assert status == 200 and got == pipeline
    assert (await api.post("/api/v1/pipelines", fanout_body(project)))[0] == 409

    status, second = await api.post("/api/v1/pipelines", fanout_body(project, name="second"))
    assert status == 201, second
    status, page = await api.get(f"/api/v1/pipelines?project={project['id']}&limit=1")
    assert status == 200 and [p["id"] for p in page["items"]] == [second["id"]]
    status, rest = await api.get(f"/api/v1/pipelines?limit=1&cursor={page['next_cursor']}")
    assert [p["id"] for p in rest["items"]] == [pid] and rest["next_cursor"] is None

    # Name and description change in place.
    status, renamed = await api.patch(
        f"/api/v1/pipelines/{pid}", {"name": "thumbs", "description": "smaller"}
    )
    assert status == 200, renamed
    assert renamed["name"] == "thumbs" and renamed["version"] == 1
    assert (
        await pool.fetchval("SELECT count(*) FROM pipeline_versions WHERE pipeline_id = $1", pid)
        == 1
    )
    assert (await api.patch(f"/api/v1/pipelines/{pid}", {"name": "second"}))[0] == 409

    # A graph change stores version 2; version 1 stays readable.
    nodes = [*pipeline["nodes"], fn("label", "label", text="thumb")]
    connections = [*pipeline["connections"], link("resize", "image", "label", "image")]
    status, changed = await api.patch(
        f"/api/v1/pipelines/{pid}", {"nodes": nodes, "connections": connections}
    )
    assert status == 200, changed
    assert changed["version"] == 2 and len(changed["nodes"]) == 3
    assert changed["connections"][1]["fanout"] is False
    assert changed["variables"] == pipeline["variables"]  # fields left out are kept
    status, old = await api.get(f"/api/v1/pipelines/{pid}/versions/1")
    assert status == 200 and old["version"] == 1 and len(old["nodes"]) == 2
    assert old["name"] == "thumbs"
    status, current = await api.get(f"/api/v1/pipelines/{pid}/versions/2")
    assert current["nodes"] == changed["nodes"]
    assert (await api.get(f"/api/v1/pipelines/{pid}/versions/3"))[0] == 404
    status, body = await api.get(f"/api/v1/pipelines/{pid}/versions/latest")
    assert status == 422 and body["error"]["details"][0]["field"] == "version"

    # The same graph again is no change: no new version.
    status, same = await api.patch(f"/api/v1/pipelines/{pid}", {"nodes": changed["nodes"]})
    assert status == 200 and same["version"] == 2

    assert (await api.delete(f"/api/v1/pipelines/{pid}"))[0] == 204
    assert (await api.get(f"/api/v1/pipelines/{pid}"))[0] == 404
    assert (
        await pool.fetchval("SELECT count(*) FROM pipeline_versions WHERE pipeline_id = $1", pid)
        == 0
    )
    assert (
        await pool.fetchval("SELECT count(*) FROM pipeline_services WHERE pipeline_id = $1", pid)
        == 0
    )


async def test_patch_with_a_bad_graph_stores_nothing(api, pool, project, images):
    status, pipeline = await api.post("/api/v1/pipelines", fanout_body(project))
    pid = pipeline["id"]
    status, body = await api.patch(
        f"/api/v1/pipelines/{pid}",
        {"name": "renamed", "connections": [link("list", "images", "resize", "nope")]},
    )
    assert status == 422, body
    assert body["error"]["details"][0]["field"] == "connections[0].target.port"
    status, unchanged = await api.get(f"/api/v1/pipelines/{pid}")
    assert unchanged == pipeline
    assert await stored_counts(pool) == (1, 1, 1)
    status, body = await api.patch(f"/api/v1/pipelines/{pid}", {"nodes": None})
    assert status == 422 and body["error"]["details"][0]["field"] == "nodes"


async def test_merge_collects_a_fanout_into_a_list(api, project, images):
    body = fanout_body(
        project,
        nodes=[
            fn("list", "list_images"),
            fn("resize", "resize"),
            {"id": "gather", "type": "merge"},
            fn("count", "count"),
        ],
        connections=[
            link("list", "images", "resize", "image"),
            link("resize", "image", "gather", "resized"),
            link("gather", "resized", "count", "items"),
        ],
        variables=[],
    )
    status, pipeline = await api.post("/api/v1/pipelines", body)
    assert status == 201, pipeline
    assert [c["fanout"] for c in pipeline["connections"]] == [True, False, False]
    assert pipeline["nodes"][2] == {"id": "gather", "type": "merge"}

    # Different types arriving on one merge port make list[json], which list[string] refuses.
    body["nodes"].append(fn("inspect", "inspect", anything=1))
    body["connections"].insert(2, link("inspect", "size", "gather", "resized"))
    status, error = await api.post("/api/v1/pipelines", {**body, "name": "mixed"})
    assert status == 422, error
    assert error["error"]["details"] == [
        {"field": "connections[3]", "message": error["error"]["details"][0]["message"]}
    ]
    assert "list[json]" in error["error"]["details"][0]["message"]


async def test_start_node_may_leave_required_inputs_to_the_execution(api, project, images):
    body = fanout_body(project, nodes=[fn("only", "label")], connections=[], variables=[])
    status, pipeline = await api.post("/api/v1/pipelines", body)
    assert status == 201, pipeline


async def test_validation_names_each_field_and_stores_nothing(api, pool, project, images):
    status, other = await api.post("/api/v1/projects", {"name": "beta"})
    foreign = await deploy_images(api, other["id"], name="foreign")
    base = fanout_body(project)
    two_sources = {
        "nodes": [
            fn("a", "list_images"),
            fn("b", "resize", image="x.png"),
            fn("c", "label"),
        ],
        "connections": [
            link("a", "images", "c", "image"),
            link("b", "image", "c", "image"),
            link("b", "image", "c", "text"),
        ],
    }
    cases = [
        ({"nodes": [fn("list", "list_images"), fn("list", "resize")]}, "nodes[1].id"),
        (
            {"nodes": [fn("list", "list_images", service="nope"), base["nodes"][1]]},
            "nodes[0].service",
        ),
        (
            {"nodes": [fn("list", "list_images", service=foreign["id"]), base["nodes"][1]]},
            "nodes[0].service",
        ),
        (
            {"nodes": [fn("list", "list_images", service="foreign"), base["nodes"][1]]},
            "nodes[0].service",
        ),
        ({"nodes": [fn("list", "list_all"), base["nodes"][1]]}, "nodes[0].function"),
        ({"connections": [link("list", "images", "ghost", "image")]}, "connections[0].target.node"),
        (
            {"connections": [link("ghost", "images", "resize", "image")]},
            "connections[0].source.node",
        ),
        (
            {"connections": [link("list", "pictures", "resize", "image")]},
            "connections[0].source.port",
        ),
        (
            {"connections": [link("list", "images", "resize", "picture")]},
            "connections[0].target.port",
        ),
        ({"connections": [link("list", "images", "resize", "size")]}, "connections[0]"),
        (
            {"connections": [link("list", "images", "resize", "image", condition={"$foo": 1})]},
            "connections[0].condition.$foo",
        ),
        (
            {
                "connections": [
                    link("list", "images", "resize", "image", condition={"n": {"$regex": "("}})
                ]
            },
            "connections[0].condition.n.$regex",
        ),
        (
            {"nodes": [fn("list", "list_images"), fn("resize", "resize", size={"variable": "sz"})]},
            "nodes[1].input.size",
        ),
        (
            {"nodes": [fn("list", "list_images"), fn("resize", "resize", size="big")]},
            "nodes[1].input.size",
        ),
        (
            {"nodes": [fn("list", "list_images"), fn("resize", "resize", colour="red")]},
            "nodes[1].input.colour",
        ),
        (
            {"variables": [{"name": "size", "type": "integer", "default": "big"}]},
            "variables[0].default",
        ),
        ({"variables": [{"name": "size", "type": "colour"}]}, "variables[0].type"),
        ({"variables": [{"name": "size", "type": "string"}]}, "nodes[1].input.size"),
        (
            {
                "nodes": [fn("list", "list_images"), fn("resize", "label")],
                "connections": [link("list", "images", "resize", "image")],
            },
            "nodes[1].input.text",
        ),
        (two_sources, "nodes[2].input.text"),
        (
            {
                "nodes": [*base["nodes"], {"id": "m", "type": "merge"}],
                "connections": [
                    link("list", "images", "m", "all"),
                    link("m", "every", "resize", "image"),
                ],
            },
            "connections[1].source.port",
        ),
        ({"name": "Bad Name"}, "name"),
        ({"description": "x" * 1001}, "description"),
        ({"settings": {"fanout_cap": 0}}, "settings.fanout_cap"),
        ({"nodes": []}, "nodes"),
    ]
    for extra, field in cases:
        status, body = await api.post("/api/v1/pipelines", {**base, **extra})
        assert status == 422, (extra, body)
        assert body["error"]["code"] == "invalid"
        fields = [d["field"] for d in body["error"]["details"]]
        assert fields[0] == field, (extra, body)
    assert await stored_counts(pool) == (0, 0, 0)


async def test_cycles_are_refused(api, pool, project, images):
    base = fanout_body(project)
    loop = [
        fn("a", "resize", image="x"),
        fn("b", "resize"),
        fn("c", "resize"),
    ]
    cases = [
        # a -> b -> c -> b
        {
            "nodes": loop,
            "connections": [
                link("a", "image", "b", "image"),
                link("b", "image", "c", "image"),
                link("c", "image", "b", "image"),
            ],
        },
        {"nodes": loop[:1], "connections": [link("a", "image", "a", "image")]},
    ]
    for extra in cases:
        status, body = await api.post("/api/v1/pipelines", {**base, **extra, "variables": []})
        assert status == 422, body
        [detail] = body["error"]["details"]
        assert detail["field"].startswith("connections[") and "cycle" in detail["message"]
    assert await stored_counts(pool) == (0, 0, 0)


async def test_every_problem_at_once(api, project, images):
    body = fanout_body(
        project,
        nodes=[fn("list", "list_images"), fn("resize", "resize", size="big"), fn("x", "nope")],
        connections=[link("list", "images", "resize", "image", condition={"$foo": 1})],
    )
    status, error = await api.post("/api/v1/pipelines", body)
    assert status == 422
    fields = {d["field"] for d in error["error"]["details"]}
    assert fields == {"nodes[1].input.size", "nodes[2].function", "connections[0].condition.$foo"}


async def _pipeline_trigger(pool, pipeline: dict, active: bool) -> str:
    trigger_id = new_id()
    await pool.execute(
        """INSERT INTO triggers (id, project_id, name, type, active, operation, spec, pipeline_id)
           VALUES ($1, $2, $3, 'cron', $4, $5, $6, $7)""",
        trigger_id,
        pipeline["project"],
        f"t-{trigger_id}",
        active,
        {"type": "pipeline", "pipeline": pipeline["id"]},
        {"cron": "0 3 * * *", "timezone": "UTC", "misfire": "run-once"},
        pipeline["id"],
    )
    return trigger_id


async def test_install_and_uninstall_switch_its_triggers(api, pool, project, images):
    status, pipeline = await api.post("/api/v1/pipelines", fanout_body(project))
    pid = pipeline["id"]
    trigger_id = await _pipeline_trigger(pool, pipeline, active=False)

    status, installed = await api.post(f"/api/v1/pipelines/{pid}/install")
    assert status == 200, installed
    assert installed["installed"] is True
    row = await pool.fetchrow("SELECT active, next_fire_at FROM triggers WHERE id = $1", trigger_id)
    assert row["active"] is True and row["next_fire_at"] is not None
    assert (await api.get(f"/api/v1/pipelines/{pid}"))[1]["installed"] is True

    status, uninstalled = await api.post(f"/api/v1/pipelines/{pid}/uninstall")
    assert status == 200 and uninstalled["installed"] is False
    assert await pool.fetchval("SELECT active FROM triggers WHERE id = $1", trigger_id) is False


async def test_install_refuses_a_version_whose_service_is_gone(api, pool, project, images):
    status, pipeline = await api.post("/api/v1/pipelines", fanout_body(project))
    # Not through the API (which refuses): as if removed before pipelines guarded services.
    await pool.execute("DELETE FROM services WHERE id = $1", images["id"])
    status, body = await api.post(f"/api/v1/pipelines/{pipeline['id']}/install")
    assert status == 409, body
    assert images["id"] in body["error"]["message"]
    assert (await api.get(f"/api/v1/pipelines/{pipeline['id']}"))[1]["installed"] is False


async def test_delete_waits_for_live_pipeline_executions(api, pool, project, images):
    status, pipeline = await api.post("/api/v1/pipelines", fanout_body(project))
    pid = pipeline["id"]
    execution_id = new_id()
    await pool.execute(
        """INSERT INTO pipeline_executions (id, project_id, pipeline_id, version, status)
           VALUES ($1, $2, $3, 1, 'in-progress')""",
        execution_id,
        project["id"],
        pid,
    )
    status, body = await api.delete(f"/api/v1/pipelines/{pid}")
    assert status == 409 and execution_id in body["error"]["message"]
    assert (await api.get(f"/api/v1/pipelines/{pid}"))[0] == 200
    await pool.execute(
        "UPDATE pipeline_executions SET status = 'success' WHERE id = $1", execution_id
    )
    assert (await api.delete(f"/api/v1/pipelines/{pid}"))[0] == 204


async def test_a_service_in_use_cannot_be_deleted(api, project, images):
    status, pipeline = await api.post("/api/v1/pipelines", fanout_body(project))
    status, body = await api.delete(f"/api/v1/services/{images['id']}")
    assert status == 409, body
    assert "thumbnails" in body["error"]["message"]
    assert (await api.get(f"/api/v1/services/{images['id']}"))[0] == 200
    assert (await api.delete(f"/api/v1/pipelines/{pipeline['id']}"))[0] == 204
    assert (await api.delete(f"/api/v1/services/{images['id']}"))[0] == 204


async def test_other_projects_see_nothing(api, pool, project, images):
    status, pipeline = await api.post("/api/v1/pipelines", fanout_body(project))
    pid = pipeline["id"]
    status, other = await api.post("/api/v1/projects", {"name": "beta"})
    outsider = api.as_token(await token_for(pool, "owner", other["id"]))
    assert (await outsider.get(f"/api/v1/pipelines/{pid}"))[0] == 404
    assert (await outsider.get(f"/api/v1/pipelines/{pid}/versions/1"))[0] == 404
    assert (await outsider.patch(f"/api/v1/pipelines/{pid}", {"description": "mine"}))[0] == 404
    assert (await outsider.delete(f"/api/v1/pipelines/{pid}"))[0] == 404
    assert (await outsider.post(f"/api/v1/pipelines/{pid}/install"))[0] == 404
    assert (await outsider.post(f"/api/v1/pipelines/{pid}/uninstall"))[0] == 404
    assert (await outsider.get("/api/v1/pipelines"))[1]["items"] == []
    assert (await outsider.get(f"/api/v1/pipelines?project={project['id']}"))[0] == 404
    assert (await outsider.post("/api/v1/pipelines", fanout_body(project)))[0] == 404
    assert (await api.get(f"/api/v1/pipelines/{pid}"))[1] == pipeline


async def test_viewer_reads_developer_writes(api, pool, project, images):
    status, pipeline = await api.post("/api/v1/pipelines", fanout_body(project))
    pid = pipeline["id"]
    viewer = api.as_token(await token_for(pool, "viewer", project["id"]))
    assert (await viewer.get(f"/api/v1/pipelines/{pid}"))[0] == 200
    assert [p["id"] for p in (await viewer.get("/api/v1/pipelines"))[1]["items"]] == [pid]
    assert (await viewer.post("/api/v1/pipelines", fanout_body(project, name="v")))[0] == 403
    assert (await viewer.patch(f"/api/v1/pipelines/{pid}", {"description": "x"}))[0] == 403
    assert (await viewer.delete(f"/api/v1/pipelines/{pid}"))[0] == 403
    assert (await viewer.post(f"/api/v1/pipelines/{pid}/install"))[0] == 403
    assert (await viewer.post(f"/api/v1/pipelines/{pid}/uninstall"))[0] == 403
    assert (await api.get(f"/api/v1/pipelines/{pid}"))[1] == pipeline

    developer = api.as_token(await token_for(pool, "developer", project["id"]))
    status, made = await developer.post("/api/v1/pipelines", fanout_body(project, name="dev"))
    assert status == 201, made
    assert (await developer.post(f"/api/v1/pipelines/{made['id']}/install"))[0] == 200
    assert (await developer.delete(f"/api/v1/pipelines/{made['id']}"))[0] == 204


async def test_accepted_shapes(api, project, images):
    body = fanout_body(
        project,
        variables=[{"name": "note", "type": "json"}],
        nodes=[
            fn("a", "list_images", prefix="img/"),
            fn("b", "resize", image="x.png"),
            fn("c", "label", text={"variable": "note"}),
            fn("d", "inspect", anything={"value": {"variable": "not a reference"}}),
        ],
        connections=[
            # Each source feeds `image` on its own; `text` is the node's own.
            link("a", "images", "c", "image", condition={"images.0": {"$regex": "png$"}}),
            link("b", "image", "c", "image", fanout=True),  # the client's fanout is ignored
            link("c", "labelled", "d", "anything"),
        ],
    )
    status, pipeline = await api.post("/api/v1/pipelines", body)
    assert status == 201, pipeline
    assert [c["fanout"] for c in pipeline["connections"]] == [True, False, False]
    assert pipeline["connections"][0]["condition"] == {"images.0": {"$regex": "png$"}}
    assert pipeline["nodes"][3]["input"] == {"anything": {"value": {"variable": "not a reference"}}}
    status, body = await api.post(
        "/api/v1/pipelines",
        fanout_body(project, name="literal", nodes=[fn("x", "resize", size={"value": "big"})]),
    )
    assert status == 422 and body["error"]["details"][0]["field"] == "nodes[0].input.size"
