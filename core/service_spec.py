"""What a service runs with (its runtime, its environment's names), checked without a
database: the API's service bodies and the `service:` section of ferry.yaml share them."""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field, model_validator

from core.models import Request

NAME_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class Runtime(Request):
    image: str | None = None  # None: the default runner image (plus the package's requirements)
    cpu: float = Field(default=1.0, gt=0, le=64)
    memory_mb: int = Field(default=512, ge=32, le=262_144)
    concurrency: int = Field(default=4, ge=1, le=1000)
    min_replicas: int = Field(default=0, ge=0, le=100)
    max_replicas: int = Field(default=2, ge=0, le=100)
    target_queue_per_replica: int = Field(default=10, ge=1, le=100_000)
    idle_timeout_s: int = Field(default=300, ge=0, le=7 * 86400)
    network: bool = True
    pids_limit: int = Field(default=256, ge=16, le=65_536)
    # 1: a fresh process per execution, nothing carried over. More: a process runs up to
    # this many executions one after another (module state and warm caches carry over).
    executions_per_process: int = Field(default=1, ge=1, le=100_000)

    @model_validator(mode="after")
    def _replica_bounds(self) -> Runtime:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self


def check_env(value: dict[str, Any] | None) -> dict[str, Any] | None:
    # None: a PATCH leaving `env` (or `secrets`) as it is.
    for name in value or {}:
        if not _ENV_NAME.match(name) or name.startswith("FERRY_"):
            raise ValueError(f"{name!r} is not a usable environment variable name")
    return value
