"""Codebases on this host: fetched from PostgreSQL once, extracted by sha256, reused."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg

from core.archives import extract_archive
from core.settings import Settings


class CodebaseCache:
    def __init__(self, settings: Settings, pool: asyncpg.Pool) -> None:
        self.root = settings.data_dir / "codebases"
        self.settings = settings
        self.pool = pool
        self._locks: dict[str, asyncio.Lock] = {}

    async def path_for(self, package_id: str, revision: int) -> Path:
        sha256 = await self.pool.fetchval(
            "SELECT codebase_sha256 FROM package_revisions WHERE package_id = $1 AND revision = $2",
            package_id,
            revision,
        )
        if sha256 is None:
            raise LookupError(f"package {package_id} has no revision {revision}")
        dest = self.root / sha256
        if dest.exists():
            return dest
        async with self._locks.setdefault(sha256, asyncio.Lock()):
            if not dest.exists():
                data = await self.pool.fetchval(
                    "SELECT data FROM codebases WHERE sha256 = $1", sha256
                )
                self.root.mkdir(parents=True, exist_ok=True)
                self.root.chmod(0o755)
                # Extraction re-checks the archive: never trust what was checked at upload.
                await asyncio.to_thread(
                    extract_archive,
                    data,
                    dest,
                    max_unpacked_bytes=self.settings.max_unpacked_mb * 1024 * 1024,
                    max_files=self.settings.max_archive_files,
                )
        return dest
