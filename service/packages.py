"""Handlers for packages: multipart uploads are read by hand to cap their size as they stream."""

from __future__ import annotations

import asyncio

from aiohttp import BodyPartReader, web
from pydantic import BaseModel, Field

from core import packages
from core.errors import BadRequest, Invalid, TooLarge
from service.http import principal
from service.keys import DB, SETTINGS


class PackageUpload(BaseModel):
    """multipart/form-data fields of an upload."""

    project: str = Field(description="the project id (not needed for a new revision)")
    codebase: bytes = Field(
        description="a .zip or .tar.gz archive", json_schema_extra={"format": "binary"}
    )
    manifest: str | None = Field(
        default=None, description="the manifest as JSON or YAML; default: ferry.yaml in the archive"
    )


async def _read_upload(request: web.Request) -> tuple[dict[str, str], bytes, str | None]:
    settings = request.app[SETTINGS]
    cap = settings.max_upload_mb * 1024 * 1024
    if request.content_length is not None and request.content_length > cap + 64 * 1024:
        raise TooLarge(f"uploads are limited to {settings.max_upload_mb} MB")
    if not request.content_type.startswith("multipart/"):
        raise BadRequest(
            "send multipart/form-data with `project`, `codebase` and optional `manifest`"
        )
    fields: dict[str, str] = {}
    codebase: bytes | None = None
    filename: str | None = None
    reader = await request.multipart()
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            continue
        if part.name == "codebase":
            filename = part.filename
            chunks, size = [], 0
            while chunk := await part.read_chunk(256 * 1024):
                size += len(chunk)
                if size > cap:
                    raise TooLarge(f"the codebase exceeds {settings.max_upload_mb} MB")
                chunks.append(chunk)
            codebase = b"".join(chunks)
        elif part.name in ("project", "manifest"):
            value = await part.read(decode=True)
            if len(value) > 1024 * 1024:
                raise TooLarge(f"the {part.name} field is too large")
            fields[part.name] = value.decode("utf-8", errors="replace")
    if codebase is None:
        raise Invalid.field("codebase", "missing: attach the archive as the `codebase` file field")
    return fields, codebase, filename


async def create_package(request: web.Request, body, query):
    fields, codebase, filename = await _read_upload(request)
    if not fields.get("project"):
        raise Invalid.field("project", "missing: the id of the project the package belongs to")
    # Inspecting an archive decompresses up to the unpacked cap: off the event loop.
    manifest, info = await asyncio.to_thread(
        packages.read_upload, request.app[SETTINGS], codebase, filename, fields.get("manifest")
    )
    return await packages.create_package(
        request.app[DB], principal(request), fields["project"], manifest, info, codebase
    )


async def add_revision(request: web.Request, body, query):
    # Look the package up first so a hidden one is 404 before its upload is parsed.
    await packages.get_package(request.app[DB], principal(request), request.match_info["id"])
    fields, codebase, filename = await _read_upload(request)
    manifest, info = await asyncio.to_thread(
        packages.read_upload, request.app[SETTINGS], codebase, filename, fields.get("manifest")
    )
    return await packages.add_revision(
        request.app[DB], principal(request), request.match_info["id"], manifest, info, codebase
    )


async def list_packages(request: web.Request, body, query):
    return await packages.list_packages(
        request.app[DB],
        principal(request),
        project=query.project,
        name=query.name,
        cursor=query.cursor,
        limit=query.limit,
        order=query.order,
    )


async def get_package(request: web.Request, body, query):
    return await packages.get_package(
        request.app[DB], principal(request), request.match_info["id"], query.revision
    )


async def list_revisions(request: web.Request, body, query):
    return await packages.list_revisions(
        request.app[DB], principal(request), request.match_info["id"]
    )


async def download_codebase(request: web.Request, body, query):
    package_id = request.match_info["id"]
    data, fmt, sha256 = await packages.codebase_bytes(
        request.app[DB], principal(request), package_id, query.revision
    )
    extension = "zip" if fmt == "zip" else "tar.gz"
    return web.Response(
        body=data,
        content_type="application/zip" if fmt == "zip" else "application/gzip",
        headers={
            "Content-Disposition": f'attachment; filename="{package_id}.{extension}"',
            "ETag": f'"{sha256}"',
        },
    )


async def delete_package(request: web.Request, body, query):
    await packages.delete_package(
        request.app[DB], principal(request), request.match_info["id"], query.force
    )
