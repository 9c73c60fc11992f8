"""Handlers for pipeline definitions."""

from __future__ import annotations

from aiohttp import web

from core import pipelines
from core.errors import Invalid
from core.pipelines import Pipeline, PipelineCreate, PipelinePatch
from service.http import principal
from service.keys import DB
from service.queries import ProjectFilter


async def create_pipeline(request: web.Request, body: PipelineCreate, query: None) -> Pipeline:
    return await pipelines.create_pipeline(request.app[DB], principal(request), body)


async def list_pipelines(request: web.Request, body: None, query: ProjectFilter) -> dict:
    return await pipelines.list_pipelines(
        request.app[DB],
        principal(request),
        project=query.project,
        cursor=query.cursor,
        limit=query.limit,
        order=query.order,
    )


async def get_pipeline(request: web.Request, body: None, query: None) -> Pipeline:
    return await pipelines.get_pipeline(
        request.app[DB], principal(request), request.match_info["id"]
    )


async def update_pipeline(request: web.Request, body: PipelinePatch, query: None) -> Pipeline:
    return await pipelines.update_pipeline(
        request.app[DB], principal(request), request.match_info["id"], body
    )


async def delete_pipeline(request: web.Request, body: None, query: None) -> None:
    await pipelines.delete_pipeline(request.app[DB], principal(request), request.match_info["id"])


async def install_pipeline(request: web.Request, body: None, query: None) -> Pipeline:
    return await pipelines.install_pipeline(
        request.app[DB], principal(request), request.match_info["id"]
    )


async def uninstall_pipeline(request: web.Request, body: None, query: None) -> Pipeline:
    return await pipelines.uninstall_pipeline(
        request.app[DB], principal(request), request.match_info["id"]
    )


async def get_version(request: web.Request, body: None, query: None) -> Pipeline:
    raw = request.match_info["version"]
    if not raw.isdigit() or not 1 <= int(raw) <= 2**31 - 1:
        raise Invalid.field("version", "a version number: 1, 2, ...")
    return await pipelines.get_version(
        request.app[DB], principal(request), request.match_info["id"], int(raw)
    )
