"""Checking a pipeline's graph before it is stored: every problem at once, each naming its field.

`validate_graph` resolves each function node's service (an id, or a name within the
project) to its id, reads the function's declared inputs and outputs from the service's
manifest, and checks the graph against them: node ids, ports, types, conditions, cycles,
and that every required input of every node has a value whichever way the node is reached.
What it returns is what a pipeline version stores: services as ids, fan-outs marked.

Types flow along connections. A connection fits when the source port's type equals the
target input's, or the target is `json`; a `list[T]` source into a `T` input is a fan-out
(the target runs once per element). A merge node accepts any port and emits, on each, the
list of what arrived: `list[T]`, or `list[json]` when different types arrive on one port.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from core import filters
from core.errors import Invalid
from core.manifest import PARAM_TYPES, FunctionSpec, Param, find_function, type_problems
from core.packages import load_manifest
from core.pipeline_graph import (
    Connection,
    FunctionNode,
    Graph,
    MergeNode,
    static_value,
    variable_reference,
)


@dataclass
class _Problems:
    prefix: str
    details: list[dict[str, Any]] = field(default_factory=list)

    def add(self, where: str, message: str) -> None:
        self.details.append({"field": self.prefix + where, "message": message})

    def add_invalid(self, exc: Invalid, where: str) -> None:
        for detail in exc.details or [{"message": exc.message}]:
            self.add(where, detail["message"])

    def raise_if_any(self) -> None:
        if self.details:
            shown = "; ".join(f"{d['field']}: {d['message']}" for d in self.details[:3])
            more = f" (and {len(self.details) - 3} more)" if len(self.details) > 3 else ""
            raise Invalid(f"invalid pipeline: {shown}{more}", self.details)


def connection_fit(source_type: str, target_type: str) -> bool | None:
    """None when the types do not fit; otherwise whether the connection fans out."""
    if source_type == target_type or target_type == "json":
        return False
    if source_type == f"list[{target_type}]":
        return True
    return None


async def _resolve_services(
    conn: asyncpg.Connection, project_id: str, graph: Graph
) -> dict[str, asyncpg.Record]:
    """The project's services the nodes name, by id and by name. Rows are locked FOR SHARE so
    a concurrent delete waits until the pipeline (and its pipeline_services rows) commit."""
    refs = sorted({n.service for n in graph.nodes if isinstance(n, FunctionNode)})
    if not refs:
        return {}
    rows = await conn.fetch(
        """SELECT id, name, package_id, package_revision, module FROM services
           WHERE project_id = $1 AND (id = ANY($2::text[]) OR name = ANY($2::text[]))
           ORDER BY id FOR SHARE""",
        project_id,
        refs,
    )
    found: dict[str, asyncpg.Record] = {row["name"]: row for row in rows}
    found.update({row["id"]: row for row in rows})  # an id wins over a name that equals it
    return found


def _check_variables(graph: Graph, problems: _Problems) -> None:
    seen: set[str] = set()
    for index, variable in enumerate(graph.variables):
        where = f"variables[{index}]"
        if variable.name in seen:
            problems.add(f"{where}.name", f"duplicate variable {variable.name!r}")
        seen.add(variable.name)
        if variable.type not in PARAM_TYPES:
            problems.add(
                f"{where}.type",
                f"unknown type {variable.type!r}; use one of {', '.join(sorted(PARAM_TYPES))}",
            )
        elif variable.default is not None:
            for suffix, message in type_problems(variable.type, variable.default):
                problems.add(f"{where}.default{suffix}", message)


def _check_node_inputs(
    index: int,
    node: FunctionNode,
    function: FunctionSpec,
    variable_types: dict[str, str],
    problems: _Problems,
) -> None:
    declared = {param.name: param for param in function.inputs}
    for name, spec in node.input.items():
        where = f"nodes[{index}].input.{name}"
        param = declared.get(name)
        if param is None:
            known = ", ".join(declared) or "none"
            problems.add(where, f"the function has no input {name!r}; its inputs: {known}")
            continue
        variable = variable_reference(spec)
        if variable is not None:
            if variable not in variable_types:
                problems.add(where, f"unknown variable {variable!r}; declare it in variables")
            # A json variable may hold anything: its value meets the input's type check when
            # the node's execution is created.
            elif (
                variable_types[variable] != "json"
                and connection_fit(variable_types[variable], param.type) is not False
            ):
                problems.add(
                    where,
                    f"variable {variable!r} is {variable_types[variable]}, the input is {param.type}",
                )
            continue
        value = static_value(spec)
        if value is None and not param.required:
            continue
        for suffix, message in type_problems(param.type, value):
            problems.add(where + suffix, message)


def _cycle_connection(graph: Graph) -> int | None:
    """The index of a connection on a cycle, or None for an acyclic graph."""
    try:
        graph.topological_order()
        return None
    except ValueError:
        pass
    # Peel off nodes with nothing upstream or nothing downstream: what is left lies on a
    # cycle or between two; the first connection left whose target reaches its source is
    # on one.
    remaining = {n.id for n in graph.nodes}
    while True:
        inner = [c for c in graph.connections if {c.source.node, c.target.node} <= remaining]
        sources = {c.source.node for c in inner}
        targets = {c.target.node for c in inner}
        kept = remaining & sources & targets
        if kept == remaining:
            break
        remaining = kept
    for index, connection in enumerate(graph.connections):
        ends = {connection.source.node, connection.target.node}
        if ends <= remaining and connection.source.node in graph.descendants(
            {connection.target.node}
        ):
            return index
    return 0


async def validate_graph(
    conn: asyncpg.Connection, project_id: str, graph: Graph, field_prefix: str = ""
) -> Graph:
    """The graph with services resolved to ids and fan-outs marked; `Invalid` (422) with one
    detail per problem otherwise. Reads only: nothing is stored."""
    problems = _Problems(field_prefix)
    _check_variables(graph, problems)
    variable_types = {v.name: v.type for v in graph.variables}

    node_index: dict[str, int] = {}
    for index, node in enumerate(graph.nodes):
        if node.id in node_index:
            problems.add(
                f"nodes[{index}].id",
                f"duplicate node id {node.id!r} (also nodes[{node_index[node.id]}])",
            )
        else:
            node_index[node.id] = index

    services = await _resolve_services(conn, project_id, graph)
    functions: dict[str, FunctionSpec] = {}  # node id -> its function's declaration
    nodes: list[FunctionNode | MergeNode] = []
    for index, node in enumerate(graph.nodes):
        if isinstance(node, MergeNode):
            nodes.append(node)
            continue
        service = services.get(node.service)
        if service is None:
            problems.add(f"nodes[{index}].service", "no such service in this project")
            nodes.append(node)
            continue
        manifest = await load_manifest(conn, service["package_id"], service["package_revision"])
        try:
            function = find_function(manifest, service["module"], node.function)
        except Invalid as exc:
            problems.add_invalid(exc, f"nodes[{index}].function")
            nodes.append(node.model_copy(update={"service": service["id"]}))
            continue
        if node_index[node.id] == index:
            functions[node.id] = function
        _check_node_inputs(index, node, function, variable_types, problems)
        nodes.append(node.model_copy(update={"service": service["id"]}))

    connections = _check_connections(graph, node_index, functions, problems)
    resolved = graph.model_copy(update={"nodes": nodes, "connections": connections})
    well_formed = len(node_index) == len(graph.nodes) and all(
        c.source.node in node_index and c.target.node in node_index for c in graph.connections
    )
    if well_formed:
        cycle = _cycle_connection(resolved)
        if cycle is not None:
            problems.add(f"connections[{cycle}]", "closes a cycle: a pipeline is acyclic")
        else:
            _check_types(resolved, functions, problems)
            _check_coverage(resolved, node_index, functions, problems)
    problems.raise_if_any()
    return resolved


def _check_connections(
    graph: Graph,
    node_index: dict[str, int],
    functions: dict[str, FunctionSpec],
    problems: _Problems,
) -> list[Connection]:
    """Ends, ports and conditions; fan-out is settled later by `_check_types`."""
    merge_ports: dict[str, set[str]] = defaultdict(set)
    for connection in graph.connections:
        if connection.target.node in node_index:
            receiver = graph.nodes[node_index[connection.target.node]]
            if isinstance(receiver, MergeNode):
                merge_ports[receiver.id].add(connection.target.port)
    checked: list[Connection] = []
    for index, connection in enumerate(graph.connections):
        where = f"connections[{index}]"
        source, target = connection.source, connection.target
        for end, ref in (("source", source), ("target", target)):
            if ref.node not in node_index:
                problems.add(f"{where}.{end}.node", f"no node {ref.node!r}")
        if source.node in node_index:
            node = graph.nodes[node_index[source.node]]
            if isinstance(node, MergeNode):
                ports = merge_ports[node.id]
                if source.port not in ports:
                    known = ", ".join(sorted(ports)) or "none"
                    problems.add(
                        f"{where}.source.port",
                        f"merge node {node.id!r} emits only the ports it receives: {known}",
                    )
            elif node.id in functions:
                _check_port(functions[node.id].outputs, source.port, "output", where, problems)
        if target.node in functions:
            _check_port(functions[target.node].inputs, target.port, "input", where, problems)
        if connection.condition is not None:
            try:
                filters.validate_filter(connection.condition, f"{where}.condition")
            except Invalid as exc:
                for detail in exc.details:
                    problems.add(detail["field"], detail["message"])
        checked.append(connection.model_copy(update={"fanout": False}))
    return checked


def _check_port(params: list[Param], port: str, noun: str, where: str, problems: _Problems) -> None:
    if not any(param.name == port for param in params):
        end = "source" if noun == "output" else "target"
        known = ", ".join(param.name for param in params) or "none"
        problems.add(
            f"{where}.{end}.port", f"the function has no {noun} {port!r}; its {noun}s: {known}"
        )


def _check_types(graph: Graph, functions: dict[str, FunctionSpec], problems: _Problems) -> None:
    """Follow types in topological order (a merge's ports depend on what reaches them) and
    mark each fitting `list[T]` into `T` connection as a fan-out. A port whose type is
    unknown (a problem reported already) is not checked further."""
    port_types: dict[tuple[str, str], str | None] = {}
    for node_id, function in functions.items():
        for param in function.outputs:
            port_types[(node_id, param.name)] = param.type
    indexed = list(enumerate(graph.connections))
    for node_id in graph.topological_order():
        node = graph.node(node_id)
        incoming = [(i, c) for i, c in indexed if c.target.node == node_id]
        if isinstance(node, MergeNode):
            arriving: dict[str, set[str | None]] = defaultdict(set)
            for _, connection in incoming:
                source = (connection.source.node, connection.source.port)
                arriving[connection.target.port].add(port_types.get(source))
            for port, types in arriving.items():
                if None in types:
                    port_types[(node_id, port)] = None
                    continue
                item = types.pop() if len(types) == 1 else "json"
                port_types[(node_id, port)] = f"list[{item}]"
            continue
        if node_id not in functions:
            continue
        inputs = {param.name: param.type for param in functions[node_id].inputs}
        for index, connection in incoming:
            source_type = port_types.get((connection.source.node, connection.source.port))
            target_type = inputs.get(connection.target.port)
            if source_type is None or target_type is None:
                continue
            fanout = connection_fit(source_type, target_type)
            if fanout is None:
                problems.add(
                    f"connections[{index}]",
                    f"type mismatch: {connection.source.node}.{connection.source.port} is "
                    f"{source_type}, {connection.target.node}.{connection.target.port} takes "
                    f"{target_type} (it takes the same type, json, or list items)",
                )
            else:
                connection.fanout = fanout


def _check_coverage(
    graph: Graph,
    node_index: dict[str, int],
    functions: dict[str, FunctionSpec],
    problems: _Problems,
) -> None:
    """Each arriving result runs a node once, with the ports its source's connections feed
    plus the node's static inputs; so every source must complete the required inputs.
    A start node's missing inputs come from the pipeline execution's input instead."""
    for node_id, function in functions.items():
        incoming = graph.incoming(node_id)
        if not incoming:
            continue
        node = graph.node(node_id)
        assert isinstance(node, FunctionNode)
        fed_by: dict[str, set[str]] = defaultdict(set)
        for connection in incoming:
            fed_by[connection.source.node].add(connection.target.port)
        for param in function.inputs:
            if not param.required or param.name in node.input:
                continue
            missing = [source for source, ports in fed_by.items() if param.name not in ports]
            if missing:
                names = ", ".join(repr(source) for source in missing)
                problems.add(
                    f"nodes[{node_index[node_id]}].input.{param.name}",
                    f"required, and not fed when {node_id!r} runs for a result of {names}: "
                    "connect it, or give a static value or a variable",
                )
