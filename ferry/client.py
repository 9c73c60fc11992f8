"""Ferry's Python SDK (synchronous): `Client()` talks to the Ferry the CLI is configured for.

    from ferry import Client

    client = Client()  # or Client("http://host:8700", "token")
    project = client.projects.ensure("demo")
    package = project.packages.push("./hello")
    service = package.deploy("hello", runtime={"min_replicas": 1})
    execution = service.execute("greet", who="ferry").wait()
    for line in execution.logs():
        print(line.text)

Resources are the API's models (`ferry.models`) with methods; names work wherever ids do.
Errors are `ferry.errors` exceptions carrying the API's code, message and field details.
`AsyncClient` (`ferry.async_client`) is the same with `await`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from httpx_sse import connect_sse
from pydantic import PrivateAttr

from ferry import models
from ferry.config import connection
from ferry.errors import FerryError, NotFound, Unfinished, Unreachable, error_from_answer

DEFAULT_TIMEOUT_S = 30.0
PAGE_SIZE = 1000  # the API's largest page: fewest round trips when iterating everything


def _path(*parts: str) -> str:
    return "/" + "/".join(quote(part, safe="") for part in parts)


def _resolve_url_token(url: str | None, token: str | None) -> tuple[str, str]:
    if url is None or token is None:
        configured_url, configured_token = connection()
        url, token = url or configured_url, token or configured_token
    if not url or not token:
        raise FerryError(
            "no Ferry configured: run `ferry up` or `ferry login URL`, or pass url, token"
        )
    return url.rstrip("/"), token


def raise_for_error(response: httpx.Response) -> None:
    """An `ApiError` for an error answer (its body read, streamed or not)."""
    if response.status_code >= 400:
        response.read()
        try:
            body = response.json()
        except ValueError:
            body = None
        raise error_from_answer(response.status_code, body, response.text)


def check(response: httpx.Response) -> Any:
    """The answer's JSON (None when empty); an `ApiError` for an error answer."""
    raise_for_error(response)
    if not response.content:
        return None
    return response.json()


class Client:
    """A connection to one Ferry. Use it as a context manager, or call `close()`."""

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.url, token = _resolve_url_token(url, token)
        self.http = httpx.Client(
            base_url=self.url + "/api/v1",
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(timeout, connect=10.0),
        )
        self.projects = Projects(self)
        self.packages = Packages(self, None)
        self.services = Services(self, None)
        self.executions = Executions(self)
        self.pipelines = Pipelines(self, None)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise Unreachable(self.url, str(exc) or type(exc).__name__) from None
        return check(response)

    def info(self) -> dict[str, Any]:
        """The server's version and package limits."""
        return self.request("GET", "/info")

    def pages(self, path: str, params: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
        """Every item of a listing, following `next_cursor` page after page."""
        params = {"limit": PAGE_SIZE, **(params or {})}
        while True:
            page = self.request("GET", path, params=params)
            yield from page["items"]
            if not page.get("next_cursor"):
                return
            params["cursor"] = page["next_cursor"]

    def events(self, path: str, params: dict[str, Any] | None = None) -> Iterator[Any]:
        """Server-Sent Events of a live endpoint, as `httpx_sse.ServerSentEvent`s."""
        timeout = httpx.Timeout(None, connect=10.0)
        try:
            with connect_sse(
                self.http, "GET", path, params=params or {}, timeout=timeout
            ) as source:
                raise_for_error(source.response)
                yield from source.iter_sse()
        except httpx.TransportError as exc:
            raise Unreachable(self.url, str(exc) or type(exc).__name__) from None


class _Resource:
    def __init__(self, client: Client, project: str | None) -> None:
        self.client = client
        self.project = project

    def _scope(self, params: dict[str, Any]) -> dict[str, Any]:
        if self.project:
            params.setdefault("project", self.project)
        return {k: v for k, v in params.items() if v is not None}

    def _by_name(self, collection: str, ref: str, noun: str) -> dict[str, Any]:
        """The item whose id or name is `ref` (ids first: one request when it is one)."""
        try:
            return self.client.request("GET", _path(collection, ref))
        except NotFound:
            pass
        matches = [
            item
            for item in self.client.pages(_path(collection), self._scope({}))
            if item["name"] == ref
        ]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise NotFound(404, "not_found", f"no {noun} named {ref!r} or with that id")
        projects = ", ".join(item["project"] for item in matches)
        raise FerryError(f"{noun}s named {ref!r} in projects {projects}: name the project")


# -- projects ------------------------------------------------------------------------------


class Project(models.Project):
    _client: Client = PrivateAttr()

    @property
    def packages(self) -> Packages:
        return Packages(self._client, self.id)

    @property
    def services(self) -> Services:
        return Services(self._client, self.id)

    @property
    def pipelines(self) -> Pipelines:
        return Pipelines(self._client, self.id)

    def executions(self, **filters: Any) -> Iterator[Execution]:
        return self._client.executions.list(project=self.id, **filters)


class Projects(_Resource):
    def __init__(self, client: Client) -> None:
        super().__init__(client, None)

    def _wrap(self, body: dict[str, Any]) -> Project:
        project = Project.model_validate(body)
        project._client = self.client
        return project

    def list(self) -> Iterator[Project]:
        return (self._wrap(item) for item in self.client.pages("/projects"))

    def get(self, ref: str) -> Project:
        return self._wrap(self._by_name("projects", ref, "project"))

    def create(self, name: str, description: str = "") -> Project:
        body = {"name": name, "description": description}
        return self._wrap(self.client.request("POST", "/projects", json=body))

    def ensure(self, name: str) -> Project:
        """The project called `name`, created if there is none."""
        try:
            return self.get(name)
        except NotFound:
            return self.create(name)


# -- packages --------------------------------------------------------------------------------


class Package(models.Package):
    _client: Client = PrivateAttr()
    _unchanged: bool = PrivateAttr(default=False)

    @property
    def unchanged(self) -> bool:
        """push() found this very codebase uploaded already, and uploaded nothing."""
        return self._unchanged

    def revisions(self) -> list[models.RevisionSummary]:
        path = _path("packages", self.id, "revisions")
        return [models.RevisionSummary.model_validate(r) for r in self._client.pages(path)]

    def download(self, dest: str | Path, revision: int | None = None) -> Path:
        params = {"revision": revision or self.revision}
        response = self._client.http.get(_path("packages", self.id, "codebase"), params=params)
        raise_for_error(response)
        Path(dest).write_bytes(response.content)
        return Path(dest)

    def deploy(
        self,
        name: str | None = None,
        *,
        secrets: dict[str, str] | None = None,
        **settings: Any,
    ) -> Service:
        """Create the service `name` (default: the package's name) running this revision, or
        update it to this revision and these settings; only what differs is sent."""
        services = Services(self._client, self.project)
        name = name or self.name
        try:
            current = services.get(name)
        except NotFound:
            body = {
                "project": self.project,
                "name": name,
                "package": self.id,
                "package_revision": self.revision,
                **settings,
            }
            if secrets:
                body["secrets"] = secrets
            return services._wrap(self._client.request("POST", "/services", json=body))
        return current.update(package_revision=self.revision, secrets=secrets, **settings)


class Packages(_Resource):
    def _wrap(self, body: dict[str, Any]) -> Package:
        package = Package.model_validate(body)
        package._client = self.client
        return package

    def list(self, name: str | None = None) -> Iterator[Package]:
        items = self.client.pages("/packages", self._scope({"name": name}))
        return (self._wrap(item) for item in items)

    def get(self, ref: str, revision: int | None = None) -> Package:
        package = self._wrap(self._by_name("packages", ref, "package"))
        if revision is not None and revision != package.revision:
            path = _path("packages", package.id)
            package = self._wrap(self.client.request("GET", path, params={"revision": revision}))
        return package

    def push(self, folder: str | Path) -> Package:
        """Upload a folder (its ferry.yaml checked, ignore files honoured) as the package its
        manifest names: created, or given a new revision; nothing is uploaded when the latest
        revision has the same content (`package.unchanged`)."""
        from ferry.folder import Limits, bundle

        if not self.project:
            raise FerryError("push needs a project: client.projects.get(NAME).packages.push(...)")
        limits = self.client.info()["limits"]
        built = bundle(
            Path(folder),
            Limits(
                max_upload_bytes=limits["max_upload_bytes"],
                max_unpacked_bytes=limits["max_unpacked_bytes"],
                max_files=limits["max_archive_files"],
            ),
        )
        existing = [p for p in self.list(name=built.manifest.name) if p.project == self.project]
        files = {"codebase": ("codebase.zip", built.archive, "application/zip")}
        if existing:
            latest = existing[0]
            if latest.revision != latest.latest_revision:
                latest = self.get(latest.id, revision=latest.latest_revision)
            if latest.codebase.sha256 == built.sha256:
                latest._unchanged = True
                return latest
            path = _path("packages", latest.id, "revisions")
            return self._wrap(self.client.request("POST", path, files=files))
        data = {"project": self.project}
        return self._wrap(self.client.request("POST", "/packages", data=data, files=files))


# -- services --------------------------------------------------------------------------------


class Service(models.Service):
    _client: Client = PrivateAttr()

    def _post(self, action: str) -> Service:
        body = self._client.request("POST", _path("services", self.id, action))
        return Services(self._client, self.project)._wrap(body)

    def execute(
        self,
        function: str,
        input: dict[str, Any] | None = None,
        *,
        wait: float = 0,
        idempotency_key: str | None = None,
        **inputs: Any,
    ) -> Execution:
        """Run `function` with `input` (or keyword inputs); `wait` seconds: answer finished when
        it ends within them."""
        body: dict[str, Any] = {
            "service": self.id,
            "function": function,
            "input": {**(input or {}), **inputs},
        }
        if idempotency_key:
            body["idempotency_key"] = idempotency_key
        params = {"wait": wait} if wait else {}
        timeout = httpx.Timeout(wait + DEFAULT_TIMEOUT_S, connect=10.0)
        answer = self._client.request(
            "POST", "/executions", json=body, params=params, timeout=timeout
        )
        return self._client.executions._wrap(answer)

    def status_report(self) -> models.ServiceStatus:
        """Queue length, in-progress count and replicas (`status` is active or paused)."""
        body = self._client.request("GET", _path("services", self.id, "status"))
        return models.ServiceStatus.model_validate(body)

    def update(self, *, secrets: dict[str, str] | None = None, **changes: Any) -> Service:
        """Change what differs from `changes` (runtime fields may be a partial mapping)."""
        patch: dict[str, Any] = {}
        for key, value in changes.items():
            if value is None:
                continue
            if key == "runtime":
                current = self.runtime.model_dump()
                value = {k: v for k, v in dict(value).items() if current.get(k) != v}
                if value:
                    patch[key] = value
            elif getattr(self, key, None) != value:
                patch[key] = value
        if secrets:
            patch["secrets"] = secrets
        if not patch:
            return self
        body = self._client.request("PATCH", _path("services", self.id), json=patch)
        return Services(self._client, self.project)._wrap(body)

    def pause(self) -> Service:
        return self._post("pause")

    def resume(self) -> Service:
        return self._post("resume")

    def delete(self) -> None:
        self._client.request("DELETE", _path("services", self.id))

    def executions(self, **filters: Any) -> Iterator[Execution]:
        return self._client.executions.list(service=self.id, **filters)

    def wait_ready(self, timeout: float = 300, poll_s: float = 0.5) -> models.ServiceStatus:
        """Wait until the service runs its current generation only (see `rolled_out`)."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status_report()
            if status.rolled_out(self.generation):
                return status
            if time.monotonic() >= deadline:
                raise Unfinished(f"no replica of {self.name} became ready in {timeout:g} s")
            time.sleep(poll_s)


class Services(_Resource):
    def _wrap(self, body: dict[str, Any]) -> Service:
        service = Service.model_validate(body)
        service._client = self.client
        return service

    def list(self, **filters: Any) -> Iterator[Service]:
        return (self._wrap(i) for i in self.client.pages("/services", self._scope(filters)))

    def get(self, ref: str) -> Service:
        return self._wrap(self._by_name("services", ref, "service"))


# -- executions ------------------------------------------------------------------------------


class Execution(models.Execution):
    _client: Client = PrivateAttr()

    def refresh(self) -> Execution:
        return self._client.executions.get(self.id)

    def wait(self, timeout: float | None = None) -> Execution:
        """This execution once it has ended (`Unfinished` if `timeout` seconds pass first)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        current: Execution = self
        while not current.done:
            left = 300.0 if deadline is None else max(0.0, deadline - time.monotonic())
            left = min(left, 300.0)
            body = self._client.request(
                "GET",
                _path("executions", self.id, "wait"),
                params={"timeout": left},
                timeout=httpx.Timeout(left + DEFAULT_TIMEOUT_S, connect=10.0),
            )
            current = self._client.executions._wrap(body)
            if not current.done and deadline is not None and time.monotonic() >= deadline:
                raise Unfinished(f"execution {self.id} is still {current.status}")
        return current

    def logs(self, follow: bool = False) -> Iterator[models.LogLine]:
        """The log lines so far; with `follow`, then live until the execution ends."""
        path = _path("executions", self.id, "logs")
        params = {"follow": "true"} if follow else {}
        for event in self._client.events(path, params):
            if event.event == "log":
                yield models.LogLine.model_validate(event.json())
            elif event.event == "end":
                return

    def terminate(self) -> Execution:
        body = self._client.request("POST", _path("executions", self.id, "terminate"))
        return self._client.executions._wrap(body)

    def rerun(self) -> Execution:
        body = self._client.request("POST", _path("executions", self.id, "rerun"))
        return self._client.executions._wrap(body)


class Executions:
    def __init__(self, client: Client) -> None:
        self.client = client

    def _wrap(self, body: dict[str, Any]) -> Execution:
        execution = Execution.model_validate(body)
        execution._client = self.client
        return execution

    def get(self, execution_id: str) -> Execution:
        return self._wrap(self.client.request("GET", _path("executions", execution_id)))

    def list(self, **filters: Any) -> Iterator[Execution]:
        """Every execution matching the filters (status, service, function, trigger, project,
        created_after, created_before), newest first, page after page."""
        params = {k: v for k, v in filters.items() if v is not None}
        if isinstance(params.get("status"), list | tuple):
            params["status"] = ",".join(params["status"])
        return (self._wrap(item) for item in self.client.pages("/executions", params))


# -- pipelines -------------------------------------------------------------------------------


class PipelineExecution(models.PipelineExecution):
    _client: Client = PrivateAttr()

    def wait(self, timeout: float | None = None) -> PipelineExecution:
        deadline = None if timeout is None else time.monotonic() + timeout
        current: PipelineExecution = self
        while not current.done:
            left = 300.0 if deadline is None else max(0.0, deadline - time.monotonic())
            left = min(left, 300.0)
            body = self._client.request(
                "GET",
                _path("pipeline-executions", self.id, "wait"),
                params={"timeout": left},
                timeout=httpx.Timeout(left + DEFAULT_TIMEOUT_S, connect=10.0),
            )
            current = _pipeline_execution(self._client, body)
            if not current.done and deadline is not None and time.monotonic() >= deadline:
                raise Unfinished(f"pipeline execution {self.id} is still {current.status}")
        return current

    def terminate(self) -> PipelineExecution:
        path = _path("pipeline-executions", self.id, "terminate")
        return _pipeline_execution(self._client, self._client.request("POST", path))


def _pipeline_execution(client: Client, body: dict[str, Any]) -> PipelineExecution:
    execution = PipelineExecution.model_validate(body)
    execution._client = client
    return execution


class Pipeline(models.Pipeline):
    _client: Client = PrivateAttr()

    def execute(
        self, input: dict[str, Any] | None = None, *, variables: dict[str, Any] | None = None
    ) -> PipelineExecution:
        body = {"input": input or {}, "variables": variables or {}}
        answer = self._client.request("POST", _path("pipelines", self.id, "execute"), json=body)
        return _pipeline_execution(self._client, answer)


class Pipelines(_Resource):
    def _wrap(self, body: dict[str, Any]) -> Pipeline:
        pipeline = Pipeline.model_validate(body)
        pipeline._client = self.client
        return pipeline

    def list(self) -> Iterator[Pipeline]:
        return (self._wrap(i) for i in self.client.pages("/pipelines", self._scope({})))

    def get(self, ref: str) -> Pipeline:
        return self._wrap(self._by_name("pipelines", ref, "pipeline"))
