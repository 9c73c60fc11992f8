"""A replica that cannot start: after `FERRY_REPLICA_START_ATTEMPTS` failed starts of a
service's generation, the executions waiting for it fail `replica-failed` with the cause,
through `core.outcomes` (events, pipelines); and a service's own image gets its package's
requirements, or the replica fails saying why."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import tarfile
import uuid
from pathlib import Path

import pytest
import yaml

from core import queue
from core.events import EVENTS_STREAM
from tests.conftest import make_zip
from tests.engine_helpers import wait_for_status
from tests.pipeline_helpers import (
    FLOW_MANIFEST,
    create_pipeline,
    execute,
    node,
    node_states,
    wait_run,
)
from tests.test_engine import RUNNER_IMAGE, _require_docker, deploy, engine, fn, manifest_of, run

FIXTURES = Path(__file__).parent / "secret_fixtures"
BROKEN = {"main.py": "import ferry_no_such_module_anywhere\n"}
FUNCTIONS = [fn("read_secret", ("name", "string")), fn("uses_six")]


async def start_execution(api, service_id: str, function: str = "read_secret") -> dict:
    input_ = {"name": "HOME"} if function == "read_secret" else {}
    status, created = await api.post(
        "/api/v1/executions", {"service": service_id, "function": function, "input": input_}
    )
    assert status == 201, created
    return created


async def failed_starts(pool, service_id: str) -> int:
    return await pool.fetchval(
        "SELECT count(*) FROM replicas WHERE service_id = $1 AND status = 'failed'", service_id
    )


async def test_waiting_executions_fail_replica_failed_after_the_allowed_tries(
    api, project, settings, pool, redis
):
    assert settings.replica_start_attempts == 3  # the default
    _, service = await deploy(api, project["id"], BROKEN, manifest_of(FUNCTIONS))
    waiting = [await start_execution(api, service["id"]) for _ in range(3)]
    async with engine(settings, pool, redis, "process"):
        ended = [await wait_for_status(api, e["id"], timeout_s=90) for e in waiting]
        tries = await failed_starts(pool, service["id"])

    assert tries == 3, tries  # the executions waited for exactly the allowed tries
    for execution in ended:
        assert (execution["status"], execution["reason"]) == ("failed", "replica-failed")
        assert execution["attempt"] == 0  # never ran
        assert execution["error"]["type"] == "ReplicaFailed"
        message = execution["error"]["message"]
        assert "failed to start 3 times" in message, message
        assert "No module named 'ferry_no_such_module_anywhere'" in message, message
        last = execution["status_log"][-1]
        assert (last["status"], last["reason"]) == ("failed", "replica-failed"), last
    # Their jobs left the queue: nothing keeps asking for replicas of the broken service.
    assert await queue.queue_length(redis, service["id"]) == 0
    # Subscribers hear it like any other failure.
    events = [
        json.loads(fields[b"data"]) | {"type": fields[b"type"].decode()}
        for _, fields in await redis.xrange(EVENTS_STREAM)
    ]
    failed_events = [e for e in events if e["type"] == "execution.failed"]
    assert len(failed_events) == 3 and all(e["reason"] == "replica-failed" for e in failed_events)


async def test_executions_arriving_after_the_bound_fail_at_the_next_try(
    api, project, settings, pool, redis
):
    _, service = await deploy(api, project["id"], BROKEN, manifest_of(FUNCTIONS))
    first = await start_execution(api, service["id"])
    async with engine(settings, pool, redis, "process", replica_start_attempts=1):
        assert (await wait_for_status(api, first["id"], timeout_s=60))["reason"] == "replica-failed"
        later = await start_execution(api, service["id"])
        ended = await wait_for_status(api, later["id"], timeout_s=60)
    assert (ended["status"], ended["reason"]) == ("failed", "replica-failed"), ended


async def test_a_pipeline_node_on_a_broken_service_fails_the_pipeline(
    api, project, settings, pool, redis
):
    archive = make_zip({"ferry.yaml": yaml.safe_dump(FLOW_MANIFEST), **BROKEN})
    status, package = await api.upload(project["id"], archive)
    assert status == 201, package
    status, service = await api.post(
        "/api/v1/services",
        {"project": project["id"], "name": "flow", "package": package["id"]},
    )
    assert status == 201, service
    pipeline = await create_pipeline(
        api, project["id"], "chain", [node("a", "add"), node("b", "add")], []
    )
    async with engine(settings, pool, redis, "process", replica_start_attempts=1):
        done = await wait_run(api, (await execute(api, pipeline["id"], {"n": 1}))["id"], 90)
    assert done["status"] == "failed", done
    assert node_states(done) == {"a": "failed", "b": "failed"}


# -- a service's own image ------------------------------------------------------------------


def _build_image(tag: str, dockerfile: str) -> None:
    import docker

    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        data = dockerfile.encode()
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    context.seek(0)
    client = docker.from_env()
    try:
        client.images.build(fileobj=context, custom_context=True, tag=tag, pull=False, rm=True)
    finally:
        client.close()


def _remove_images(label: str) -> None:
    """This test's images, and the revision images built on them (newest first)."""
    import docker

    client = docker.from_env()
    try:
        for image in sorted(
            client.images.list(filters={"label": label}), key=lambda i: i.attrs["Created"]
        )[::-1]:
            for ref in image.tags or [image.id]:
                with contextlib.suppress(docker.errors.APIError):
                    client.images.remove(ref, force=True)
    finally:
        client.close()


@pytest.fixture
async def own_image():
    """An image of the service's own, made from the runner image, and one without pip."""
    _require_docker()
    suffix = uuid.uuid4().hex[:8]
    own, no_pip = f"ferry-test/own:{suffix}", f"ferry-test/nopip:{suffix}"
    label = f"ferry.test={suffix}"  # inherited by the revision images built on them
    await asyncio.to_thread(_build_image, own, f"FROM {RUNNER_IMAGE}\nLABEL {label}\n")
    await asyncio.to_thread(
        _build_image,
        no_pip,
        f"FROM {RUNNER_IMAGE}\nLABEL {label}\nUSER root\n"
        "RUN rm -rf /usr/lib/python3/dist-packages/pip /usr/local/lib/python3*/site-packages/pip"
        "\nUSER 1000:1000\n",
    )
    yield own, no_pip
    await asyncio.to_thread(_remove_images, label)


@pytest.mark.docker
async def test_requirements_are_installed_on_the_services_own_image(
    api, project, settings, pool, redis, own_image
):
    own, _ = own_image
    manifest = {**manifest_of(FUNCTIONS), "requirements": ["six==1.16.0"]}
    code = {"main.py": (FIXTURES / "main.py").read_text()}
    _, service = await deploy(api, project["id"], code, manifest, runtime={"image": own})
    async with engine(settings, pool, redis, "docker") as host:
        done = await run(api, service["id"], "uses_six", wait_s=300)
        (replica,) = host.replicas.values()
        import docker

        client = docker.from_env()
        try:
            container = client.api.inspect_container(replica.handle.ref)
            image = client.images.get(container["Image"])
            own_id = client.images.get(own).id
        finally:
            client.close()
    assert done["status"] == "success", done
    assert done["output"] == {"six": "1.16.0"}
    assert image.labels.get("ferry.revision.base") == own_id  # layered on the service's image
    assert image.labels.get("ferry.test")  # its base's label


@pytest.mark.docker
async def test_an_own_image_without_pip_fails_the_replica_saying_so(
    api, project, settings, pool, redis, own_image
):
    _, no_pip = own_image
    manifest = {**manifest_of(FUNCTIONS), "requirements": ["six==1.16.0"]}
    code = {"main.py": (FIXTURES / "main.py").read_text()}
    _, service = await deploy(api, project["id"], code, manifest, runtime={"image": no_pip})
    waiting = await start_execution(api, service["id"], "uses_six")
    async with engine(settings, pool, redis, "docker", replica_start_attempts=1):
        ended = await wait_for_status(api, waiting["id"], timeout_s=120)
    assert (ended["status"], ended["reason"]) == ("failed", "replica-failed"), ended
    assert f"image {no_pip} has no pip" in ended["error"]["message"], ended
    message = await pool.fetchval(
        "SELECT message FROM replicas WHERE service_id = $1 AND status = 'failed'", service["id"]
    )
    assert f"image {no_pip} has no pip" in message, message


async def test_a_handed_back_execution_waiting_for_a_retry_fails_too(
    api, project, settings, pool, redis
):
    _, service = await deploy(api, project["id"], BROKEN, manifest_of(FUNCTIONS))
    created = await start_execution(api, service["id"])
    # As the reconciler leaves an execution whose worker died: in-progress, no lease.
    await pool.execute(
        """UPDATE executions SET status = 'in-progress', attempt = 1, lease_until = NULL
           WHERE id = $1""",
        created["id"],
    )
    async with engine(settings, pool, redis, "process", replica_start_attempts=1):
        ended = await wait_for_status(api, created["id"], timeout_s=60)
    assert (ended["status"], ended["reason"], ended["attempt"]) == ("failed", "replica-failed", 1)
