"""Projects: the tenancy boundary. Every other object belongs to exactly one."""

from __future__ import annotations

import asyncpg
from pydantic import Field

from core.auth import Principal, Role
from core.errors import Conflict, Forbidden, NotFound
from core.ids import new_id
from core.models import Description, Model, Request, Timestamp
from core.pagination import Keyset, Order, page_of

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"


class ProjectCreate(Request):
    name: str = Field(pattern=NAME_PATTERN)
    description: Description = ""


class ProjectPatch(Request):
    name: str | None = Field(default=None, pattern=NAME_PATTERN)
    description: Description | None = None


class Project(Model):
    id: str
    name: str
    description: str
    created_at: Timestamp
    updated_at: Timestamp


async def create_project(conn: asyncpg.Pool, by: Principal, body: ProjectCreate) -> Project:
    if not by.is_admin:
        raise Forbidden("only an admin token may create projects")
    try:
        row = await conn.fetchrow(
            "INSERT INTO projects (id, name, description) VALUES ($1, $2, $3) RETURNING *",
            new_id(),
            body.name,
            body.description,
        )
    except asyncpg.UniqueViolationError:
        raise Conflict(f"a project named {body.name!r} exists already") from None
    return Project.model_validate(dict(row))


async def get_project(conn: asyncpg.Pool, by: Principal, project_id: str) -> Project:
    by.check_visible(project_id, "project")
    row = await conn.fetchrow("SELECT * FROM projects WHERE id = $1", project_id)
    if row is None:
        raise NotFound("project not found")
    return Project.model_validate(dict(row))


async def list_projects(
    conn: asyncpg.Pool, by: Principal, *, cursor: str | None, limit: int, order: Order
) -> dict:
    query = Keyset()
    if not by.is_admin:
        query.where("id = {}", by.project_id)
    rows = await conn.fetch(
        f"SELECT * FROM projects {query.tail(cursor, order, limit)}", *query.args
    )
    return page_of(rows, limit, lambda r: Project.model_validate(dict(r)))


async def update_project(
    conn: asyncpg.Pool, by: Principal, project_id: str, body: ProjectPatch
) -> Project:
    by.require(Role.owner, project_id)
    try:
        row = await conn.fetchrow(
            """UPDATE projects SET name = coalesce($2, name),
                   description = coalesce($3, description), updated_at = now()
               WHERE id = $1 RETURNING *""",
            project_id,
            body.name,
            body.description,
        )
    except asyncpg.UniqueViolationError:
        raise Conflict(f"a project named {body.name!r} exists already") from None
    if row is None:
        raise NotFound("project not found")
    return Project.model_validate(dict(row))


async def delete_project(conn: asyncpg.Pool, by: Principal, project_id: str) -> None:
    if not by.is_admin:
        by.check_visible(project_id, "project")
        raise Forbidden("only an admin token may delete projects")
    deleted = await conn.fetchval("DELETE FROM projects WHERE id = $1 RETURNING id", project_id)
    if deleted is None:
        raise NotFound("project not found")
