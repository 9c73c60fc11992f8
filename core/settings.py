"""All of Ferry's configuration, loaded once from `FERRY_*` environment variables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "ferry"


class Settings(BaseSettings):
    """Ferry's settings. Every field reads `FERRY_<NAME>` from the environment."""

    model_config = SettingsConfigDict(env_prefix="FERRY_", extra="ignore")

    # Where state lives. Unset URLs mean "start the embedded server under data_dir".
    database_url: str | None = None
    redis_url: str | None = None
    data_dir: Path = Field(default_factory=_default_data_dir)

    api_host: str = "127.0.0.1"
    api_port: int = 8700
    # Worker and scheduler processes serve their own /metrics on api_host; 0 disables.
    metrics_port_worker: int = 8701
    metrics_port_scheduler: int = 8702
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "text"] = "auto"

    # Encrypts service secrets at rest; generated into data_dir on first start when unset.
    secret_key: str | None = None

    # Limits on what clients may send.
    max_upload_mb: int = 50
    max_unpacked_mb: int = 200
    max_archive_files: int = 10_000
    list_default_limit: int = 50
    list_max_limit: int = 1000
    batch_max: int = 1000

    # Execution engine.
    worker_id: str | None = None  # default: hostname-pid
    worker_capacity: int = 8  # replicas this worker process may host
    runtime: Literal["auto", "docker", "process"] = "auto"
    runner_image: str = "ferry/runner:py3"
    lease_s: float = 15.0  # an in-progress execution's lease; heartbeats renew it
    heartbeat_s: float = 3.0
    poll_delay_s: float = 0.005  # arq poll delay: latency vs. Redis load, see docs/engine.md
    log_max_lines: int = 10_000  # per execution, then a truncation marker
    log_max_bytes: int = 5_000_000
    default_execution_timeout_s: int = 3600

    # Scheduler.
    reconcile_interval_s: float = 1.0
    retention_days: float = 14.0
    misfire_run_all_cap: int = 100

    @property
    def runtime_dir(self) -> Path:
        """Unix sockets of replicas; kept short because socket paths are limited to 107 bytes."""
        return self.data_dir / "run"

    @property
    def embedded_database(self) -> bool:
        return self.database_url is None

    @property
    def embedded_redis(self) -> bool:
        return self.redis_url is None
