"""Handlers for projects and tokens."""

from __future__ import annotations

from aiohttp import web

from core import auth, projects
from service.http import principal
from service.keys import DB


async def create_project(request: web.Request, body, query):
    return await projects.create_project(request.app[DB], principal(request), body)


async def list_projects(request: web.Request, body, query):
    return await projects.list_projects(
        request.app[DB],
        principal(request),
        cursor=query.cursor,
        limit=query.limit,
        order=query.order,
    )


async def get_project(request: web.Request, body, query):
    return await projects.get_project(request.app[DB], principal(request), request.match_info["id"])


async def update_project(request: web.Request, body, query):
    return await projects.update_project(
        request.app[DB], principal(request), request.match_info["id"], body
    )


async def delete_project(request: web.Request, body, query):
    await projects.delete_project(request.app[DB], principal(request), request.match_info["id"])


async def create_token(request: web.Request, body, query):
    return await auth.create_token(request.app[DB], body, by=principal(request))


async def list_tokens(request: web.Request, body, query):
    return await auth.list_tokens(
        request.app[DB],
        principal(request),
        project=query.project,
        cursor=query.cursor,
        limit=query.limit,
        order=query.order,
    )


async def delete_token(request: web.Request, body, query):
    await auth.delete_token(request.app[DB], principal(request), request.match_info["id"])


async def current_token(request: web.Request, body, query):
    return await auth.current_token(request.app[DB], principal(request))
