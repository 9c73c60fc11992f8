"""A pipeline's graph: nodes, the connections between their ports, variables and settings.

These models are both the authoring format (the body of `POST /pipelines`, or a YAML file
for the CLI) and, once validated, what a pipeline version stores: services resolved to ids
and each connection marked `fanout` when it feeds a `list[T]` output into a `T` input.

A function node's `input` maps an input name to a static value or to `{"variable": name}`;
`{"value": …}` spells a static value that would otherwise read as a variable reference.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import asyncpg
from pydantic import Field

from core.errors import NotFound
from core.models import Model, Request

NODE_ID_PATTERN = r"^[A-Za-z_][A-Za-z0-9_-]{0,62}$"
DEFAULT_FANOUT_CAP = 10_000
MAX_FANOUT_CAP = 100_000
MAX_NODES = 200


class Variable(Request):
    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
    type: str = "json"
    default: Any = None
    description: str = Field(default="", max_length=1000)


class FunctionNode(Request):
    id: str = Field(pattern=NODE_ID_PATTERN)
    type: Literal["function"]
    service: str = Field(min_length=1, max_length=200, description="a service id or name")
    function: str = Field(min_length=1, max_length=128)
    input: dict[str, Any] = Field(
        default_factory=dict,
        description='static values, or {"variable": name}; {"value": v} for a literal dict',
    )


class MergeNode(Request):
    """A barrier: waits for everything that reaches it in the same pipeline execution and
    emits, on each port that received values, the list of them in element order."""

    id: str = Field(pattern=NODE_ID_PATTERN)
    type: Literal["merge"]


Node = Annotated[FunctionNode | MergeNode, Field(discriminator="type")]


class PortRef(Request):
    node: str = Field(min_length=1, max_length=63)
    port: str = Field(min_length=1, max_length=128)


class Connection(Request):
    source: PortRef
    target: PortRef
    condition: dict[str, Any] | None = Field(
        default=None, description="a filter over the source execution's output (docs/triggers.md)"
    )
    # Set by validation (a client's value is ignored): the source port is `list[T]` and the
    # target input `T`, so the target runs once per element.
    fanout: bool = Field(
        default=False,
        description="set by validation: a list[T] output into a T input runs the target once "
        "per element (a value sent is ignored)",
    )


class Settings(Request):
    fanout_cap: int = Field(default=DEFAULT_FANOUT_CAP, ge=1, le=MAX_FANOUT_CAP)


class Graph(Request):
    variables: list[Variable] = Field(default_factory=list, max_length=100)
    nodes: list[Node] = Field(min_length=1, max_length=MAX_NODES)
    connections: list[Connection] = Field(default_factory=list, max_length=1000)
    settings: Settings = Field(default_factory=Settings)

    def node(self, node_id: str) -> FunctionNode | MergeNode:
        for node in self.nodes:
            if node.id == node_id:
                return node
        raise KeyError(node_id)

    def incoming(self, node_id: str) -> list[Connection]:
        return [c for c in self.connections if c.target.node == node_id]

    def outgoing(self, node_id: str) -> list[Connection]:
        return [c for c in self.connections if c.source.node == node_id]

    def start_nodes(self) -> list[str]:
        targets = {c.target.node for c in self.connections}
        return [n.id for n in self.nodes if n.id not in targets]

    def sink_nodes(self) -> list[str]:
        sources = {c.source.node for c in self.connections}
        return [n.id for n in self.nodes if n.id not in sources]

    def upstream(self, node_id: str) -> set[str]:
        return {c.source.node for c in self.incoming(node_id)}

    def descendants(self, node_ids: set[str]) -> set[str]:
        """The nodes reachable from `node_ids`, themselves included."""
        found, frontier = set(node_ids), list(node_ids)
        while frontier:
            for connection in self.outgoing(frontier.pop()):
                if connection.target.node not in found:
                    found.add(connection.target.node)
                    frontier.append(connection.target.node)
        return found

    def topological_order(self) -> list[str]:
        """Node ids, every node after all of its upstream nodes (the graph is acyclic)."""
        order: list[str] = []
        placed: set[str] = set()
        pending = [n.id for n in self.nodes]
        upstream: dict[str, set[str]] = {node_id: set() for node_id in pending}
        for connection in self.connections:  # once, not once per node per round
            upstream.setdefault(connection.target.node, set()).add(connection.source.node)
        while pending:
            ready = [n for n in pending if upstream[n] <= placed]
            if not ready:
                raise ValueError("the graph has a cycle")
            for node_id in ready:
                order.append(node_id)
                placed.add(node_id)
            pending = [n for n in pending if n not in placed]
        return order


def variable_reference(spec: Any) -> str | None:
    """The variable a node input names (`{"variable": name}`), or None for a static value."""
    if isinstance(spec, dict) and set(spec) == {"variable"}:
        return spec["variable"] if isinstance(spec["variable"], str) else ""
    return None


def static_value(spec: Any) -> Any:
    """A static node input as the function receives it (`{"value": v}` unwrapped)."""
    if isinstance(spec, dict) and set(spec) == {"value"}:
        return spec["value"]
    return spec


def static_inputs(node: FunctionNode, variables: dict[str, Any]) -> dict[str, Any]:
    """A function node's own inputs, with variable references replaced by their values."""
    values: dict[str, Any] = {}
    for name, spec in node.input.items():
        variable = variable_reference(spec)
        if variable is None:
            values[name] = static_value(spec)
        elif variable in variables:
            values[name] = variables[variable]
    return values


class NodeState(Model):
    node: str
    type: Literal["function", "merge"]
    status: Literal["pending", "in-progress", "success", "failed", "skipped", "terminated"]
    executions: dict[str, int]
    error: dict[str, Any] | None = None


# Stored versions never change: read once per process (bounded), shared by every reader.
_version_cache: dict[tuple[str, int], Graph] = {}
_VERSION_CACHE_SIZE = 1000


async def load_version(
    conn: asyncpg.Connection | asyncpg.Pool, pipeline_id: str, version: int
) -> Graph:
    """A stored (validated) graph version, for running it; no access check. The returned
    graph is shared between callers: read it, do not change it."""
    key = (pipeline_id, version)
    graph = _version_cache.get(key)
    if graph is None:
        raw = await conn.fetchval(
            "SELECT graph FROM pipeline_versions WHERE pipeline_id = $1 AND version = $2",
            pipeline_id,
            version,
        )
        if raw is None:
            raise NotFound(f"pipeline {pipeline_id} has no version {version}")
        graph = Graph.model_validate(raw)
        if len(_version_cache) >= _VERSION_CACHE_SIZE:
            _version_cache.clear()
        _version_cache[key] = graph
    return graph
