"""Keyset pagination on `(created_at, id)`: stable under concurrent inserts, no OFFSET."""

from __future__ import annotations

import base64
import json
from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel

from core.errors import Invalid
from core.models import within_storable_range

T = TypeVar("T")

Order = Literal["created_at", "-created_at"]


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None = None


def encode_cursor(created_at: datetime, row_id: str) -> str:
    raw = json.dumps([created_at.isoformat(), row_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        created_at, row_id = json.loads(base64.urlsafe_b64decode(padded))
        if not isinstance(row_id, str) or "\x00" in row_id:
            raise ValueError("not an id")
        # A forged time could still break the query or the page built from its rows.
        return within_storable_range(datetime.fromisoformat(created_at)), row_id
    except (ValueError, TypeError, RecursionError) as exc:
        raise Invalid.field("cursor", "not a cursor this server issued") from exc


class Keyset:
    """Builds the WHERE/ORDER BY/LIMIT tail of a list query with `$n` parameters.

    `conditions` and `args` start with the caller's filters; `page()` adds the keyset part.
    """

    def __init__(self) -> None:
        self.conditions: list[str] = []
        self.args: list[Any] = []

    def param(self, value: Any) -> str:
        self.args.append(value)
        return f"${len(self.args)}"

    def where(self, condition: str, *values: Any) -> None:
        """Add a condition; `{}` placeholders in it are replaced by parameters for `values`."""
        self.conditions.append(condition.format(*(self.param(v) for v in values)))

    def tail(self, cursor: str | None, order: Order, limit: int, alias: str = "") -> str:
        prefix = f"{alias}." if alias else ""
        descending = order.startswith("-")
        if cursor:
            created_at, row_id = decode_cursor(cursor)
            op = "<" if descending else ">"
            self.where(f"({prefix}created_at, {prefix}id) {op} ({{}}, {{}})", created_at, row_id)
        where = " AND ".join(self.conditions) if self.conditions else "true"
        direction = "DESC" if descending else "ASC"
        # One row more than asked tells whether a next page exists without a COUNT.
        return (
            f"WHERE {where} ORDER BY {prefix}created_at {direction}, {prefix}id {direction} "
            f"LIMIT {self.param(limit + 1)}"
        )


def page_of(rows: list[Any], limit: int, to_model: Any) -> dict[str, Any]:
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = encode_cursor(rows[-1]["created_at"], rows[-1]["id"]) if more and rows else None
    return {"items": [to_model(r) for r in rows], "next_cursor": next_cursor}
