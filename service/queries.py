"""Query-string models: parsed with pydantic like bodies, and documented from the same class."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from core.pagination import Order


class Query(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ListQuery(Query):
    limit: int = Field(default=50, ge=1, le=1000)
    cursor: str | None = None
    order: Order = "-created_at"


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
    timeout: float = Field(default=30, ge=0, le=300)


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
