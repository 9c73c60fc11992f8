"""The function author's loop: `ferry init`, `ferry deploy`, `ferry run`, `ferry dev`.

`deploy` and `run` go through the SDK (`ferry.client`), so the CLI and Python code see the
same names, checks and errors; `dev` runs a function of the current folder through the
same agent and input validation as a worker, with no server at all.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from core.errors import Invalid
from ferry.client_commands import err
from ferry.errors import ApiError, FerryError, Unfinished

InputOption = Annotated[
    str | None,
    typer.Option("--input", help="the input as a JSON object, or @file.json", show_default=False),
]
InputPairs = Annotated[
    list[str] | None,
    typer.Option(
        "-i",
        "--in",
        help="one input as key=value (value read as JSON when it parses, else a string); repeat",
        show_default=False,
    ),
]

TEMPLATES: dict[str, dict[str, str]] = {
    "hello": {
        "ferry.yaml": """\
name: {name}
modules:
  - name: main
    entry_point: main.py
    functions:
      - name: greet
        inputs:
          - {{name: who, type: string}}
          - {{name: times, type: integer, default: 1}}
        outputs:
          - {{name: greeting, type: string}}

# How `ferry deploy` runs it (optional; every field has a default).
service:
  runtime:
    min_replicas: 1   # one replica kept warm; 0 scales to zero when idle
    max_replicas: 2
  execution_timeout_s: 300
  env:
    GREETING: hello
""",
        "main.py": """\
import logging
import os
import time


def greet(who, times=1, progress=None):
    greeting = os.environ.get("GREETING", "hello")
    for i in range(times):
        print(f"{{greeting}} {{who}} ({{i + 1}}/{{times}})")
        if progress:
            progress.update(100 * (i + 1) / times, f"greeted {{i + 1}}")
        time.sleep(0.1)
    logging.info("done greeting %s", who)
    return f"{{greeting}} {{who}}"
""",
    },
    "minimal": {
        "ferry.yaml": """\
name: {name}
modules:
  - name: main
    entry_point: main.py
    functions:
      - name: run
        inputs: [{{name: value, type: json, default: null}}]
        outputs: [{{name: result, type: json}}]
""",
        "main.py": """\
def run(value=None):
    return value
""",
    },
}
FERRYIGNORE = """\
# Left out of the uploaded codebase (gitignore syntax; .gitignore is honoured too).
*.zip
*.log
.env
tests/
"""


def register(app: typer.Typer) -> None:
    app.command("init")(init)
    app.command("deploy")(deploy)
    app.command("run")(run)
    app.command("dev")(dev)


# -- errors ----------------------------------------------------------------------------------


@contextmanager
def reported() -> Iterator[None]:
    """Errors as one or a few lines on stderr and an exit status, never a traceback."""
    try:
        yield
    except Invalid as exc:
        _print_problem(exc.message, exc.details)
        raise typer.Exit(2) from None
    except ApiError as exc:
        _print_problem(f"error {exc.status}: {exc.message}", exc.details)
        raise typer.Exit(1) from None
    except FerryError as exc:
        err.print(f"[red]{escape(str(exc))}[/]")
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def _print_problem(message: str, details: list[dict[str, Any]]) -> None:
    err.print(f"[red]{escape(message)}[/]")
    # The message may name the first field only: every field is listed below it.
    if len(details) > 1 or any(str(d.get("field")) not in message for d in details):
        for detail in details:
            err.print(f"  {detail.get('field')}: {detail.get('message')}", markup=False)


def parse_input(raw: str | None, pairs: list[str] | None) -> dict[str, Any]:
    """The input from --input (JSON, or @file.json) and -i key=value pairs (pairs win)."""
    given: dict[str, Any] = {}
    if raw is not None:
        text = raw
        if raw.startswith("@"):
            try:
                text = Path(raw[1:]).read_text()
            except OSError as exc:
                raise Invalid.field("--input", f"cannot read {raw[1:]}: {exc.strerror}") from None
        try:
            loaded = json.loads(text)
        except ValueError as exc:
            raise Invalid.field("--input", f"not JSON: {exc}") from None
        if not isinstance(loaded, dict):
            raise Invalid.field("--input", "must be a JSON object of input names to values")
        given.update(loaded)
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise Invalid.field("-i", f"{pair!r} is not key=value")
        try:
            given[key] = json.loads(value)
        except ValueError:
            given[key] = value
    return given


# -- init ------------------------------------------------------------------------------------


def init(
    name: Annotated[str, typer.Argument(help="the package name, and the folder made for it")],
    template: Annotated[
        str, typer.Option(help="hello (a greeting with progress and logs) or minimal")
    ] = "hello",
) -> None:
    """Make a folder NAME with ferry.yaml, main.py and .ferryignore, ready for `ferry deploy`."""
    with reported():
        if template not in TEMPLATES:
            raise Invalid.field(
                "--template", f"unknown template; use one of {', '.join(TEMPLATES)}"
            )
        folder = Path(name)
        package = folder.name
        from core.manifest import parse_manifest

        text = TEMPLATES[template]["ferry.yaml"].format(name=package)
        parse_manifest(text, "ferry.yaml")  # the package name must be a valid one
        files = {**TEMPLATES[template], ".ferryignore": FERRYIGNORE}
        folder.mkdir(parents=True, exist_ok=True)
        made, kept = [], []
        for filename, content in files.items():
            path = folder / filename
            if path.exists():  # never overwritten: init is safe to run again
                kept.append(filename)
                continue
            path.write_text(content.format(name=package) if filename != ".ferryignore" else content)
            made.append(filename)
    if made:
        err.print(f"[green]✓[/] made {', '.join(made)} in {folder}/")
    if kept:
        err.print(f"kept {', '.join(kept)} in {folder}/ as they are")
    err.print(f"  next: cd {folder} && ferry deploy")


# -- deploy ----------------------------------------------------------------------------------


def _secrets(pairs: list[str] | None, from_env: list[str] | None) -> dict[str, str]:
    secrets: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise Invalid.field("--secret", f"{key!r} is not KEY=VALUE")
        secrets[key] = value
    for key in from_env or []:
        if key not in os.environ:
            raise Invalid.field("--secret-env", f"{key} is not set in this environment")
        secrets[key] = os.environ[key]
    return secrets


def _project(client: Any, name: str | None) -> Any:
    from ferry.config import read_config

    chosen = name or read_config().get("project") or "default"
    return client.projects.ensure(chosen)


def deploy(
    folder: Annotated[Path, typer.Argument(help="the function folder")] = Path("."),
    project: Annotated[
        str | None, typer.Option(help="project name or id (default: the configured one)")
    ] = None,
    service: Annotated[
        str | None, typer.Option(help="service name (default: ferry.yaml's, else the package's)")
    ] = None,
    secret: Annotated[
        list[str] | None, typer.Option(help="KEY=VALUE, sent to the service only; repeat")
    ] = None,
    secret_env: Annotated[
        list[str] | None, typer.Option(help="KEY: the secret's value from this environment")
    ] = None,
    wait: Annotated[
        float, typer.Option(help="seconds to wait for a ready replica (0: do not wait)")
    ] = 300,
) -> None:
    """Upload FOLDER as a package revision and roll its service out, then wait until a
    replica is ready. An unchanged folder changes nothing."""
    from ferry.client import Client
    from ferry.folder import read_manifest

    with reported():
        manifest = read_manifest(folder)  # a bad manifest is named before any connection
        secrets = _secrets(secret, secret_env)
        section = manifest.service
        settings: dict[str, Any] = {}
        if section is not None:
            settings = section.model_dump(exclude={"name"}, exclude_unset=True)
        name = service or (section.name if section and section.name else None) or manifest.name
        with Client() as client:
            target = _project(client, project)
            with err.status(f"packing {folder}…"):
                package = target.packages.push(folder)
            if package.unchanged:
                err.print(
                    f"package {package.name}: revision {package.revision} is this folder already"
                )
            else:
                err.print(
                    f"[green]✓[/] package {package.name}: revision {package.revision} uploaded"
                )
            services = target.services
            try:
                before = services.get(name)
            except ApiError as exc:
                if exc.status != 404:
                    raise
                before = None
            after = package.deploy(name, secrets=secrets or None, **settings)
            if before is None:
                err.print(f"[green]✓[/] service {after.name} created ({after.id})")
            elif after.updated_at != before.updated_at:
                err.print(
                    f"[green]✓[/] service {after.name} updated (generation {after.generation})"
                )
            elif package.unchanged:
                err.print(
                    f"[green]unchanged:[/] {after.name} runs this folder already, nothing to do"
                )
                return
            else:
                err.print(f"service {after.name} unchanged")
            _wait_ready(after, wait)
    err.print(f"  next: ferry run {after.name} FUNCTION -i key=value")


def _wait_ready(service: Any, timeout: float) -> None:
    if timeout <= 0:
        return
    if service.runtime.min_replicas < 1:
        err.print("  min_replicas is 0: the first execution starts a replica")
        return
    deadline = time.monotonic() + timeout
    with err.status("rolling out…") as status:
        while True:
            state = service.status_report()
            if state.rolled_out(service.generation):
                break
            if state.last_failure is not None:
                why = state.last_failure.message or "no reason recorded"
                raise FerryError(f"a replica of {service.name} failed to start: {why}")
            shown = ", ".join(
                f"{r.id[-6:]} {r.status}" + (" (old)" if r.generation < service.generation else "")
                for r in state.replicas
                if r.status in ("starting", "ready", "draining")
            )
            shown = shown or "waiting for a worker"
            status.update(f"rolling out {service.name}: {shown}")
            if time.monotonic() > deadline:
                raise Unfinished(f"{service.name} was not rolled out within {timeout:g} s: {shown}")
            time.sleep(0.3)
    err.print(f"[green]✓[/] {service.name} is ready")


# -- run -------------------------------------------------------------------------------------


def run(
    service: Annotated[str, typer.Argument(help="service name or id")],
    function: Annotated[str, typer.Argument(help="the function to run")],
    input: InputOption = None,
    pairs: InputPairs = None,
    project: Annotated[str | None, typer.Option(help="project (when names repeat)")] = None,
    no_wait: Annotated[
        bool, typer.Option("--no-wait", help="print the execution id, return")
    ] = False,
    logs: Annotated[bool, typer.Option("--logs", help="stream its log lines as they come")] = False,
) -> None:
    """Run FUNCTION of SERVICE and print its output as JSON (exit 1 with the reason when it
    fails)."""
    from ferry.client import Client, Services

    with reported():
        given = parse_input(input, pairs)
        with Client() as client:
            target = Services(client, client.projects.get(project).id if project else None).get(
                service
            )
            execution = target.execute(function, given, wait=0 if no_wait or logs else 2)
            if no_wait:
                print(execution.id)
                return
            err.print(f"execution {execution.id}", style="dim")
            if logs:
                from ferry.client_commands import print_line

                for line in execution.logs(follow=True):
                    print_line(line.model_dump(mode="json"), console=err)
            execution = _follow(execution)
    if execution.status == "success":
        print(json.dumps(execution.output, indent=2))
        return
    reason = f" ({execution.reason})" if execution.reason else ""
    err.print(f"[red]execution {execution.status}{reason}[/]")
    if execution.error:
        message = execution.error.get("message") or execution.error.get("type") or ""
        err.print(f"  {message}", markup=False)
        trace = execution.error.get("traceback")
        if trace:
            err.print(str(trace).rstrip(), markup=False, style="dim")
    raise typer.Exit(1)


def _follow(execution: Any) -> Any:
    """Wait for the end, with a progress bar fed by the execution's progress."""
    if execution.done:
        return execution
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[message]}"),
    )
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task(execution.function, total=100, message="")
        while not execution.done:
            bar.update(
                task,
                completed=execution.progress.percent,
                description=f"{execution.function} {execution.status}",
                message=execution.progress.message or "",
            )
            try:
                execution = execution.wait(timeout=0.5)
            except Unfinished:
                execution = execution.refresh()
    return execution


# -- dev -------------------------------------------------------------------------------------


def dev(
    function: Annotated[str, typer.Argument(help="the function to run")],
    input: InputOption = None,
    pairs: InputPairs = None,
    folder: Annotated[Path, typer.Option("--dir", help="the function folder")] = Path("."),
    module: Annotated[
        str | None, typer.Option(help="the module (default: the one having it)")
    ] = None,
) -> None:
    """Run FUNCTION of this folder locally, through the agent and input validation a worker
    uses, with no server: the fastest edit-run loop. Prints the output as JSON."""
    import asyncio

    from ferry.dev import run_locally

    with reported():
        given = parse_input(input, pairs)
        outcome = asyncio.run(run_locally(folder, function, given, module=module, console=err))
    if outcome.status == "success":
        print(json.dumps(outcome.output, indent=2))
        return
    err.print(f"[red]{outcome.status}[/]")
    if outcome.error:
        err.print(str(outcome.error.get("message") or ""), markup=False)
        if outcome.error.get("traceback"):
            err.print(str(outcome.error["traceback"]).rstrip(), markup=False, style="dim")
    raise typer.Exit(1)
