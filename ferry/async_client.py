"""Ferry's Python SDK for asyncio: `AsyncClient` is `Client` with `await`.

    async with AsyncClient() as client:
        project = await client.projects.ensure("demo")
        package = await project.packages.push("./hello")
        service = await package.deploy("hello")
        execution = await (await service.execute("greet", who="ferry")).wait()
        async for line in execution.logs(follow=True):
            print(line.text)
        async for failed in client.executions.list(status="failed"):
            ...

The resources, names, errors and models are those of `ferry.client`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import aconnect_sse
from pydantic import PrivateAttr

from ferry import models
from ferry.client import DEFAULT_TIMEOUT_S, PAGE_SIZE, _path, _resolve_url_token
from ferry.errors import (
    FerryError,
    NotFound,
    Unfinished,
    Unreachable,
    error_from_answer,
)


async def _raise_for_error(response: httpx.Response) -> None:
    if response.status_code >= 400:
        await response.aread()
        try:
            body = response.json()
        except ValueError:
            body = None
        raise error_from_answer(response.status_code, body, response.text)


class AsyncClient:
    """A connection to one Ferry for asyncio code; `async with`, or `await close()`."""

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.url, token = _resolve_url_token(url, token)
        self.http = httpx.AsyncClient(
            base_url=self.url + "/api/v1",
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(timeout, connect=10.0),
        )
        self.projects = Projects(self)
        self.packages = Packages(self, None)
        self.services = Services(self, None)
        self.executions = Executions(self)
        self.pipelines = Pipelines(self, None)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.http.aclose()

    async def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = await self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise Unreachable(self.url, str(exc) or type(exc).__name__) from None
        await _raise_for_error(response)
        return response.json() if response.content else None

    async def info(self) -> dict[str, Any]:
        return await self.request("GET", "/info")

    async def pages(
        self, path: str, params: dict[str, Any] | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        params = {"limit": PAGE_SIZE, **(params or {})}
        while True:
            page = await self.request("GET", path, params=params)
            for item in page["items"]:
                yield item
            if not page.get("next_cursor"):
                return
            params["cursor"] = page["next_cursor"]

    async def events(self, path: str, params: dict[str, Any] | None = None) -> AsyncIterator[Any]:
        timeout = httpx.Timeout(None, connect=10.0)
        try:
            async with aconnect_sse(
                self.http, "GET", path, params=params or {}, timeout=timeout
            ) as source:
                await _raise_for_error(source.response)
                async for event in source.aiter_sse():
                    yield event
        except httpx.TransportError as exc:
            raise Unreachable(self.url, str(exc) or type(exc).__name__) from None


class _Resource:
    def __init__(self, client: AsyncClient, project: str | None) -> None:
        self.client = client
        self.project = project

    def _scope(self, params: dict[str, Any]) -> dict[str, Any]:
        if self.project:
            params.setdefault("project", self.project)
        return {k: v for k, v in params.items() if v is not None}

    async def _by_name(self, collection: str, ref: str, noun: str) -> dict[str, Any]:
        try:
            return await self.client.request("GET", _path(collection, ref))
        except NotFound:
            pass
        matches = [
            item
            async for item in self.client.pages(_path(collection), self._scope({}))
            if item["name"] == ref
        ]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise NotFound(404, "not_found", f"no {noun} named {ref!r} or with that id")
        projects = ", ".join(item["project"] for item in matches)
        raise FerryError(f"{noun}s named {ref!r} in projects {projects}: name the project")


class Project(models.Project):
    _client: AsyncClient = PrivateAttr()

    @property
    def packages(self) -> Packages:
        return Packages(self._client, self.id)

    @property
    def services(self) -> Services:
        return Services(self._client, self.id)

    @property
    def pipelines(self) -> Pipelines:
        return Pipelines(self._client, self.id)


class Projects(_Resource):
    def __init__(self, client: AsyncClient) -> None:
        super().__init__(client, None)

    def _wrap(self, body: dict[str, Any]) -> Project:
        project = Project.model_validate(body)
        project._client = self.client
        return project

    async def list(self) -> AsyncIterator[Project]:
        async for item in self.client.pages("/projects"):
            yield self._wrap(item)

    async def get(self, ref: str) -> Project:
        return self._wrap(await self._by_name("projects", ref, "project"))

    async def create(self, name: str, description: str = "") -> Project:
        body = {"name": name, "description": description}
        return self._wrap(await self.client.request("POST", "/projects", json=body))

    async def ensure(self, name: str) -> Project:
        try:
            return await self.get(name)
        except NotFound:
            return await self.create(name)


class Package(models.Package):
    _client: AsyncClient = PrivateAttr()
    _unchanged: bool = PrivateAttr(default=False)

    @property
    def unchanged(self) -> bool:
        return self._unchanged

    async def deploy(
        self, name: str | None = None, *, secrets: dict[str, str] | None = None, **settings: Any
    ) -> Service:
        services = Services(self._client, self.project)
        name = name or self.name
        try:
            current = await services.get(name)
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
            return services._wrap(await self._client.request("POST", "/services", json=body))
        return await current.update(package_revision=self.revision, secrets=secrets, **settings)


class Packages(_Resource):
    def _wrap(self, body: dict[str, Any]) -> Package:
        package = Package.model_validate(body)
        package._client = self.client
        return package

    async def list(self, name: str | None = None) -> AsyncIterator[Package]:
        async for item in self.client.pages("/packages", self._scope({"name": name})):
            yield self._wrap(item)

    async def get(self, ref: str, revision: int | None = None) -> Package:
        package = self._wrap(await self._by_name("packages", ref, "package"))
        if revision is not None and revision != package.revision:
            path = _path("packages", package.id)
            body = await self.client.request("GET", path, params={"revision": revision})
            package = self._wrap(body)
        return package

    async def push(self, folder: str | Path) -> Package:
        from ferry.folder import Limits, bundle

        if not self.project:
            raise FerryError("push needs a project: (await client.projects.get(NAME)).packages")
        limits = (await self.client.info())["limits"]
        built = await asyncio.to_thread(
            bundle,
            Path(folder),
            Limits(
                max_upload_bytes=limits["max_upload_bytes"],
                max_unpacked_bytes=limits["max_unpacked_bytes"],
                max_files=limits["max_archive_files"],
            ),
        )
        existing = [
            p async for p in self.list(name=built.manifest.name) if p.project == self.project
        ]
        files = {"codebase": ("codebase.zip", built.archive, "application/zip")}
        if existing:
            latest = existing[0]
            if latest.revision != latest.latest_revision:
                latest = await self.get(latest.id, revision=latest.latest_revision)
            if latest.codebase.sha256 == built.sha256:
                latest._unchanged = True
                return latest
            path = _path("packages", latest.id, "revisions")
            return self._wrap(await self.client.request("POST", path, files=files))
        data = {"project": self.project}
        return self._wrap(await self.client.request("POST", "/packages", data=data, files=files))


class Service(models.Service):
    _client: AsyncClient = PrivateAttr()

    async def execute(
        self,
        function: str,
        input: dict[str, Any] | None = None,
        *,
        wait: float = 0,
        idempotency_key: str | None = None,
        **inputs: Any,
    ) -> Execution:
        body: dict[str, Any] = {
            "service": self.id,
            "function": function,
            "input": {**(input or {}), **inputs},
        }
        if idempotency_key:
            body["idempotency_key"] = idempotency_key
        params = {"wait": wait} if wait else {}
        timeout = httpx.Timeout(wait + DEFAULT_TIMEOUT_S, connect=10.0)
        answer = await self._client.request(
            "POST", "/executions", json=body, params=params, timeout=timeout
        )
        return self._client.executions._wrap(answer)

    async def status_report(self) -> models.ServiceStatus:
        body = await self._client.request("GET", _path("services", self.id, "status"))
        return models.ServiceStatus.model_validate(body)

    async def update(self, *, secrets: dict[str, str] | None = None, **changes: Any) -> Service:
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
        body = await self._client.request("PATCH", _path("services", self.id), json=patch)
        return Services(self._client, self.project)._wrap(body)

    async def pause(self) -> Service:
        body = await self._client.request("POST", _path("services", self.id, "pause"))
        return Services(self._client, self.project)._wrap(body)

    async def resume(self) -> Service:
        body = await self._client.request("POST", _path("services", self.id, "resume"))
        return Services(self._client, self.project)._wrap(body)

    async def delete(self) -> None:
        await self._client.request("DELETE", _path("services", self.id))


class Services(_Resource):
    def _wrap(self, body: dict[str, Any]) -> Service:
        service = Service.model_validate(body)
        service._client = self.client
        return service

    async def list(self, **filters: Any) -> AsyncIterator[Service]:
        async for item in self.client.pages("/services", self._scope(filters)):
            yield self._wrap(item)

    async def get(self, ref: str) -> Service:
        return self._wrap(await self._by_name("services", ref, "service"))


class Execution(models.Execution):
    _client: AsyncClient = PrivateAttr()

    async def refresh(self) -> Execution:
        return await self._client.executions.get(self.id)

    async def wait(self, timeout: float | None = None) -> Execution:  # noqa: ASYNC109 - as Client
        deadline = None if timeout is None else time.monotonic() + timeout
        current: Execution = self
        while not current.done:
            left = 300.0 if deadline is None else max(0.0, deadline - time.monotonic())
            left = min(left, 300.0)
            body = await self._client.request(
                "GET",
                _path("executions", self.id, "wait"),
                params={"timeout": left},
                timeout=httpx.Timeout(left + DEFAULT_TIMEOUT_S, connect=10.0),
            )
            current = self._client.executions._wrap(body)
            if not current.done and deadline is not None and time.monotonic() >= deadline:
                raise Unfinished(f"execution {self.id} is still {current.status}")
        return current

    async def logs(self, follow: bool = False) -> AsyncIterator[models.LogLine]:
        path = _path("executions", self.id, "logs")
        params = {"follow": "true"} if follow else {}
        async for event in self._client.events(path, params):
            if event.event == "log":
                yield models.LogLine.model_validate(event.json())
            elif event.event == "end":
                return

    async def terminate(self) -> Execution:
        body = await self._client.request("POST", _path("executions", self.id, "terminate"))
        return self._client.executions._wrap(body)

    async def rerun(self) -> Execution:
        body = await self._client.request("POST", _path("executions", self.id, "rerun"))
        return self._client.executions._wrap(body)


class Executions:
    def __init__(self, client: AsyncClient) -> None:
        self.client = client

    def _wrap(self, body: dict[str, Any]) -> Execution:
        execution = Execution.model_validate(body)
        execution._client = self.client
        return execution

    async def get(self, execution_id: str) -> Execution:
        return self._wrap(await self.client.request("GET", _path("executions", execution_id)))

    async def list(self, **filters: Any) -> AsyncIterator[Execution]:
        params = {k: v for k, v in filters.items() if v is not None}
        if isinstance(params.get("status"), list | tuple):
            params["status"] = ",".join(params["status"])
        async for item in self.client.pages("/executions", params):
            yield self._wrap(item)


class PipelineExecution(models.PipelineExecution):
    _client: AsyncClient = PrivateAttr()

    async def wait(self, timeout: float | None = None) -> PipelineExecution:  # noqa: ASYNC109 - as Client
        deadline = None if timeout is None else time.monotonic() + timeout
        current: PipelineExecution = self
        while not current.done:
            left = 300.0 if deadline is None else max(0.0, deadline - time.monotonic())
            left = min(left, 300.0)
            body = await self._client.request(
                "GET",
                _path("pipeline-executions", self.id, "wait"),
                params={"timeout": left},
                timeout=httpx.Timeout(left + DEFAULT_TIMEOUT_S, connect=10.0),
            )
            current = _pipeline_execution(self._client, body)
            if not current.done and deadline is not None and time.monotonic() >= deadline:
                raise Unfinished(f"pipeline execution {self.id} is still {current.status}")
        return current


def _pipeline_execution(client: AsyncClient, body: dict[str, Any]) -> PipelineExecution:
    execution = PipelineExecution.model_validate(body)
    execution._client = client
    return execution


class Pipeline(models.Pipeline):
    _client: AsyncClient = PrivateAttr()

    async def execute(
        self, input: dict[str, Any] | None = None, *, variables: dict[str, Any] | None = None
    ) -> PipelineExecution:
        body = {"input": input or {}, "variables": variables or {}}
        path = _path("pipelines", self.id, "execute")
        return _pipeline_execution(
            self._client, await self._client.request("POST", path, json=body)
        )


class Pipelines(_Resource):
    def _wrap(self, body: dict[str, Any]) -> Pipeline:
        pipeline = Pipeline.model_validate(body)
        pipeline._client = self.client
        return pipeline

    async def list(self) -> AsyncIterator[Pipeline]:
        async for item in self.client.pages("/pipelines", self._scope({})):
            yield self._wrap(item)

    async def get(self, ref: str) -> Pipeline:
        return self._wrap(await self._by_name("pipelines", ref, "pipeline"))
