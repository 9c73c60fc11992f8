"""Shared pieces of the API models: base config, time formatting, list parameters."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, field_validator


def format_time(value: datetime) -> str:
    """ISO-8601 UTC with milliseconds and a Z, as docs/api.md describes."""
    return (
        value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"
    )


Timestamp = Annotated[datetime, PlainSerializer(format_time, return_type=str, when_used="json")]


class Model(BaseModel):
    """Response models: built from rows, serialised to JSON."""

    model_config = ConfigDict(from_attributes=True)


# What PostgreSQL columns hold: every whole number a client sends lands in an `integer`, and
# every time must survive the trip through UTC both ways (Python's years end at 9999).
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(9999, 1, 1, tzinfo=UTC)

Name = Annotated[str, Field(min_length=1, max_length=200)]
Description = Annotated[str, Field(max_length=4000)]


def within_storable_range(value: Any) -> Any:
    """`value` unchanged, or ValueError when PostgreSQL (or the way back) could not hold it."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and not INT32_MIN <= value <= INT32_MAX:
        raise ValueError(f"out of range: at most {INT32_MAX}, at least {INT32_MIN}")
    if isinstance(value, datetime):
        aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        try:
            inside = EARLIEST <= aware < LATEST
        except OverflowError:
            inside = False
        if not inside:
            raise ValueError("out of range: a time from 1970-01-01 to 9998-12-31")
    return value


class Request(BaseModel):
    """Request bodies: unknown fields are errors, so typos are caught rather than ignored.

    `body_kind` picks the size limit the body is read with (see `Settings.max_*_body_bytes`).
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    body_kind: ClassVar[Literal["json", "input", "batch"]] = "json"

    _storable = field_validator("*")(within_storable_range)


def utcnow() -> datetime:
    return datetime.now(UTC)


def status_entry(status: str, message: str | None = None, **extra: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"status": status, "at": format_time(utcnow()), "message": message}
    entry.update(extra)
    return entry
