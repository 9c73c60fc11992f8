"""`ferry dev`: one function of a local folder run through the agent a worker would use.

The folder's manifest is checked and the input validated exactly as the server would, the
agent (worker/agent.py) is started as a process-runtime replica on the folder itself, and the
output is checked against the declared outputs. No server, database or Redis is involved.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console

from core.errors import Invalid
from core.manifest import find_function, validate_inputs, validate_output
from ferry.folder import list_files, read_manifest
from worker.agent_client import AgentConnection, ExecutionOutcome
from worker.runtimes import ProcessRuntime, ReplicaSpec

_STREAM_STYLE = {"stderr": "red", "system": "yellow"}
START_TIMEOUT_S = 60.0


async def run_locally(
    folder: Path,
    function_name: str,
    given: dict[str, Any],
    *,
    module: str | None = None,
    console: Console,
    timeout_s: float | None = None,
) -> ExecutionOutcome:
    """Run `function_name` of the folder with `given` input; its log lines go to `console`."""
    from core.manifest import check_entry_points

    manifest = read_manifest(folder)
    check_entry_points(manifest, list_files(folder))
    if module is None:
        having = [
            m.name for m in manifest.modules if any(f.name == function_name for f in m.functions)
        ]
        if not having:
            known = ", ".join(f.name for m in manifest.modules for f in m.functions)
            raise Invalid.field(
                "function", f"no function {function_name!r}; the manifest has: {known}"
            )
        module = having[0]
    function = find_function(manifest, module, function_name)
    full_input = validate_inputs(function, given)
    spec_module = next(m for m in manifest.modules if m.name == module)
    section = manifest.service
    code_dir = await asyncio.to_thread(folder.resolve)
    # The warning that the process runtime isolates nothing is for servers, not this loop.
    logging.getLogger("worker.runtimes.process").setLevel(logging.ERROR)
    runtime = ProcessRuntime()
    with tempfile.TemporaryDirectory(prefix="ferry-dev-") as run_dir:
        spec = ReplicaSpec(
            replica_id="dev",
            service_id="dev",
            image="",
            codebase_dir=code_dir,
            run_dir=Path(run_dir),
            entry_point=spec_module.entry_point,
            class_name=spec_module.class_name,
            init_inputs=section.init_inputs if section else {},
            functions={
                f.name: {
                    "inputs": [p.name for p in f.inputs],
                    "outputs": [p.name for p in f.outputs],
                }
                for f in spec_module.functions
            },
            concurrency=1,
            env=dict(section.env) if section else {},
            cpu=1.0,
            memory_mb=512,
        )
        handle = await runtime.start(spec)
        conn = AgentConnection()
        try:
            await conn.connect(runtime.socket_path(handle), START_TIMEOUT_S)
            await conn.wait_ready()

            def on_log(stream: str, text: str, at: float) -> None:
                style = _STREAM_STYLE.get(stream)
                console.print(text, style=style, markup=False, highlight=False)

            def on_progress(percent: float, message: str | None) -> None:
                console.print(f"progress {percent:.0f}% {message or ''}", style="dim", markup=False)

            outcome = await conn.execute(
                "dev",
                function_name,
                full_input,
                context={"attempt": 1, "service_id": "dev"},
                timeout_s=timeout_s or function.timeout_s,
                on_log=on_log,
                on_progress=on_progress,
            )
        finally:
            conn.close()
            await runtime.stop(handle, grace_s=2.0)
    if outcome.status == "success":
        try:
            validate_output(function, outcome.output)
        except Invalid as exc:
            return ExecutionOutcome("failed", error={"type": "output", "message": exc.message})
    return outcome
