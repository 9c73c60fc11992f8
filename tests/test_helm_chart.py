"""deploy/helm/ferry, checked offline: rendered by Helm's own Go SDK (helm-python-sdk binds
it through ctypes; no helm binary, no cluster) and every object validated against the
Kubernetes schemas shipped by kubernetes-validate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="helm-python-sdk is not installed (test extra)")
kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is not installed (test extra)"
)

CHART = Path(__file__).resolve().parent.parent / "deploy" / "helm" / "ferry"
SECRETS = {
    "databaseUrl": "postgresql://ferry:pw@db.internal:5432/ferry",
    "redisUrl": "redis://:pw@redis.internal:6379/0",
    "secretKey": "x" * 43 + "=",
}


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    with helm.Chart.load(str(CHART)) as chart:
        manifests = chart.render(values, name="prod", namespace="ferry")
    docs = []
    for name, text in sorted(manifests.items()):
        if name.endswith(".yaml"):
            docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def by_kind(docs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


@pytest.mark.parametrize("version", ["1.29.0", kubernetes_validate.latest_version()])
def test_every_object_is_valid_kubernetes(version: str) -> None:
    docs = render({"secrets": SECRETS, "settings": {"FERRY_LEASE_S": 15}})
    assert {d["kind"] for d in docs} == {"Secret", "Deployment", "Service", "DaemonSet"}
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)  # raises naming the field


def test_processes_share_the_secret_and_migrate_first() -> None:
    objects = by_kind(render({"secrets": SECRETS, "settings": {"FERRY_LEASE_S": 15}}))
    secret = objects[("Secret", "prod-ferry")]
    assert secret["stringData"]["FERRY_SECRET_KEY"] == SECRETS["secretKey"]
    assert secret["stringData"]["FERRY_DATABASE_URL"] == SECRETS["databaseUrl"]
    workloads = [
        objects[("Deployment", "prod-ferry-api")],
        objects[("Deployment", "prod-ferry-scheduler")],
        objects[("DaemonSet", "prod-ferry-worker")],
    ]
    for workload in workloads:
        spec = workload["spec"]["template"]["spec"]
        (init,) = spec["initContainers"]
        assert init["args"] == ["migrate"]
        (container,) = spec["containers"]
        for c in (init, container):
            assert c["envFrom"] == [{"secretRef": {"name": "prod-ferry"}}]
            assert {"name": "FERRY_LEASE_S", "value": "15"} in c.get("env", [])
    assert [c["args"] for w in workloads for c in w["spec"]["template"]["spec"]["containers"]] == [
        ["api"],
        ["scheduler"],
        ["worker"],
    ]


def test_worker_sees_the_docker_socket_and_its_data_dir_at_the_nodes_path() -> None:
    docs = render({"secrets": SECRETS, "worker": {"dataDir": "/srv/ferry"}})
    worker = by_kind(docs)[("DaemonSet", "prod-ferry-worker")]["spec"]["template"]["spec"]
    (container,) = worker["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["FERRY_DATA_DIR"] == "/srv/ferry" and env["FERRY_RUNTIME"] == "docker"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v["hostPath"]["path"] for v in worker["volumes"]}
    assert mounts["data"] == volumes["data"] == "/srv/ferry"  # the same path on both sides
    assert mounts["docker"] == volumes["docker"] == "/var/run/docker.sock"


def test_an_existing_secret_replaces_the_charts() -> None:
    docs = render({"existingSecret": "ferry-prod-secrets"})
    assert "Secret" not in {d["kind"] for d in docs}
    api = by_kind(docs)[("Deployment", "prod-ferry-api")]
    (container,) = api["spec"]["template"]["spec"]["containers"]
    assert container["envFrom"] == [{"secretRef": {"name": "ferry-prod-secrets"}}]


def test_missing_secrets_are_refused_with_the_fields_named() -> None:
    with pytest.raises(Exception, match=r"secrets\.databaseUrl"):
        render({})
