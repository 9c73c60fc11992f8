"""What a replica needs of its service, read from PostgreSQL once when the replica starts:
the manifest of its package revision, its runtime, and its secrets, decrypted here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import asyncpg

from core.manifest import FunctionSpec, Manifest, find_module
from core.packages import load_manifest
from core.secrets import SecretBox


@dataclass
class ServiceConfig:
    """A service as one of its replicas runs it."""

    id: str
    project_id: str
    generation: int
    runtime: dict[str, Any]
    on_reset: str
    manifest: Manifest
    module: str
    env: dict[str, str]
    secrets: dict[str, str]
    init_inputs: dict[str, Any]
    package_id: str
    package_revision: int
    functions: dict[str, FunctionSpec] = field(default_factory=dict)

    def __post_init__(self) -> None:
        module = find_module(self.manifest, self.module)
        self.functions = {f.name: f for f in module.functions}


async def load_service_config(
    pool: asyncpg.Pool, secret_box: SecretBox, service_id: str
) -> ServiceConfig:
    row = await pool.fetchrow("SELECT * FROM services WHERE id = $1", service_id)
    manifest = await load_manifest(pool, row["package_id"], row["package_revision"])
    return ServiceConfig(
        id=row["id"],
        project_id=row["project_id"],
        generation=row["generation"],
        runtime=row["runtime"],
        on_reset=row["on_reset"],
        manifest=manifest,
        module=row["module"],
        env=row["env"],
        secrets={k: secret_box.decrypt(v) for k, v in row["secrets"].items()},
        init_inputs=row["init_inputs"],
        package_id=row["package_id"],
        package_revision=row["package_revision"],
    )
