"""Packages and their revisions: a codebase archive plus its manifest of functions.

Revisions are immutable, so their parsed manifests are cached per process; the hot path
of `POST /executions` validates input without reading the manifest from PostgreSQL.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from core.archives import inspect_archive
from core.auth import Principal, Role
from core.errors import Conflict, Invalid, NotFound
from core.ids import new_id
from core.manifest import Manifest, check_entry_points, parse_manifest
from core.models import Model, Timestamp
from core.pagination import Keyset, Order, page_of
from core.settings import Settings


class CodebaseInfo(Model):
    sha256: str
    size: int


class Package(Model):
    id: str
    project: str
    name: str
    revision: int
    latest_revision: int
    description: str
    requirements: list[str]
    modules: list[dict[str, Any]]
    codebase: CodebaseInfo
    created_at: Timestamp
    updated_at: Timestamp


class RevisionSummary(Model):
    revision: int
    codebase: CodebaseInfo
    created_at: Timestamp


_manifest_cache: dict[tuple[str, int], Manifest] = {}


def _package(row: asyncpg.Record) -> Package:
    manifest = row["manifest"]
    return Package(
        id=row["id"],
        project=row["project_id"],
        name=row["name"],
        revision=row["revision"],
        latest_revision=row["latest_revision"],
        description=manifest.get("description", ""),
        requirements=manifest.get("requirements", []),
        modules=manifest["modules"],
        codebase=CodebaseInfo(sha256=row["codebase_sha256"], size=row["size"]),
        created_at=row["revision_created_at"],
        updated_at=row["updated_at"],
    )


_SELECT = """
    SELECT p.*, r.revision, r.manifest, r.codebase_sha256, r.created_at AS revision_created_at,
           c.size
    FROM packages p
    JOIN package_revisions r ON r.package_id = p.id
    JOIN codebases c ON c.sha256 = r.codebase_sha256
"""


def read_upload(
    settings: Settings, codebase: bytes, filename: str | None, manifest_field: str | None
) -> tuple[Manifest, Any]:
    """Check an uploaded archive and find its manifest: the form field wins over ferry.yaml."""
    info = inspect_archive(
        codebase,
        filename,
        max_unpacked_bytes=settings.max_unpacked_mb * 1024 * 1024,
        max_files=settings.max_archive_files,
    )
    if manifest_field:
        manifest = parse_manifest(manifest_field, "manifest")
    elif info.manifest_text is not None:
        manifest = parse_manifest(info.manifest_text, "ferry.yaml")
    else:
        raise Invalid.field(
            "manifest", "no manifest: send a `manifest` field or put ferry.yaml at the archive root"
        )
    check_entry_points(manifest, info.files)
    return manifest, info


async def _store_revision(
    conn: asyncpg.Connection,
    package_id: str,
    revision: int,
    manifest: Manifest,
    info: Any,
    codebase: bytes,
) -> None:
    await conn.execute(
        """INSERT INTO codebases (sha256, size, format, data) VALUES ($1, $2, $3, $4)
           ON CONFLICT (sha256) DO NOTHING""",
        info.sha256,
        info.size,
        info.format,
        codebase,
    )
    await conn.execute(
        """INSERT INTO package_revisions (package_id, revision, manifest, codebase_sha256)
           VALUES ($1, $2, $3, $4)""",
        package_id,
        revision,
        manifest.model_dump(mode="json", exclude_unset=False),
        info.sha256,
    )


async def create_package(
    pool: asyncpg.Pool,
    by: Principal,
    project_id: str,
    manifest: Manifest,
    info: Any,
    codebase: bytes,
) -> Package:
    by.require(Role.developer, project_id)
    async with pool.acquire() as conn, conn.transaction():
        if not await conn.fetchval("SELECT 1 FROM projects WHERE id = $1", project_id):
            raise NotFound("project not found")
        package_id = new_id()
        try:
            await conn.execute(
                """INSERT INTO packages (id, project_id, name, latest_revision)
                   VALUES ($1, $2, $3, 1)""",
                package_id,
                project_id,
                manifest.name,
            )
        except asyncpg.UniqueViolationError:
            raise Conflict(
                f"a package named {manifest.name!r} exists in this project; "
                "upload a new revision with POST /api/v1/packages/{id}/revisions"
            ) from None
        await _store_revision(conn, package_id, 1, manifest, info, codebase)
        row = await conn.fetchrow(_SELECT + " WHERE p.id = $1 AND r.revision = 1", package_id)
    return _package(row)


async def add_revision(
    pool: asyncpg.Pool,
    by: Principal,
    package_id: str,
    manifest: Manifest,
    info: Any,
    codebase: bytes,
) -> Package:
    async with pool.acquire() as conn, conn.transaction():
        current = await conn.fetchrow(
            "SELECT project_id, name, latest_revision FROM packages WHERE id = $1 FOR UPDATE",
            package_id,
        )
        if current is None or not by.can_see(current["project_id"]):
            raise NotFound("package not found")
        by.require(Role.developer, current["project_id"])
        if manifest.name != current["name"]:
            raise Invalid.field(
                "manifest.name", f"must stay {current['name']!r} across revisions of a package"
            )
        revision = current["latest_revision"] + 1
        await conn.execute(
            "UPDATE packages SET latest_revision = $2, updated_at = now() WHERE id = $1",
            package_id,
            revision,
        )
        await _store_revision(conn, package_id, revision, manifest, info, codebase)
        row = await conn.fetchrow(
            _SELECT + " WHERE p.id = $1 AND r.revision = $2", package_id, revision
        )
    return _package(row)


async def get_package(
    pool: asyncpg.Pool, by: Principal, package_id: str, revision: int | None = None
) -> Package:
    row = await pool.fetchrow(
        _SELECT + " WHERE p.id = $1 AND r.revision = coalesce($2, p.latest_revision)",
        package_id,
        revision,
    )
    if row is None or not by.can_see(row["project_id"]):
        if revision is not None and row is None:
            exists = await pool.fetchrow(
                "SELECT project_id FROM packages WHERE id = $1", package_id
            )
            if exists and by.can_see(exists["project_id"]):
                raise NotFound(f"package has no revision {revision}")
        raise NotFound("package not found")
    return _package(row)


async def list_packages(
    pool: asyncpg.Pool,
    by: Principal,
    *,
    project: str | None,
    name: str | None,
    cursor: str | None,
    limit: int,
    order: Order,
) -> dict:
    query = Keyset()
    query.where("r.revision = p.latest_revision")
    project = by.project_filter(project)
    if project is not None:
        query.where("p.project_id = {}", project)
    if name is not None:
        query.where("p.name = {}", name)
    rows = await pool.fetch(_SELECT + query.tail(cursor, order, limit, alias="p"), *query.args)
    return page_of(rows, limit, _package)


async def list_revisions(pool: asyncpg.Pool, by: Principal, package_id: str) -> dict:
    await get_package(pool, by, package_id)
    rows = await pool.fetch(
        """SELECT r.revision, r.created_at, r.codebase_sha256, c.size FROM package_revisions r
           JOIN codebases c ON c.sha256 = r.codebase_sha256
           WHERE r.package_id = $1 ORDER BY r.revision""",
        package_id,
    )
    items = [
        RevisionSummary(
            revision=r["revision"],
            codebase=CodebaseInfo(sha256=r["codebase_sha256"], size=r["size"]),
            created_at=r["created_at"],
        )
        for r in rows
    ]
    return {"items": items, "next_cursor": None}


async def codebase_bytes(
    pool: asyncpg.Pool, by: Principal | None, package_id: str, revision: int | None = None
) -> tuple[bytes, str, str]:
    """The archive of a revision: (data, format, sha256). `by=None` is the worker's path."""
    row = await pool.fetchrow(
        """SELECT p.project_id, c.data, c.format, c.sha256 FROM packages p
           JOIN package_revisions r ON r.package_id = p.id
           JOIN codebases c ON c.sha256 = r.codebase_sha256
           WHERE p.id = $1 AND r.revision = coalesce($2, p.latest_revision)""",
        package_id,
        revision,
    )
    if row is None or (by is not None and not by.can_see(row["project_id"])):
        raise NotFound("package or revision not found")
    return row["data"], row["format"], row["sha256"]


async def delete_package(pool: asyncpg.Pool, by: Principal, package_id: str, force: bool) -> None:
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            "SELECT project_id FROM packages WHERE id = $1 FOR UPDATE", package_id
        )
        if row is None or not by.can_see(row["project_id"]):
            raise NotFound("package not found")
        by.require(Role.owner, row["project_id"])
        users = await conn.fetch("SELECT id, name FROM services WHERE package_id = $1", package_id)
        if users and not force:
            names = ", ".join(u["name"] for u in users)
            raise Conflict(
                f"services use this package ({names}); delete them first or pass ?force=true"
            )
        await conn.execute("DELETE FROM services WHERE package_id = $1", package_id)
        await conn.execute("DELETE FROM packages WHERE id = $1", package_id)


async def load_manifest(
    conn: asyncpg.Connection | asyncpg.Pool, package_id: str, revision: int
) -> Manifest:
    key = (package_id, revision)
    manifest = _manifest_cache.get(key)
    if manifest is None:
        data = await conn.fetchval(
            "SELECT manifest FROM package_revisions WHERE package_id = $1 AND revision = $2",
            package_id,
            revision,
        )
        if data is None:
            raise NotFound(f"package revision {revision} not found")
        manifest = parse_manifest(data, "stored manifest")
        _manifest_cache[key] = manifest
    return manifest
