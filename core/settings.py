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
    # Worker and scheduler processes serve their own /metrics on metrics_host; 0 disables.
    metrics_host: str = "127.0.0.1"
    metrics_port_worker: int = 8701
    metrics_port_scheduler: int = 8702
    # Without a token, /metrics answers loopback clients only: its series name every service.
    metrics_token: str | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "text"] = "auto"

    # Encrypts service secrets at rest; generated into data_dir on first start when unset.
    secret_key: str | None = None

    # Limits on what clients may send. JSON bodies by kind: ordinary ones, those carrying an
    # execution's input (a function's arguments may be sizeable), and batches of executions.
    max_json_body_bytes: int = 1024 * 1024
    max_input_body_bytes: int = 4 * 1024 * 1024
    max_batch_body_bytes: int = 16 * 1024 * 1024
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
    # Docker runtime: containers kept started and waiting for new replicas of the default
    # shape (runner image, default cpu/memory/pids/network) to take over. 0 turns it off.
    warm_pool_size: int = Field(default=2, ge=0, le=64)
    lease_s: float = 15.0  # an in-progress execution's lease; heartbeats renew it
    heartbeat_s: float = 3.0
    # On SIGTERM a worker lets running executions finish within this, then hands the rest back.
    shutdown_grace_s: float = 10.0
    # A replica's consumer sleeps until an enqueue wakes it (Redis pub/sub); it also looks at
    # its queue this often, so a lost wake-up costs at most this delay. See docs/engine.md.
    queue_fallback_poll_s: float = Field(default=5.0, gt=0)
    log_max_lines: int = 10_000  # per execution, then a truncation marker
    log_max_bytes: int = 5_000_000
    default_execution_timeout_s: int = 3600
    # Failed starts of a service's replica (per generation, across workers) after which its
    # waiting executions fail `replica-failed` instead of waiting for a replica that never comes.
    replica_start_attempts: int = Field(default=3, ge=1)

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
