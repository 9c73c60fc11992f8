"""Query-string models: parsed with pydantic like bodies, and documented from the same class."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from core.errors import Invalid
from core.models import INT32_MAX, within_storable_range
from core.pagination import Order
from core.settings import Settings


class Query(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    _storable = field_validator("*")(within_storable_range)


def seq_cursor(raw: str | None) -> int:
    """An execution log cursor (the last `seq` seen) as a number; 0 when absent."""
    if not raw:
        return 0
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 10 or int(raw) > INT32_MAX:
        raise Invalid.field("cursor", "the seq of the last line seen, a whole number")
    return int(raw)


class ListQuery(Query):
    limit: int | None = Field(
        default=None,
        ge=1,
        validate_default=True,
        description="page size: default FERRY_LIST_DEFAULT_LIMIT (50), "
        "at most FERRY_LIST_MAX_LIMIT (1000)",
    )
    cursor: str | None = None
    order: Order = "-created_at"

    @field_validator("limit")
    @classmethod
    def _limit_within_settings(cls, value: int | None, info: ValidationInfo) -> int:
        # The server's settings arrive as validation context; without them (a query built in
        # code) the settings' own defaults apply.
        settings = (info.context or {}).get("settings")
        if settings is None:
            default = Settings.model_fields["list_default_limit"].default
            most = Settings.model_fields["list_max_limit"].default
        else:
            default, most = settings.list_default_limit, settings.list_max_limit
        if value is None:
            return min(default, most)
        if value > most:
            raise ValueError(f"must be at most {most}")
        return value


class ProjectFilter(ListQuery):
    project: str | None = None


class PackageList(ProjectFilter):
    name: str | None = None


class ServiceList(ProjectFilter):
    package: str | None = None
    status: str | None = None


class ExecutionList(ProjectFilter):
    service: str | None = None
    status: str | None = Field(default=None, description="one status or several, comma-separated")
    function: str | None = None
    trigger: str | None = None
    pipeline_execution: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None


class TriggerList(ProjectFilter):
    type: str | None = Field(default=None, description="cron or event")
    active: bool | None = None
    service: str | None = None
    pipeline: str | None = Field(default=None, description="a pipeline id")


class PipelineExecutionList(ProjectFilter):
    pipeline: str | None = None
    status: str | None = Field(default=None, description="one status or several, comma-separated")


class PipelineLogQuery(Query):
    cursor: str | None = Field(default=None, description="the next_cursor of the last page")
    limit: int = Field(default=1000, ge=1, le=10_000)
    follow: bool = Field(
        default=False,
        description="with Accept: text/event-stream or text/plain: keep streaming until the "
        "pipeline execution has ended",
    )


class FireTimesQuery(Query):
    count: int = Field(default=5, ge=1, le=100)


class CounterQuery(Query):
    project: str | None = None
    service: str | None = None


class RevisionQuery(Query):
    revision: int | None = Field(default=None, ge=1)


class ForceQuery(Query):
    force: bool = False


class WaitQuery(Query):
    timeout: float = Field(
        default=30,
        ge=0,
        le=300,
        description="seconds to wait for a terminal status; the answer is the execution as it "
        "then is, finished or not",
    )


class CreateWaitQuery(Query):
    wait: float = Field(
        default=0,
        ge=0,
        le=300,
        description="seconds to wait for the new execution to end: when it ends within them the "
        "answer is the finished execution (output included), otherwise as it then is",
    )


class LogQuery(Query):
    cursor: str | None = Field(default=None, description="the last seq already seen")
    limit: int = Field(default=1000, ge=1, le=10_000)
    follow: bool = Field(
        default=False,
        description="with Accept: text/event-stream or text/plain: keep streaming until the "
        "execution is terminal",
    )


class ServiceLogQuery(Query):
    follow: bool = Field(default=False, description="keep streaming new lines (SSE or text)")
    since: datetime | None = Field(default=None, description="only lines from this time on")
    replica: str | None = Field(default=None, description="only this replica's lines")
    stream: str | None = Field(
        default=None, description="stdout, stderr, system, lifecycle; comma-separated"
    )
    cursor: str | None = Field(default=None, description="the id of the last line already seen")
    limit: int = Field(default=1000, ge=1, le=10_000)


class EventStreamQuery(Query):
    project: str | None = None
    types: str | None = Field(
        default=None, description="comma-separated globs of event types, e.g. execution.*"
    )
    last_event_id: str | None = Field(
        default=None, description="resume after this event id (as the Last-Event-ID header)"
    )
