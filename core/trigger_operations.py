"""What a trigger runs: a service's function or a pipeline, as a tagged union on `type`,
and the check of a trigger's operation and input when it is created or changed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

import asyncpg
from pydantic import Field, TypeAdapter

from core.errors import Conflict, Invalid
from core.manifest import FunctionSpec, find_function, validate_inputs
from core.models import Request
from core.packages import load_manifest
from core.pipeline_graph import FunctionNode, load_version, static_inputs

EVENT_INPUT = "event"  # the input an event trigger's function receives the event under


class FunctionOperation(Request):
    type: Literal["function"]
    service: str
    function: str


class PipelineOperation(Request):
    type: Literal["pipeline"]
    pipeline: str = Field(
        min_length=1, max_length=200, description="a pipeline id or name; stored as its id"
    )


Operation = Annotated[FunctionOperation | PipelineOperation, Field(discriminator="type")]
_OPERATION: TypeAdapter[FunctionOperation | PipelineOperation] = TypeAdapter(Operation)


def parse_operation(stored: dict[str, Any]) -> FunctionOperation | PipelineOperation:
    """An operation as stored in `triggers.operation`."""
    return _OPERATION.validate_python(stored)


@dataclass
class Target:
    """What an operation resolved to: the columns stored beside it, and whether it can run."""

    operation: dict[str, Any]  # as stored: a pipeline given by name is stored by id
    service_id: str | None = None
    pipeline_id: str | None = None
    pipeline_name: str | None = None
    runnable: bool = True  # False: a pipeline that is not installed


async def _function_of(
    conn: asyncpg.Connection, service_id: str, function: str, *, field: str
) -> FunctionSpec:
    service = await conn.fetchrow(
        "SELECT package_id, package_revision, module FROM services WHERE id = $1", service_id
    )
    if service is None:
        raise Invalid.field(field, f"service {service_id} no longer exists")
    manifest = await load_manifest(conn, service["package_id"], service["package_revision"])
    return find_function(manifest, service["module"], function, field=field)


async def check_operation(
    conn: asyncpg.Connection,
    project_id: str,
    type_: str,
    operation: FunctionOperation | PipelineOperation,
    given_input: dict[str, Any],
    *,
    holding_trigger: bool = False,
) -> Target:
    """Check that the operation can run in the project with `given_input` (422s name the
    field); returns what to store. `holding_trigger`: the caller holds the trigger's row."""
    if type_ == "event" and EVENT_INPUT in given_input:
        raise Invalid.field(f"input.{EVENT_INPUT}", "set by each event; leave it out")
    if isinstance(operation, PipelineOperation):
        return await _check_pipeline(
            conn, project_id, type_, operation, given_input, holding_trigger=holding_trigger
        )
    owner = await conn.fetchval("SELECT project_id FROM services WHERE id = $1", operation.service)
    if owner != project_id:
        raise Invalid.field("operation.service", "no such service in this project")
    function = await _function_of(
        conn, operation.service, operation.function, field="operation.function"
    )
    if type_ == "event":
        if not any(param.name == EVENT_INPUT for param in function.inputs):
            raise Invalid.field(
                "operation.function",
                f"an event trigger's function needs an input named {EVENT_INPUT!r} (type json)",
            )
        given_input = {**given_input, EVENT_INPUT: {}}
    validate_inputs(function, given_input, field_prefix="input")
    return Target(operation.model_dump(), service_id=operation.service)


async def _check_pipeline(
    conn: asyncpg.Connection,
    project_id: str,
    type_: str,
    operation: PipelineOperation,
    given_input: dict[str, Any],
    *,
    holding_trigger: bool,
) -> Target:
    """The pipeline (by id, else by name) in the project, and `input` checked against its
    current version's start nodes: each takes the inputs it declares, as at execute time.

    The pipeline row is locked FOR SHARE until the trigger is stored, so an install or
    uninstall (FOR UPDATE) either sees the trigger or is seen by it. They lock the pipeline
    before its triggers: a caller already holding a trigger does not wait (NOWAIT, a 409)."""
    try:
        pipeline = await conn.fetchrow(
            f"""SELECT id, name, version, installed FROM pipelines
                WHERE project_id = $1 AND (id = $2 OR name = $2)
                ORDER BY id = $2 DESC LIMIT 1
                FOR SHARE {"NOWAIT" if holding_trigger else ""}""",
            project_id,
            operation.pipeline,
        )
    except asyncpg.LockNotAvailableError:
        raise Conflict(
            f"pipeline {operation.pipeline} is being changed; try again",
            [{"field": "operation.pipeline", "message": "the pipeline is being changed"}],
        ) from None
    if pipeline is None:
        raise Invalid.field("operation.pipeline", "no such pipeline in this project")
    graph = await load_version(conn, pipeline["id"], pipeline["version"])
    defaults = {v.name: v.default for v in graph.variables if v.default is not None}
    given = {**given_input, EVENT_INPUT: {}} if type_ == "event" else given_input
    declared: set[str] = set()
    for node_id in graph.start_nodes():
        node = graph.node(node_id)
        if not isinstance(node, FunctionNode):
            continue
        function = await _function_of(conn, node.service, node.function, field="operation.pipeline")
        names = {param.name for param in function.inputs}
        declared |= names
        values = {**static_inputs(node, defaults), **given}
        validate_inputs(
            function, {k: v for k, v in values.items() if k in names}, field_prefix="input"
        )
    unknown = sorted(set(given_input) - declared)
    if unknown:
        raise Invalid.field(f"input.{unknown[0]}", "no start node of the pipeline declares it")
    return Target(
        {"type": "pipeline", "pipeline": pipeline["id"]},
        pipeline_id=pipeline["id"],
        pipeline_name=pipeline["name"],
        runnable=pipeline["installed"],
    )
