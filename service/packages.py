"""Handlers for packages: multipart uploads are read by hand to cap their size as they stream."""

from __future__ import annotations

import asyncio

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError
from pydantic import BaseModel, Field

from core import packages
from core.errors import BadRequest, Invalid, TooLarge, UnsupportedMediaType
from service.bodies import UNSTORABLE, UNSTORABLE_MESSAGE
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


FIELD_MAX_BYTES = 1024 * 1024  # `project` and `manifest`; the codebase has its own limit


async def _read_part(part: BodyPartReader, cap: int, too_large: str) -> bytes:
    chunks, size = [], 0
    while chunk := await part.read_chunk(256 * 1024):
        size += len(chunk)
        if size > cap:
            raise TooLarge(too_large)
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_upload(request: web.Request) -> tuple[dict[str, str], bytes, str | None]:
    settings = request.app[SETTINGS]
    cap = settings.max_upload_mb * 1024 * 1024
    if request.content_length is not None and request.content_length > cap + 64 * 1024:
        raise TooLarge(f"uploads are limited to {settings.max_upload_mb} MB")
    if request.content_type != "multipart/form-data":
        raise UnsupportedMediaType(
            "send multipart/form-data with `project`, `codebase` and optional `manifest`"
        )
    fields: dict[str, str] = {}
    codebase: bytes | None = None
    filename: str | None = None
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                continue
            if part.name == "codebase":
                filename = part.filename
                codebase = await _read_part(
                    part, cap, f"the codebase exceeds {settings.max_upload_mb} MB"
                )
            elif part.name in ("project", "manifest"):
                value = await _read_part(
                    part, FIELD_MAX_BYTES, f"the {part.name} field exceeds {FIELD_MAX_BYTES} bytes"
                )
                fields[part.name] = value.decode("utf-8", errors="replace")
                if UNSTORABLE.search(fields[part.name]):
                    raise Invalid.field(part.name, UNSTORABLE_MESSAGE)
    except (ValueError, AssertionError, LookupError, HttpProcessingError) as exc:
        # aiohttp's multipart reader says what is wrong with a malformed body this way.
        message = f"the multipart body is malformed: {exc or type(exc).__name__}"
        raise BadRequest(message, [{"field": "body", "message": message}]) from None
    if filename is not None and UNSTORABLE.search(filename):
        raise Invalid.field("codebase", f"the file name {UNSTORABLE_MESSAGE}")
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
