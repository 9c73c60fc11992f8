"""Helpers of the pipeline tests: the `flow` package, graph builders, waiting."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.conftest import make_zip

FLOW_CODE = (Path(__file__).parent / "pipeline_fixtures" / "flow.py").read_text()


def _f(name: str, inputs: list[tuple[str, str]], outputs: list[tuple[str, str]], **defaults):
    return {
        "name": name,
        "inputs": [
            {"name": n, "type": t, **({"default": defaults[n]} if n in defaults else {})}
            for n, t in inputs
        ],
        "outputs": [{"name": n, "type": t} for n, t in outputs],
    }


FLOW_MANIFEST = {
    "name": "flow",
    "modules": [
        {
            "name": "main",
            "entry_point": "main.py",
            "functions": [
                _f("add", [("n", "integer"), ("plus", "integer")], [("n", "integer"), ("node", "json")], plus=1),
                _f("source", [("count", "integer")], [("items", "list[integer]")]),
                _f("square", [("n", "integer")], [("n", "integer")]),
                _f("total", [("items", "list[integer]")], [("total", "integer")]),
                _f("classify", [("n", "integer")], [("n", "integer"), ("kind", "string")]),
                _f("fail_while", [("n", "integer"), ("path", "string")], [("n", "integer")]),
                _f(
                    "hold",
                    [("n", "integer"), ("path", "string"), ("seconds", "number")],
                    [("n", "integer")],
                    seconds=120.0,
                ),
                _f("nap", [("n", "integer"), ("seconds", "number")], [("n", "integer")]),
            ],
        }
    ],
}  # fmt: skip


async def deploy_flow(
    api, project_id: str, *, name: str = "flow", runtime: dict[str, Any] | None = None
) -> dict:
    """Upload the flow package and deploy it as a service; returns the service."""
    archive = make_zip(
        {
            "ferry.yaml": yaml.safe_dump({**FLOW_MANIFEST, "name": f"pkg-{name}"}),
            "main.py": FLOW_CODE,
        }
    )
    status, package = await api.upload(project_id, archive)
    assert status == 201, package
    body = {
        "project": project_id,
        "name": name,
        "package": package["id"],
        "runtime": {"memory_mb": 256, "concurrency": 8, "max_replicas": 1, **(runtime or {})},
    }
    status, service = await api.post("/api/v1/services", body)
    assert status == 201, service
    return service


def node(node_id: str, function: str, service: str = "flow", **input_: Any) -> dict:
    return {
        "id": node_id,
        "type": "function",
        "service": service,
        "function": function,
        "input": input_,
    }


def merge(node_id: str) -> dict:
    return {"id": node_id, "type": "merge"}


def link(source: str, source_port: str, target: str, target_port: str, **extra: Any) -> dict:
    return {
        "source": {"node": source, "port": source_port},
        "target": {"node": target, "port": target_port},
        **extra,
    }


async def create_pipeline(api, project_id: str, name: str, nodes, connections, **extra) -> dict:
    """Create and install a pipeline; returns it."""
    body = {
        "project": project_id,
        "name": name,
        "nodes": nodes,
        "connections": connections,
        **extra,
    }
    status, pipeline = await api.post("/api/v1/pipelines", body)
    assert status == 201, pipeline
    status, installed = await api.post(f"/api/v1/pipelines/{pipeline['id']}/install", {})
    assert status == 200, installed
    return installed


async def execute(api, pipeline_id: str, input_: dict | None = None, **extra) -> dict:
    status, run = await api.post(
        f"/api/v1/pipelines/{pipeline_id}/execute", {"input": input_ or {}, **extra}
    )
    assert status == 201, run
    return run


async def wait_run(api, run_id: str, timeout_s: float = 120) -> dict:
    status, run = await api.get(f"/api/v1/pipeline-executions/{run_id}/wait?timeout={timeout_s}")
    assert status == 200, run
    assert run["status"] not in ("created", "in-progress"), f"still running: {run}"
    return run


def node_states(run: dict) -> dict[str, str]:
    return {n["node"]: n["status"] for n in run["nodes"]}


async def executions_of(api, run_id: str) -> list[dict]:
    items, cursor = [], None
    while True:
        path = f"/api/v1/executions?pipeline_execution={run_id}&limit=1000&order=created_at"
        status, page = await api.get(path + (f"&cursor={cursor}" if cursor else ""))
        assert status == 200, page
        items += page["items"]
        cursor = page["next_cursor"]
        if not cursor:
            return items
