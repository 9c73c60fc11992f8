"""The API's response bodies as the SDK sees them, with only pydantic behind them.

Each model names the OpenAPI schema it mirrors (`SCHEMAS`); tests/test_sdk.py checks their
fields against `/api/openapi.json` and parses every answer the tests get into them, so a
field added or renamed on the server fails the tests until it is added here.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict

TERMINAL = frozenset({"success", "failed", "terminated"})


class ApiModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Project(ApiModel):
    id: str
    name: str
    description: str
    created_at: datetime
    updated_at: datetime


class CodebaseInfo(ApiModel):
    sha256: str
    size: int


class Package(ApiModel):
    id: str
    project: str
    name: str
    revision: int
    latest_revision: int
    description: str
    requirements: list[str]
    modules: list[dict[str, Any]]
    codebase: CodebaseInfo
    created_at: datetime
    updated_at: datetime


class RevisionSummary(ApiModel):
    revision: int
    codebase: CodebaseInfo
    created_at: datetime


class Runtime(ApiModel):
    image: str | None = None
    cpu: float = 1.0
    memory_mb: int = 512
    concurrency: int = 4
    min_replicas: int = 0
    max_replicas: int = 2
    target_queue_per_replica: int = 10
    idle_timeout_s: int = 300
    network: bool = True
    pids_limit: int = 256
    executions_per_process: int = 1


class Service(ApiModel):
    id: str
    project: str
    name: str
    package: str
    package_revision: int
    module: str
    runtime: Runtime
    execution_timeout_s: int
    max_attempts: int
    on_reset: str
    env: dict[str, str]
    secrets: list[str]
    init_inputs: dict[str, Any]
    status: str
    generation: int
    created_at: datetime
    updated_at: datetime


class ReplicaStatus(ApiModel):
    id: str
    host: str
    status: str
    running: int
    generation: int
    message: str | None
    started_at: datetime


class ServiceStatus(ApiModel):
    queue_length: int
    in_progress: int
    desired_replicas: int
    replicas: list[ReplicaStatus]
    last_failure: ReplicaStatus | None = None

    def rolled_out(self, generation: int) -> bool:
        """A replica of `generation` is ready and none older takes executions any more.

        Older replicas drain once a new one is ready; until they do, an execution created
        now could still run on the code it replaced, so a deploy is done only after that.
        """
        current_ready = any(
            r.generation >= generation and r.status == "ready" for r in self.replicas
        )
        older_taking = any(
            r.generation < generation and r.status in ("starting", "ready") for r in self.replicas
        )
        return current_ready and not older_taking


class Progress(ApiModel):
    percent: float = 0
    message: str | None = None


class StatusLogEntry(ApiModel):
    status: str
    at: str
    message: str | None = None
    attempt: int | None = None
    reason: str | None = None


class Execution(ApiModel):
    id: str
    project: str
    service: str
    function: str
    status: str
    reason: str | None
    input: dict[str, Any]
    output: Any
    error: dict[str, Any] | None
    progress: Progress
    attempt: int
    max_attempts: int
    timeout_s: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    duration_ms: int | None
    trigger: str | None
    pipeline_execution: str | None
    pipeline_node: str | None = None
    rerun_of: str | None
    idempotency_key: str | None
    status_log: list[StatusLogEntry]
    trigger_fire_time: datetime | None = None

    @property
    def done(self) -> bool:
        return self.status in TERMINAL


class LogLine(ApiModel):
    seq: int
    at: datetime
    stream: str
    text: str


class Pipeline(ApiModel):
    id: str
    project: str
    name: str
    description: str
    version: int
    installed: bool
    variables: list[dict[str, Any]]
    nodes: list[dict[str, Any]]
    connections: list[dict[str, Any]]
    settings: dict[str, Any]
    created_at: datetime
    updated_at: datetime


class PipelineExecution(ApiModel):
    id: str
    project: str
    pipeline: str
    version: int
    status: str
    input: dict[str, Any]
    variables: dict[str, Any]
    output: Any
    error: Any
    nodes: Any
    trigger: str | None
    idempotency_key: str | None
    round: int
    created_at: datetime
    started_at: datetime | None
    ended_at: datetime | None

    @property
    def done(self) -> bool:
        return self.status in TERMINAL


# model -> the OpenAPI component schema it mirrors
SCHEMAS: dict[type[ApiModel], str] = {
    model: model.__name__
    for model in (
        Project,
        CodebaseInfo,
        Package,
        RevisionSummary,
        Runtime,
        Service,
        ReplicaStatus,
        ServiceStatus,
        Progress,
        StatusLogEntry,
        Execution,
        LogLine,
        Pipeline,
        PipelineExecution,
    )
}
