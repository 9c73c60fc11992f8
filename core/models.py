"""Shared pieces of the API models: base config, time formatting, list parameters."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, PlainSerializer


def format_time(value: datetime) -> str:
    """ISO-8601 UTC with milliseconds and a Z, as API.md specifies."""
    return (
        value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"
    )


Timestamp = Annotated[datetime, PlainSerializer(format_time, return_type=str, when_used="json")]


class Model(BaseModel):
    """Response models: built from rows, serialised to JSON."""

    model_config = ConfigDict(from_attributes=True)


class Request(BaseModel):
    """Request bodies: unknown fields are errors, so typos are caught rather than ignored."""

    model_config = ConfigDict(extra="forbid")


def utcnow() -> datetime:
    return datetime.now(UTC)


def status_entry(status: str, message: str | None = None, **extra: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"status": status, "at": format_time(utcnow()), "message": message}
    entry.update(extra)
    return entry
