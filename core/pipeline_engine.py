"""The pipeline engine: how a pipeline execution moves on when one of its executions ends.

Everything here runs inside the transaction that records the ending execution's outcome
(`core.outcomes`), holding the pipeline execution's row lock, so:

- each downstream execution (per node, per upstream execution, per fan-out element, per
  resume round) is created exactly once, with the upstream outcome or not at all; the
  unique index `executions_pipeline_hop` makes a replay insert nothing;
- node states are settled by one writer at a time, from counters kept per node
  (`pipeline_nodes`), so a fan-out of thousands is never counted row by row.

A node's life: `pending` until something reaches it, `in-progress` while it has live
executions, then `success`, `failed`, `skipped` (nothing reached it once everything
upstream was done) or `terminated`. A merge node waits until everything upstream is done,
then emits, on each port, the list of what reached it in element order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import asyncpg

from core import filters, outbox
from core.errors import FerryError
from core.executions import ExecutionCreate, Origin, create_executions
from core.outcomes import Recorded
from core.pipeline_graph import (
    Connection,
    FunctionNode,
    Graph,
    MergeNode,
    load_version,
    static_inputs,
)
from core.states import NOTIFY_CHANNEL

log = logging.getLogger(__name__)

FINAL_NODE = frozenset({"success", "failed", "skipped", "terminated"})
LIVE_PIPELINE = frozenset({"created", "in-progress"})


@dataclass
class _Run:
    """One pipeline execution, locked, with its graph and node rows, while it advances."""

    conn: asyncpg.Connection
    row: asyncpg.Record
    graph: Graph
    nodes: dict[str, dict[str, Any]]
    recorded: Recorded

    @property
    def id(self) -> str:
        return self.row["id"]


async def lock_run(conn: asyncpg.Connection, pipeline_execution_id: str) -> _Run | None:
    """Lock a pipeline execution, then read its node states: every node execution's end goes
    through here, one at a time per pipeline execution.

    Two statements on purpose: under READ COMMITTED a statement that waited for the lock
    still reads the other tables as of its own start, so node states read in the locking
    statement would miss what the previous holder of the lock wrote."""
    row = await conn.fetchrow(
        "SELECT * FROM pipeline_executions WHERE id = $1 FOR UPDATE", pipeline_execution_id
    )
    if row is None:
        return None
    graph = await load_version(conn, row["pipeline_id"], row["version"])
    nodes = {
        r["node"]: dict(r)
        for r in await conn.fetch(
            "SELECT * FROM pipeline_nodes WHERE pipeline_execution_id = $1", pipeline_execution_id
        )
    }
    return _Run(conn, row, graph, nodes, Recorded(None))


# -- starting -------------------------------------------------------------------------------


async def start(conn: asyncpg.Connection, pipeline_execution_id: str) -> Recorded:
    """Create the node rows and the start nodes' executions of a just-inserted pipeline
    execution. Raises `Invalid` (fields `input.…`) when its input does not fit a start node:
    the caller's transaction then stores nothing."""
    run = await lock_run(conn, pipeline_execution_id)
    assert run is not None
    await conn.execute(
        """INSERT INTO pipeline_nodes (pipeline_execution_id, node)
           SELECT $1, unnest($2::text[])""",
        run.id,
        [node.id for node in run.graph.nodes],
    )
    run.nodes = {n.id: _blank(n.id) for n in run.graph.nodes}
    for node_id in run.graph.start_nodes():
        node = run.graph.node(node_id)
        if isinstance(node, FunctionNode):
            values = {**static_inputs(node, run.row["variables"]), **run.row["input"]}
            # A start node takes what it declares from the pipeline execution's input.
            declared = await _declared_inputs(conn, node)
            body = ExecutionCreate(
                service=node.service,
                function=node.function,
                input={k: v for k, v in values.items() if k in declared},
            )
            await _create(run, node, [body], [Origin("pipeline", node=node.id)], strict=True)
    await _settle(run)
    return run.recorded


def _blank(node_id: str) -> dict[str, Any]:
    return {
        "node": node_id,
        "status": "pending",
        "created": 0,
        "live": 0,
        "succeeded": 0,
        "failed": 0,
        "terminated": 0,
        "error": None,
        "output": None,
        "since_round": 0,
    }


async def _declared_inputs(conn: asyncpg.Connection, node: FunctionNode) -> frozenset[str]:
    from core.manifest import find_function
    from core.packages import load_manifest

    service = await conn.fetchrow(
        "SELECT package_id, package_revision, module FROM services WHERE id = $1", node.service
    )
    if service is None:
        return frozenset()
    manifest = await load_manifest(conn, service["package_id"], service["package_revision"])
    try:
        function = find_function(manifest, service["module"], node.function)
    except FerryError:
        return frozenset()
    return frozenset(p.name for p in function.inputs)


# -- an execution ended ---------------------------------------------------------------------


async def execution_ended(
    conn: asyncpg.Connection, execution: asyncpg.Record, run: _Run | None = None
) -> Recorded:
    """Called by `core.outcomes` in the transaction that recorded `execution`'s end, with the
    run it locked (`lock_run`) before touching the execution's row."""
    if run is None:
        run = await lock_run(conn, execution["pipeline_execution_id"])
    if run is None:
        return Recorded(None)
    node_id = execution["pipeline_node"]
    status = execution["status"]
    state = run.nodes[node_id]
    state["live"] -= 1
    counter = {"success": "succeeded", "failed": "failed", "terminated": "terminated"}[status]
    state[counter] += 1
    await conn.execute(
        f"""UPDATE pipeline_nodes SET live = live - 1, {counter} = {counter} + 1
            WHERE pipeline_execution_id = $1 AND node = $2""",
        run.id,
        node_id,
    )
    if (
        status == "success"
        and not run.row["terminate_requested"]
        and run.row["status"] in LIVE_PIPELINE
    ):
        node = run.graph.node(node_id)
        await _deliver(
            run,
            node,
            execution["output"],
            parent=execution["id"],
            path=tuple(execution["pipeline_path"] or ()),
        )
    if run.row["status"] in LIVE_PIPELINE:
        await _settle(run)
    return run.recorded


async def _deliver(
    run: _Run,
    source: FunctionNode | MergeNode,
    output: Any,
    *,
    parent: str | None,
    path: tuple[int, ...],
) -> None:
    """Send one result of `source` along its outgoing connections that carry."""
    by_target: dict[str, list[Connection]] = {}
    for connection in run.graph.outgoing(source.id):
        if connection.condition and not filters.matches(connection.condition, output):
            continue
        by_target.setdefault(connection.target.node, []).append(connection)
    for target_id, connections in by_target.items():
        target = run.graph.node(target_id)
        if isinstance(target, MergeNode):
            await run.conn.executemany(
                """INSERT INTO pipeline_merge_items
                       (pipeline_execution_id, node, port, source_execution_id, path, value)
                   VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING""",
                [
                    (
                        run.id,
                        target_id,
                        c.target.port,
                        parent or source.id,
                        list(path),
                        _port_value(output, c.source.port),
                    )
                    for c in connections
                ],
            )
            run.nodes[target_id]["received"] = True  # settles to in-progress
            continue
        await _feed(run, target, connections, output, parent=parent, path=path)


def _port_value(output: Any, port: str) -> Any:
    return output.get(port) if isinstance(output, dict) else None


async def _feed(
    run: _Run,
    target: FunctionNode,
    connections: list[Connection],
    output: Any,
    *,
    parent: str | None,
    path: tuple[int, ...],
) -> None:
    """Run `target` on one upstream result: once, or once per element of a fan-out."""
    base = static_inputs(target, run.row["variables"])
    fixed = {c.target.port: _port_value(output, c.source.port) for c in connections if not c.fanout}
    fanout = next((c for c in connections if c.fanout), None)
    round_ = run.row["round"]
    if fanout is None:
        elements: list[Any] = [None]
    else:
        elements = _port_value(output, fanout.source.port)
        if not isinstance(elements, list):
            await _node_error(
                run,
                target.id,
                f"fan-out from {fanout.source.node}.{fanout.source.port} got no list",
            )
            return
        cap = run.graph.settings.fanout_cap
        if len(elements) > cap:
            await _node_error(
                run,
                target.id,
                f"fan-out of {len(elements)} elements from {fanout.source.node}."
                f"{fanout.source.port} exceeds fanout_cap {cap}; nothing was started",
            )
            return
    bodies, origins = [], []
    for index, element in enumerate(elements):
        values = {**base, **fixed}
        if fanout is not None:
            values[fanout.target.port] = element
        bodies.append(
            ExecutionCreate(service=target.service, function=target.function, input=values)
        )
        origins.append(
            Origin(
                "pipeline",
                pipeline_execution_id=run.id,
                node=target.id,
                parent=parent,
                element=index,
                path=(*path, index) if fanout is not None else path,
                round=round_,
            )
        )
    await _create(run, target, bodies, origins)


async def _create(
    run: _Run,
    node: FunctionNode,
    bodies: list[ExecutionCreate],
    origins: list[Origin],
    *,
    strict: bool = False,
) -> None:
    """Insert a node's executions (one statement) and count them on the node.

    A request the function refuses (a downstream input of the wrong type, a service deleted
    meanwhile) fails the node with the reason; with `strict` (a start node, at execute time)
    it is raised so that the whole execute is refused."""
    origins = [
        Origin(
            "pipeline",
            pipeline_execution_id=run.id,
            node=o.node,
            parent=o.parent,
            element=o.element,
            path=o.path,
            round=run.row["round"],
        )
        for o in origins
    ]
    if not bodies:
        return
    try:
        async with run.conn.transaction():  # a savepoint: a refused batch leaves nothing
            results = await create_executions(
                None,  # type: ignore[arg-type]  # the connection below is used
                None,
                None,
                bodies,
                batch=len(bodies) > 1,
                origin=origins,
                conn=run.conn,
                events=run.recorded.events,
            )
    except FerryError as exc:
        if strict:
            raise
        await _node_error(run, node.id, exc.message, exc.details)
        return
    new = [execution for execution, created in results if created]
    run.recorded.created.extend((e.service, e.id) for e in new)
    state = run.nodes[node.id]
    state["created"] += len(new)
    state["live"] += len(new)
    await run.conn.execute(
        """UPDATE pipeline_nodes SET created = created + $3, live = live + $3
           WHERE pipeline_execution_id = $1 AND node = $2""",
        run.id,
        node.id,
        len(new),
    )


async def _node_error(
    run: _Run, node_id: str, message: str, details: list[dict[str, Any]] | None = None
) -> None:
    error = {"node": node_id, "message": message}
    if details:
        error["details"] = details  # type: ignore[assignment]
    run.nodes[node_id]["error"] = error
    await run.conn.execute(
        "UPDATE pipeline_nodes SET error = $3 WHERE pipeline_execution_id = $1 AND node = $2",
        run.id,
        node_id,
        error,
    )
    log.info("pipeline execution %s: node %s failed: %s", run.id, node_id, message)


# -- settling -------------------------------------------------------------------------------


async def _settle(run: _Run) -> None:
    """Bring every node's status up to date, in graph order (a merge emitting feeds the nodes
    after it in the same pass), then end the pipeline execution if nothing more can run."""
    graph, nodes = run.graph, run.nodes
    changed: dict[str, str] = {}
    terminating = run.row["terminate_requested"]
    for node_id in graph.topological_order():
        state = nodes[node_id]
        if state["status"] in FINAL_NODE:
            continue
        upstream_done = all(nodes[u]["status"] in FINAL_NODE for u in graph.upstream(node_id))
        node = graph.node(node_id)
        status = state["status"]
        if isinstance(node, MergeNode):
            if upstream_done:
                status = await _merge(run, node, terminating)
            elif status == "pending" and (
                state.get("received") or await _merge_has_items(run, node_id)
            ):
                status = "in-progress"
        elif state["live"] > 0:
            status = "in-progress"
        elif upstream_done:
            if state["error"] is not None or state["failed"]:
                status = "failed"
            elif state["terminated"] or (terminating and not state["succeeded"]):
                status = "terminated"
            elif state["created"] == 0:
                status = "skipped"
            else:
                status = "success"
        if status != state["status"]:
            state["status"] = status
            changed[node_id] = status
    if changed:
        await run.conn.execute(
            """UPDATE pipeline_nodes p SET status = c.status
               FROM unnest($2::text[], $3::text[]) AS c(node, status)
               WHERE p.pipeline_execution_id = $1 AND p.node = c.node""",
            run.id,
            list(changed),
            list(changed.values()),
        )
    if all(state["status"] in FINAL_NODE for state in nodes.values()):
        await _end(run)


async def _merge_has_items(run: _Run, node_id: str) -> bool:
    return bool(
        await run.conn.fetchval(
            "SELECT 1 FROM pipeline_merge_items WHERE pipeline_execution_id = $1 AND node = $2 LIMIT 1",
            run.id,
            node_id,
        )
    )


async def _merge(run: _Run, node: MergeNode, terminating: bool) -> str:
    """Everything upstream is done: emit the lists (one statement), or give up."""
    upstream = run.graph.upstream(node.id)
    broken = sorted(u for u in upstream if run.nodes[u]["status"] in ("failed", "terminated"))
    if terminating:
        return "terminated"
    if broken:
        # A merge waits for everything; with a part missing it has nothing whole to emit.
        await _node_error(run, node.id, f"not merged: upstream {', '.join(broken)} did not succeed")
        return "skipped"
    rows = await run.conn.fetch(
        """SELECT port, jsonb_agg(value ORDER BY path, source_execution_id) AS items
           FROM pipeline_merge_items WHERE pipeline_execution_id = $1 AND node = $2
           GROUP BY port""",
        run.id,
        node.id,
    )
    if not rows:
        return "skipped"
    output = {r["port"]: r["items"] for r in rows}
    run.nodes[node.id]["output"] = output
    await run.conn.execute(
        "UPDATE pipeline_nodes SET output = $3 WHERE pipeline_execution_id = $1 AND node = $2",
        run.id,
        node.id,
        output,
    )
    await _deliver(run, node, output, parent=None, path=())
    return "success"


async def _end(run: _Run) -> None:
    nodes = run.nodes
    failed = [n for n in run.graph.topological_order() if nodes[n]["status"] == "failed"]
    if run.row["terminate_requested"]:
        status, error = "terminated", None
    elif failed:
        first = nodes[failed[0]]
        message = (first["error"] or {}).get("message")
        if message is None:  # its executions failed: say why, from the first of them
            example = await run.conn.fetchrow(
                """SELECT id, reason, error FROM executions
                   WHERE pipeline_execution_id = $1 AND pipeline_node = $2 AND status = 'failed'
                   ORDER BY finished_at DESC LIMIT 1""",
                run.id,
                failed[0],
            )
            message = f"{first['failed']} execution(s) of node {failed[0]} failed"
            if example is not None:
                cause = (example["error"] or {}).get("message") or example["reason"]
                message += f"; execution {example['id']}: {example['reason']}: {cause}"
        status, error = "failed", {"node": failed[0], "message": message, "failed_nodes": failed}
    else:
        status, error = "success", None
    output = await _sink_outputs(run)
    row = await run.conn.fetchrow(
        """UPDATE pipeline_executions SET status = $2, error = $3, output = $4,
               ended_at = clock_timestamp(), updated_at = clock_timestamp()
           WHERE id = $1 RETURNING *""",
        run.id,
        status,
        error,
        output,
    )
    await run.conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, run.id)
    run.recorded.events.append(await pipeline_event(run.conn, row))


async def _sink_outputs(run: _Run) -> dict[str, Any]:
    outputs: dict[str, Any] = {}
    sinks = run.graph.sink_nodes()
    for node_id in sinks:
        state = run.nodes[node_id]
        if state["status"] != "success":
            continue
        if isinstance(run.graph.node(node_id), MergeNode):
            outputs[node_id] = state["output"]
            continue
        # The latest execution per upstream result and element, from the node's last reset.
        values = await run.conn.fetch(
            """SELECT output FROM (
                   SELECT DISTINCT ON (coalesce(pipeline_parent, ''), pipeline_element)
                          output, status, pipeline_path, created_at
                   FROM executions
                   WHERE pipeline_execution_id = $1 AND pipeline_node = $2
                     AND pipeline_round >= $3
                   ORDER BY coalesce(pipeline_parent, ''), pipeline_element, pipeline_round DESC
               ) latest WHERE status = 'success' ORDER BY pipeline_path, created_at""",
            run.id,
            node_id,
            state["since_round"],
        )
        outputs[node_id] = (
            values[0]["output"] if len(values) == 1 else [v["output"] for v in values]
        )
    return outputs


async def pipeline_event(conn: asyncpg.Connection, row: asyncpg.Record) -> outbox.OutboxEvent:
    return await outbox.add(
        conn,
        f"pipeline_execution.{row['status']}",
        row["project_id"],
        "pipeline_execution",
        row["id"],
        {
            "pipeline": row["pipeline_id"],
            "version": row["version"],
            "status": row["status"],
            "error": row["error"],
            "trigger": row["trigger_id"],
        },
    )


# -- terminate and resume -------------------------------------------------------------------


async def terminate(conn: asyncpg.Connection, pipeline_execution_id: str) -> Recorded | None:
    """Stop a live pipeline execution: nothing new starts, waiting executions end
    `terminated` at once, running ones are asked to stop. None when it had ended."""
    run = await lock_run(conn, pipeline_execution_id)
    if run is None or run.row["status"] not in LIVE_PIPELINE:
        return None
    run.row = await conn.fetchrow(
        """UPDATE pipeline_executions SET terminate_requested = true, updated_at = clock_timestamp()
           WHERE id = $1 RETURNING *""",
        run.id,
    )
    # Waiting ones (created, or handed back with no worker) end now; running ones are marked
    # and their workers stop them, recording `terminated` through `execution_ended`.
    ended = await conn.fetch(
        """UPDATE executions SET terminate_requested = true, status = 'terminated',
               finished_at = clock_timestamp(), updated_at = clock_timestamp(),
               status_log = status_log || jsonb_build_array(jsonb_build_object(
                   'status', 'terminated', 'message', 'its pipeline execution was terminated',
                   'at', to_char(clock_timestamp() AT TIME ZONE 'UTC',
                                 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')))
           WHERE pipeline_execution_id = $1
             AND (status = 'created' OR (status = 'in-progress' AND lease_until IS NULL))
           RETURNING *""",
        run.id,
    )
    running = await conn.fetch(
        """UPDATE executions SET terminate_requested = true
           WHERE pipeline_execution_id = $1 AND status = 'in-progress' RETURNING id""",
        run.id,
    )
    run.recorded.stop.extend(r["id"] for r in running)
    by_node: dict[str, int] = {}
    for row in ended:
        by_node[row["pipeline_node"]] = by_node.get(row["pipeline_node"], 0) + 1
        await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, row["id"])
    for node_id, count in by_node.items():
        run.nodes[node_id]["live"] -= count
        run.nodes[node_id]["terminated"] += count
        await conn.execute(
            """UPDATE pipeline_nodes SET live = live - $3, terminated = terminated + $3
               WHERE pipeline_execution_id = $1 AND node = $2""",
            run.id,
            node_id,
            count,
        )
    run.recorded.events.extend(
        await outbox.add_many(
            conn,
            "execution.terminated",
            "execution",
            [(r["project_id"], r["id"], outbox.execution_data(r)) for r in ended],
        )
    )
    await _settle(run)
    return run.recorded


async def resume(
    conn: asyncpg.Connection, pipeline_execution_id: str, nodes: list[str] | None
) -> Recorded:
    """Run again the failed nodes (`nodes` None) or the named ones, and what follows them;
    the outputs of what succeeded are reused. The caller checked that the pipeline
    execution has ended."""
    run = await lock_run(conn, pipeline_execution_id)
    assert run is not None
    graph = run.graph
    if nodes is None:
        chosen = {n for n, s in run.nodes.items() if s["status"] in ("failed", "terminated")}
        only_failed = True
    else:
        chosen, only_failed = set(nodes), False
    affected = graph.descendants(chosen)
    errors_before = {n: run.nodes[n]["error"] for n in chosen}
    round_ = run.row["round"] + 1
    run.row = await conn.fetchrow(
        """UPDATE pipeline_executions SET status = 'in-progress', round = $2, error = NULL,
               output = NULL, ended_at = NULL, terminate_requested = false,
               updated_at = clock_timestamp()
           WHERE id = $1 RETURNING *""",
        run.id,
        round_,
    )
    # What follows a rerun node runs again from what reaches it now. Under `from failed`,
    # the results that did reach it (from upstream successes) stand.
    for node_id in affected:
        state = run.nodes[node_id]
        state.update(status="pending", error=None)
        if not only_failed or node_id in chosen:
            state.update(failed=0, terminated=0)
        if not only_failed:
            state.update(created=0, succeeded=0, output=None, since_round=round_)
    await conn.execute(
        """UPDATE pipeline_nodes p SET status = 'pending', error = NULL,
               since_round = CASE WHEN $3 THEN since_round ELSE $5 END,
               failed = CASE WHEN $3 AND NOT p.node = ANY($4::text[]) THEN failed ELSE 0 END,
               terminated = CASE WHEN $3 AND NOT p.node = ANY($4::text[]) THEN terminated ELSE 0 END,
               created = CASE WHEN $3 THEN created ELSE 0 END,
               succeeded = CASE WHEN $3 THEN succeeded ELSE 0 END,
               output = CASE WHEN $3 THEN output ELSE NULL END
           WHERE pipeline_execution_id = $1 AND node = ANY($2::text[])""",
        run.id,
        list(affected),
        only_failed,
        list(chosen),
        round_,
    )
    if not only_failed:
        await conn.execute(
            """DELETE FROM pipeline_merge_items
               WHERE pipeline_execution_id = $1 AND node = ANY($2::text[])""",
            run.id,
            list(affected),
        )
    for node_id in sorted(chosen, key=graph.topological_order().index):
        node = graph.node(node_id)
        if isinstance(node, MergeNode):
            continue  # settles again from its items
        # Again, with the same inputs: every execution of the node's latest round (or only
        # those that did not succeed, under `from failed`).
        statuses = ["failed", "terminated"] if only_failed else ["success", "failed", "terminated"]
        previous = await conn.fetch(
            """SELECT DISTINCT ON (coalesce(pipeline_parent, ''), pipeline_element)
                      input, pipeline_parent, pipeline_element, pipeline_path, status
               FROM executions WHERE pipeline_execution_id = $1 AND pipeline_node = $2
               ORDER BY coalesce(pipeline_parent, ''), pipeline_element, pipeline_round DESC""",
            run.id,
            node_id,
        )
        again = [p for p in previous if p["status"] in statuses]
        if not again and errors_before.get(node_id):
            # Failed before any execution started (a fan-out over its cap, say): running it
            # again changes nothing, so it stays failed with its reason.
            await _node_error(run, node_id, errors_before[node_id]["message"])
            continue
        await _create(
            run,
            node,
            [
                ExecutionCreate(service=node.service, function=node.function, input=p["input"])
                for p in again
            ],
            [
                Origin(
                    "pipeline",
                    node=node_id,
                    parent=p["pipeline_parent"],
                    element=p["pipeline_element"],
                    path=tuple(p["pipeline_path"] or ()),
                )
                for p in again
            ],
        )
    run.recorded.events.append(await pipeline_event(conn, run.row))
    await _settle(run)
    return run.recorded
