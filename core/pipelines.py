"""Pipeline definitions: the store of pipelines and their immutable graph versions.

A pipeline's graph is checked by `validate_graph` (core/pipeline_checks.py) and stored as
a numbered version; a change to the graph stores the next version, so a pipeline execution
keeps running the version it started with (`load_version`). Installing makes a pipeline
runnable and activates the triggers that start it; uninstalling pauses them.
"""

from __future__ import annotations

from typing import Any

import asyncpg
from pydantic import Field, ValidationError

from core.auth import Principal, Role
from core.errors import Conflict, Invalid, NotFound
from core.ids import new_id
from core.models import Model, Request, Timestamp
from core.pagination import Keyset, Order, page_of
from core.pipeline_checks import validate_graph
from core.pipeline_graph import (
    MAX_NODES,
    Connection,
    FunctionNode,
    Graph,
    Node,
    Settings,
    Variable,
    load_version,  # noqa: F401 - read from here too
)
from core.triggers import set_pipeline_triggers_active

NAME_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
GRAPH_FIELDS = ("variables", "nodes", "connections", "settings")
LIVE_STATUSES = ("created", "in-progress")  # a pipeline execution still running or about to


class PipelineCreate(Graph):
    project: str
    name: str = Field(pattern=NAME_PATTERN)
    description: str = Field(default="", max_length=1000)


class PipelinePatch(Request):
    """Name and description change in place; any graph field stores a new version."""

    name: str | None = Field(default=None, pattern=NAME_PATTERN)
    description: str | None = Field(default=None, max_length=1000)
    variables: list[Variable] | None = Field(default=None, max_length=100)
    nodes: list[Node] | None = Field(default=None, min_length=1, max_length=MAX_NODES)
    connections: list[Connection] | None = Field(default=None, max_length=1000)
    settings: Settings | None = None


class Pipeline(Model):
    id: str
    project: str
    name: str
    description: str
    version: int
    installed: bool
    variables: list[Variable]
    nodes: list[Node]
    connections: list[Connection]
    settings: Settings
    created_at: Timestamp
    updated_at: Timestamp


def pipeline_from_row(row: asyncpg.Record) -> Pipeline:
    """A pipeline from a `pipelines` row joined with a version's `graph` (see `_SELECT`)."""
    graph = Graph.model_validate(row["graph"])
    return Pipeline(
        id=row["id"],
        project=row["project_id"],
        name=row["name"],
        description=row["description"],
        version=row["graph_version"],
        installed=row["installed"],
        variables=graph.variables,
        nodes=graph.nodes,
        connections=graph.connections,
        settings=graph.settings,
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


# The current version unless a query picks another; `graph_version` is the version shown.
_SELECT = """
    SELECT p.*, v.graph, v.version AS graph_version
    FROM pipelines p JOIN pipeline_versions v ON v.pipeline_id = p.id AND v.version = p.version
"""


def _graph_of(body: Request) -> Graph:
    return Graph.model_validate(body.model_dump(include=set(GRAPH_FIELDS)))


def _service_ids(graph: Graph) -> list[str]:
    return sorted({n.service for n in graph.nodes if isinstance(n, FunctionNode)})


async def _store_version(
    conn: asyncpg.Connection, pipeline_id: str, version: int, graph: Graph
) -> None:
    await conn.execute(
        "INSERT INTO pipeline_versions (pipeline_id, version, graph) VALUES ($1, $2, $3)",
        pipeline_id,
        version,
        graph.model_dump(mode="json"),
    )
    # Every version's services, kept while the pipeline exists: an older version may still
    # be running (or be resumed), so none of them may be deleted under it.
    await conn.execute(
        """INSERT INTO pipeline_services (pipeline_id, service_id)
           SELECT $1, unnest($2::text[]) ON CONFLICT DO NOTHING""",
        pipeline_id,
        _service_ids(graph),
    )


async def _fetch_pipeline(
    conn: asyncpg.Connection | asyncpg.Pool, by: Principal, pipeline_id: str, *, lock: bool = False
) -> asyncpg.Record:
    row = await conn.fetchrow(
        f"{_SELECT} WHERE p.id = $1 {'FOR UPDATE OF p' if lock else ''}", pipeline_id
    )
    if row is None or not by.can_see(row["project_id"]):
        raise NotFound("pipeline not found")
    return row


async def create_pipeline(pool: asyncpg.Pool, by: Principal, body: PipelineCreate) -> Pipeline:
    by.require(Role.developer, body.project)
    async with pool.acquire() as conn, conn.transaction():
        if not await conn.fetchval("SELECT 1 FROM projects WHERE id = $1", body.project):
            raise NotFound("project not found")
        graph = await validate_graph(conn, body.project, _graph_of(body))
        pipeline_id = new_id()
        try:
            await conn.execute(
                """INSERT INTO pipelines (id, project_id, name, description, version)
                   VALUES ($1, $2, $3, $4, 1)""",
                pipeline_id,
                body.project,
                body.name,
                body.description,
            )
        except asyncpg.UniqueViolationError:
            raise Conflict(f"a pipeline named {body.name!r} exists in this project") from None
        await _store_version(conn, pipeline_id, 1, graph)
        row = await _fetch_pipeline(conn, by, pipeline_id)
    return pipeline_from_row(row)


async def get_pipeline(pool: asyncpg.Pool, by: Principal, pipeline_id: str) -> Pipeline:
    return pipeline_from_row(await _fetch_pipeline(pool, by, pipeline_id))


async def get_version(
    pool: asyncpg.Pool, by: Principal, pipeline_id: str, version: int
) -> Pipeline:
    """The pipeline with the graph of `version` (name, description and installed as now)."""
    row = await pool.fetchrow(
        """SELECT p.*, v.graph, v.version AS graph_version
           FROM pipelines p
           LEFT JOIN pipeline_versions v ON v.pipeline_id = p.id AND v.version = $2
           WHERE p.id = $1""",
        pipeline_id,
        version,
    )
    if row is None or not by.can_see(row["project_id"]):
        raise NotFound("pipeline not found")
    if row["graph"] is None:
        raise NotFound(f"pipeline version {version} not found; versions are 1..{row['version']}")
    return pipeline_from_row(row)


async def list_pipelines(
    pool: asyncpg.Pool,
    by: Principal,
    *,
    project: str | None,
    cursor: str | None,
    limit: int,
    order: Order,
) -> dict[str, Any]:
    query = Keyset()
    project = by.project_filter(project)
    if project is not None:
        query.where("p.project_id = {}", project)
    rows = await pool.fetch(f"{_SELECT} {query.tail(cursor, order, limit, alias='p')}", *query.args)
    return page_of(rows, limit, pipeline_from_row)


async def update_pipeline(
    pool: asyncpg.Pool, by: Principal, pipeline_id: str, body: PipelinePatch
) -> Pipeline:
    changes = body.model_dump(exclude_unset=True)
    for name in ("name", "description", *GRAPH_FIELDS):
        if name in changes and changes[name] is None:
            raise Invalid.field(name, "may not be null; leave it out to keep it")
    async with pool.acquire() as conn, conn.transaction():
        row = await _fetch_pipeline(conn, by, pipeline_id, lock=True)
        by.require(Role.developer, row["project_id"])
        version = row["version"]
        if changes.keys() & set(GRAPH_FIELDS):
            current = Graph.model_validate(row["graph"])
            merged = {
                name: getattr(body, name) if name in changes else getattr(current, name)
                for name in GRAPH_FIELDS
            }
            try:
                candidate = Graph.model_validate(merged)
            except ValidationError as exc:
                details = [
                    {"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]}
                    for e in exc.errors(include_url=False)
                ]
                raise Invalid(f"invalid pipeline: {details[0]['message']}", details) from None
            graph = await validate_graph(conn, row["project_id"], candidate)
            if graph.model_dump(mode="json") != current.model_dump(mode="json"):
                version += 1
                await _store_version(conn, pipeline_id, version, graph)
        try:
            await conn.execute(
                """UPDATE pipelines SET name = $2, description = $3, version = $4,
                       updated_at = now()
                   WHERE id = $1""",
                pipeline_id,
                changes.get("name", row["name"]),
                changes.get("description", row["description"]),
                version,
            )
        except asyncpg.UniqueViolationError:
            raise Conflict(f"a pipeline named {changes['name']!r} exists in this project") from None
        updated = await _fetch_pipeline(conn, by, pipeline_id)
    return pipeline_from_row(updated)


async def delete_pipeline(pool: asyncpg.Pool, by: Principal, pipeline_id: str) -> None:
    """Delete a pipeline, its versions and the triggers that start it; 409 while one of its
    pipeline executions is live (terminate it first)."""
    async with pool.acquire() as conn, conn.transaction():
        row = await _fetch_pipeline(conn, by, pipeline_id, lock=True)
        by.require(Role.developer, row["project_id"])
        live = await conn.fetchval(
            """SELECT id FROM pipeline_executions
               WHERE pipeline_id = $1 AND status = ANY($2::text[]) LIMIT 1""",
            pipeline_id,
            list(LIVE_STATUSES),
        )
        if live is not None:
            raise Conflict(
                f"pipeline execution {live} of this pipeline is still running; "
                "terminate it (or wait for it) before deleting the pipeline"
            )
        await conn.execute("DELETE FROM pipelines WHERE id = $1", pipeline_id)


async def install_pipeline(pool: asyncpg.Pool, by: Principal, pipeline_id: str) -> Pipeline:
    """Make the current version runnable and activate its triggers; 409 naming a service the
    version uses that no longer exists."""
    async with pool.acquire() as conn, conn.transaction():
        row = await _fetch_pipeline(conn, by, pipeline_id, lock=True)
        by.require(Role.developer, row["project_id"])
        graph = Graph.model_validate(row["graph"])
        found = {
            r["id"]
            for r in await conn.fetch(
                "SELECT id FROM services WHERE project_id = $1 AND id = ANY($2::text[])",
                row["project_id"],
                _service_ids(graph),
            )
        }
        for node in graph.nodes:
            if isinstance(node, FunctionNode) and node.service not in found:
                raise Conflict(
                    f"node {node.id!r} uses service {node.service}, which no longer exists; "
                    "change the pipeline, then install it",
                    [{"field": "nodes", "message": f"{node.id}: service {node.service} is gone"}],
                )
        await conn.execute(
            "UPDATE pipelines SET installed = true, updated_at = now() WHERE id = $1", pipeline_id
        )
        await set_pipeline_triggers_active(conn, pipeline_id, True)
        updated = await _fetch_pipeline(conn, by, pipeline_id)
    return pipeline_from_row(updated)


async def uninstall_pipeline(pool: asyncpg.Pool, by: Principal, pipeline_id: str) -> Pipeline:
    """No new pipeline executions (running ones go on); its triggers are paused."""
    async with pool.acquire() as conn, conn.transaction():
        row = await _fetch_pipeline(conn, by, pipeline_id, lock=True)
        by.require(Role.developer, row["project_id"])
        await conn.execute(
            "UPDATE pipelines SET installed = false, updated_at = now() WHERE id = $1", pipeline_id
        )
        await set_pipeline_triggers_active(conn, pipeline_id, False)
        updated = await _fetch_pipeline(conn, by, pipeline_id)
    return pipeline_from_row(updated)


# Versions never change once stored, so the engine's repeated reads are served from memory.
