"""Bearer tokens, roles and who may see what.

Tokens are random secrets shown once; only their sha256 is stored. `admin` is global; the
other roles are scoped to one project: viewer reads, developer also creates and runs,
owner also manages tokens and deletes.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

import asyncpg

from core.errors import Forbidden, Invalid, NotFound, Unauthorized
from core.ids import new_id
from core.models import Model, Name, Request, Timestamp
from core.pagination import Keyset, Order, page_of

TOKEN_PREFIX = "fry_"


class Role(StrEnum):
    viewer = "viewer"
    developer = "developer"
    owner = "owner"
    admin = "admin"


_RANK = {Role.viewer: 0, Role.developer: 1, Role.owner: 2, Role.admin: 3}


@dataclass(frozen=True)
class Principal:
    """Who is calling: resolved once per request from the bearer token."""

    token_id: str
    role: Role
    project_id: str | None  # None for admin

    @property
    def is_admin(self) -> bool:
        return self.role is Role.admin

    def can_see(self, project_id: str) -> bool:
        return self.is_admin or self.project_id == project_id

    def check_visible(self, project_id: str, what: str = "object") -> None:
        """Objects of projects the token cannot see do not exist, as far as it knows (404)."""
        if not self.can_see(project_id):
            raise NotFound(f"{what} not found")

    def require(self, role: Role, project_id: str | None = None) -> None:
        """Raise 404 for an invisible project, 403 for a role too low to act."""
        if project_id is not None:
            self.check_visible(project_id)
        if _RANK[self.role] < _RANK[role]:
            raise Forbidden(f"this needs the {role} role; the token has {self.role}")

    def project_filter(self, requested: str | None) -> str | None:
        """The project a list should be limited to: the token's own unless it is admin."""
        if self.is_admin:
            return requested
        if requested is not None and requested != self.project_id:
            raise NotFound("project not found")
        return self.project_id


def hash_secret(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def new_secret() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


class TokenCreate(Request):
    name: Name
    role: Role
    project: str | None = None
    expires_at: datetime | None = None


class Token(Model):
    id: str
    name: str
    role: Role
    project: str | None
    prefix: str
    created_at: Timestamp
    expires_at: Timestamp | None
    last_used_at: Timestamp | None


class TokenCreated(Token):
    token: str  # the secret: returned once, never again


def _token(row: asyncpg.Record) -> Token:
    return Token(**{**dict(row), "project": row["project_id"]})


async def authenticate(conn: asyncpg.Connection | asyncpg.Pool, secret: str | None) -> Principal:
    if not secret:
        raise Unauthorized("missing bearer token: send 'Authorization: Bearer <token>'")
    row = await conn.fetchrow(
        """UPDATE tokens SET last_used_at = now()
           WHERE secret_hash = $1 AND (expires_at IS NULL OR expires_at > now())
           RETURNING id, role, project_id""",
        hash_secret(secret),
    )
    if row is None:
        raise Unauthorized("invalid or expired token")
    return Principal(row["id"], Role(row["role"]), row["project_id"])


async def create_token(
    conn: asyncpg.Connection | asyncpg.Pool, body: TokenCreate, *, by: Principal | None
) -> TokenCreated:
    """Create a token; `by=None` is the bootstrap path (`ferry up`, `ferry token create`)."""
    if body.role is Role.admin:
        if body.project is not None:
            raise Invalid.field("project", "an admin token is global: leave project out")
        if by is not None and not by.is_admin:
            raise Forbidden("only an admin may create admin tokens")
    else:
        if body.project is None:
            raise Invalid.field("project", f"a {body.role} token needs a project")
        if by is not None:
            by.require(Role.owner, body.project)
        if not await conn.fetchval("SELECT 1 FROM projects WHERE id = $1", body.project):
            raise Invalid.field("project", "no such project")
    secret = new_secret()
    row = await conn.fetchrow(
        """INSERT INTO tokens (id, name, role, project_id, secret_hash, prefix, expires_at)
           VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING *""",
        new_id(),
        body.name,
        body.role.value,
        body.project,
        hash_secret(secret),
        secret[: len(TOKEN_PREFIX) + 6],
        body.expires_at,
    )
    return TokenCreated(**_token(row).model_dump(), token=secret)


async def list_tokens(
    conn: asyncpg.Pool,
    by: Principal,
    *,
    project: str | None,
    cursor: str | None,
    limit: int,
    order: Order,
) -> dict:
    by.require(Role.owner)
    query = Keyset()
    project = by.project_filter(project)
    if project is not None:
        query.where("project_id = {}", project)
    rows = await conn.fetch(f"SELECT * FROM tokens {query.tail(cursor, order, limit)}", *query.args)
    return page_of(rows, limit, _token)


async def current_token(conn: asyncpg.Pool, by: Principal) -> Token:
    """The caller's own token: its role and project, so a client can show only what it may do."""
    row = await conn.fetchrow("SELECT * FROM tokens WHERE id = $1", by.token_id)
    if row is None:  # revoked since the principal was cached
        raise Unauthorized("invalid or expired token")
    return _token(row)


async def delete_token(conn: asyncpg.Pool, by: Principal, token_id: str) -> None:
    row = await conn.fetchrow("SELECT project_id, role FROM tokens WHERE id = $1", token_id)
    if row is None or (row["project_id"] is None and not by.is_admin):
        raise NotFound("token not found")
    if row["project_id"] is not None:
        by.require(Role.owner, row["project_id"])
    await conn.execute("DELETE FROM tokens WHERE id = $1", token_id)


async def fetch_visible(
    conn: asyncpg.Connection | asyncpg.Pool, by: Principal, table: str, row_id: str, what: str
) -> asyncpg.Record:
    """A row by id, or 404 when it does not exist or belongs to a project `by` cannot see.

    `table` is always a constant of the calling store, never client input.
    """
    row = await conn.fetchrow(f"SELECT * FROM {table} WHERE id = $1", row_id)
    if row is None or not by.can_see(row["project_id"]):
        raise NotFound(f"{what} not found")
    return row
