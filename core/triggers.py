"""Triggers: cron and event triggers that create executions of a service's function, or
pipeline executions of a pipeline.

The store (create, read, list, update, delete) and the cron arithmetic both the API
(`/triggers/{id}/next`) and the scheduler use. What a trigger runs, and its check, is
`core/trigger_operations.py`; firing lives in `scheduler/cron.py` and
`scheduler/event_triggers.py`.
"""

from __future__ import annotations

import functools
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import asyncpg
from croniter import croniter
from pydantic import Field, ValidationError, WithJsonSchema
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from core import filters
from core.auth import Principal, Role, fetch_visible
from core.errors import Conflict, Invalid, NotFound
from core.events import EVENTS_STREAM
from core.ids import new_id
from core.models import Model, Request, Timestamp, utcnow
from core.pagination import Keyset, Order, page_of
from core.trigger_operations import Operation, check_operation, parse_operation

NAME_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
EVENTS_GROUP = "ferry-triggers"  # the schedulers' consumer group on the events stream
# NOTIFYed in the transaction of every change to an event trigger: the schedulers keep the
# (project, resource) pairs event triggers listen to in memory (scheduler/event_triggers.py).
TRIGGERS_CHANNEL = "ferry_event_triggers_changed"


async def _notify_change(conn: asyncpg.Connection) -> None:
    await conn.execute("SELECT pg_notify($1, '')", TRIGGERS_CHANNEL)


async def ensure_events_group(redis: Redis) -> None:
    """Create the consumer group at `$` unless it exists (see scheduler/event_triggers.py)."""
    try:
        await redis.xgroup_create(EVENTS_STREAM, EVENTS_GROUP, id="$", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


class CronSpec(Request):
    cron: str = Field(description="5 fields, or 6 with seconds first")
    timezone: str = "UTC"
    start_at: datetime | None = None
    end_at: datetime | None = None
    misfire: Literal["skip", "run-once", "run-all"] = "run-once"


class EventSpec(Request):
    resource: str = Field(min_length=1, max_length=100)
    actions: list[str] = Field(default_factory=list, description="empty: any action")
    filter: dict[str, Any] = Field(default_factory=dict, description="see docs/triggers.md")
    mode: Literal["always", "once"] = "always"


# Which spec applies depends on the trigger's `type`, so it is parsed after the body (errors
# then name `spec.…`); the schema still documents both shapes.
SpecBody = Annotated[
    dict[str, Any],
    WithJsonSchema(
        {
            "anyOf": [CronSpec.model_json_schema(), EventSpec.model_json_schema()],
            "description": "a CronSpec for cron triggers, an EventSpec for event triggers",
        }
    ),
]


class TriggerCreate(Request):
    body_kind = "input"

    project: str
    name: str = Field(pattern=NAME_PATTERN)
    type: Literal["cron", "event"]
    active: bool = True
    input: dict[str, Any] = Field(default_factory=dict)
    operation: Operation
    spec: SpecBody


class TriggerPatch(Request):
    body_kind = "input"

    name: str | None = Field(default=None, pattern=NAME_PATTERN)
    active: bool | None = None
    input: dict[str, Any] | None = None
    operation: Operation | None = None
    spec: SpecBody | None = Field(default=None, description="replaces the whole spec")


class Trigger(Model):
    id: str
    project: str
    name: str
    type: Literal["cron", "event"]
    active: bool
    input: dict[str, Any]
    operation: Operation
    spec: CronSpec | EventSpec
    status: Literal["ok", "skipped", "error", "finished"]
    last_error: str | None
    next_fire_at: Timestamp | None
    last_fired_at: Timestamp | None
    created_at: Timestamp
    updated_at: Timestamp


class FireTimes(Model):
    items: list[Timestamp]


def trigger_from_row(row: asyncpg.Record) -> Trigger:
    spec_model = CronSpec if row["type"] == "cron" else EventSpec
    return Trigger(
        id=row["id"],
        project=row["project_id"],
        name=row["name"],
        type=row["type"],
        active=row["active"],
        input=row["input"],
        operation=parse_operation(row["operation"]),
        spec=spec_model.model_validate(row["spec"]),
        status=row["status"],
        last_error=row["last_error"],
        next_fire_at=row["next_fire_at"],
        last_fired_at=row["last_fired_at"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


# Cron arithmetic ------------------------------------------------------------------------


# Parsing an expression costs far more than a step, and thousands of triggers share a few
# expressions: one iterator per (expression, zone), moved to each start. Callers step it
# without awaiting in between, so sharing it in one event loop is safe.
_ITERATORS: dict[tuple[str, str], croniter] = {}
_ITERATORS_MAX = 4096


def _cron(cron: str, timezone: str, start: datetime) -> croniter:
    key = (cron, timezone)
    local = start.astimezone(ZoneInfo(timezone))
    iterator = _ITERATORS.get(key)
    if iterator is not None:
        iterator.set_current(local, force=True)
        return iterator
    # Six fields means seconds first (the Quartz/Spring habit); croniter puts them last.
    seconds = len(cron.split()) == 6
    iterator = croniter(cron, local, second_at_beginning=seconds)
    if len(_ITERATORS) >= _ITERATORS_MAX:
        _ITERATORS.pop(next(iter(_ITERATORS)))
    _ITERATORS[key] = iterator
    return iterator


def next_fire_time(spec: CronSpec, after: datetime) -> datetime | None:
    """The first tick strictly after `after` (and not before `start_at`), None past `end_at`."""
    if spec.start_at is not None and after < spec.start_at:
        after = spec.start_at - timedelta(microseconds=1)
    # The step is memoised by instant: in UTC, where no wall time repeats (two datetimes of
    # one zone compare by wall time, so 02:30 CEST and 02:30 CET would be one key).
    tick = _next_tick(spec.cron, spec.timezone, after.astimezone(UTC))
    if spec.end_at is not None and tick > spec.end_at:
        return None
    return tick


# Triggers that share an expression and zone are due at the same instants, so a cron round
# asks for the same steps over and over (10,000 triggers on a few schedules: a few distinct
# steps). A step depends on nothing else, so it is computed once.
@functools.lru_cache(maxsize=16_384)
def _next_tick(cron: str, timezone: str, after: datetime) -> datetime:
    # In UTC: aware datetimes sharing a zone compare by wall time, which repeats at DST's end.
    return _cron(cron, timezone, after).get_next(datetime).astimezone(UTC)


def fire_times(spec: CronSpec, after: datetime, count: int) -> list[datetime]:
    times: list[datetime] = []
    current: datetime | None = after
    while len(times) < count and current is not None:
        current = next_fire_time(spec, current)
        if current is not None:
            times.append(current)
    return times


def ticks_between(spec: CronSpec, first: datetime, now: datetime, limit: int) -> list[datetime]:
    """Ticks in [first, now], newest first, at most `limit` (walks back from `now`, so a
    long outage costs `limit` steps, not one per missed tick)."""
    if spec.end_at is not None and now > spec.end_at:
        now = spec.end_at
    iterator = _cron(spec.cron, spec.timezone, now + timedelta(seconds=1))
    ticks: list[datetime] = []
    while len(ticks) < limit:
        tick = iterator.get_prev(datetime).astimezone(UTC)
        if tick < first:
            break
        if tick <= now:
            ticks.append(tick)
    return ticks


# Validation -----------------------------------------------------------------------------


def _invalid(exc: ValidationError, prefix: str) -> Invalid:
    details = [
        {"field": ".".join([prefix, *(str(p) for p in e["loc"])]), "message": e["msg"]}
        for e in exc.errors(include_url=False)
    ]
    first = details[0]
    return Invalid(f"{first['field']}: {first['message']}", details)


def parse_spec(type_: str, raw: dict[str, Any]) -> CronSpec | EventSpec:
    model = CronSpec if type_ == "cron" else EventSpec
    try:
        spec = model.model_validate(raw)
    except ValidationError as exc:
        raise _invalid(exc, "spec") from None
    if isinstance(spec, EventSpec):
        filters.validate_filter(spec.filter, "spec.filter")
        return spec
    fields = spec.cron.split()
    if len(fields) not in (5, 6) or not croniter.is_valid(
        spec.cron, second_at_beginning=len(fields) == 6
    ):
        raise Invalid.field("spec.cron", "not a cron expression of 5 fields (or 6, seconds first)")
    try:
        ZoneInfo(spec.timezone)
    except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a name too long for a path
        raise Invalid.field("spec.timezone", "not an IANA time zone name") from None
    try:
        _cron(spec.cron, spec.timezone, utcnow()).get_next(datetime)
    except (ValueError, OverflowError):  # croniter's errors are ValueErrors
        raise Invalid.field("spec.cron", "never fires: no date matches it") from None
    for name in ("start_at", "end_at"):
        value = getattr(spec, name)
        if value is not None and value.tzinfo is None:
            raise Invalid.field(f"spec.{name}", "needs a UTC offset (e.g. a trailing Z)")
    if spec.start_at and spec.end_at and spec.end_at <= spec.start_at:
        raise Invalid.field("spec.end_at", "must be after start_at")
    return spec


# Store ----------------------------------------------------------------------------------


async def create_trigger(pool: asyncpg.Pool, by: Principal, body: TriggerCreate) -> Trigger:
    """Create a trigger; one for a pipeline that is not installed is stored inactive (its
    install activates it)."""
    by.require(Role.developer, body.project)
    spec = parse_spec(body.type, body.spec)
    next_fire_at = next_fire_time(spec, utcnow()) if isinstance(spec, CronSpec) else None
    async with pool.acquire() as conn, conn.transaction():
        if not await conn.fetchval("SELECT 1 FROM projects WHERE id = $1", body.project):
            raise NotFound("project not found")
        target = await check_operation(conn, body.project, body.type, body.operation, body.input)
        try:
            row = await conn.fetchrow(
                """INSERT INTO triggers (id, project_id, name, type, active, input, operation,
                       service_id, pipeline_id, spec, next_fire_at, status)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) RETURNING *""",
                new_id(),
                body.project,
                body.name,
                body.type,
                body.active and target.runnable,
                body.input,
                target.operation,
                target.service_id,
                target.pipeline_id,
                spec.model_dump(mode="json"),
                next_fire_at,
                "finished" if body.type == "cron" and next_fire_at is None else "ok",
            )
        except asyncpg.UniqueViolationError:
            raise Conflict(f"a trigger named {body.name!r} exists in this project") from None
        if body.type == "event":
            await _notify_change(conn)
    return trigger_from_row(row)


async def fetch_trigger(conn: asyncpg.Connection | asyncpg.Pool, by: Principal, trigger_id: str):
    return await fetch_visible(conn, by, "triggers", trigger_id, "trigger")


async def get_trigger(pool: asyncpg.Pool, by: Principal, trigger_id: str) -> Trigger:
    return trigger_from_row(await fetch_trigger(pool, by, trigger_id))


async def list_triggers(
    pool: asyncpg.Pool,
    by: Principal,
    *,
    filters: dict[str, Any],
    cursor: str | None,
    limit: int,
    order: Order,
) -> dict:
    query = Keyset()
    project = by.project_filter(filters.get("project"))
    if project is not None:
        query.where("project_id = {}", project)
    if filters.get("type") is not None:
        if filters["type"] not in ("cron", "event"):
            raise Invalid.field("type", "one of cron, event")
        query.where("type = {}", filters["type"])
    if filters.get("active") is not None:
        query.where("active = {}", filters["active"])
    if filters.get("service") is not None:
        query.where("service_id = {}", filters["service"])
    if filters.get("pipeline") is not None:
        query.where("pipeline_id = {}", filters["pipeline"])
    rows = await pool.fetch(
        f"SELECT * FROM triggers {query.tail(cursor, order, limit)}", *query.args
    )
    return page_of(rows, limit, trigger_from_row)


async def update_trigger(
    pool: asyncpg.Pool, by: Principal, trigger_id: str, body: TriggerPatch
) -> Trigger:
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow("SELECT * FROM triggers WHERE id = $1 FOR UPDATE", trigger_id)
        if row is None or not by.can_see(row["project_id"]):
            raise NotFound("trigger not found")
        by.require(Role.developer, row["project_id"])
        changes = body.model_dump(exclude_unset=True)
        active = row["active"] if changes.get("active") is None else changes["active"]
        input_ = row["input"] if changes.get("input") is None else changes["input"]
        operation = (
            body.operation if body.operation is not None else parse_operation(row["operation"])
        )
        spec = parse_spec(row["type"], row["spec"] if body.spec is None else body.spec)
        target = await check_operation(
            conn, row["project_id"], row["type"], operation, input_, holding_trigger=True
        )
        if not target.runnable:
            if changes.get("active"):
                raise Conflict(
                    f"pipeline {target.pipeline_name} is not installed: installing it "
                    "activates its triggers",
                    [{"field": "active", "message": "the pipeline is not installed"}],
                )
            active = False
        next_fire_at, status = row["next_fire_at"], row["status"]
        if isinstance(spec, CronSpec) and (body.spec is not None or (active and not row["active"])):
            # A new schedule, or a resumed one, starts from now: no catch-up for a pause.
            next_fire_at = next_fire_time(spec, utcnow())
            status = "finished" if next_fire_at is None else "ok"
        try:
            updated = await conn.fetchrow(
                """UPDATE triggers SET name = $2, active = $3, input = $4, operation = $5,
                       service_id = $6, pipeline_id = $7, spec = $8, next_fire_at = $9,
                       status = $10, last_error = CASE WHEN $10 = status THEN last_error END,
                       updated_at = now()
                   WHERE id = $1 RETURNING *""",
                trigger_id,
                changes.get("name") or row["name"],
                active,
                input_,
                target.operation,
                target.service_id,
                target.pipeline_id,
                spec.model_dump(mode="json"),
                next_fire_at,
                status,
            )
        except asyncpg.UniqueViolationError:
            raise Conflict(f"a trigger named {changes.get('name')!r} exists") from None
        if row["type"] == "event":
            await _notify_change(conn)
    return trigger_from_row(updated)


async def set_active(pool: asyncpg.Pool, by: Principal, trigger_id: str, active: bool) -> Trigger:
    return await update_trigger(pool, by, trigger_id, TriggerPatch(active=active))


async def delete_trigger(pool: asyncpg.Pool, by: Principal, trigger_id: str) -> None:
    row = await fetch_trigger(pool, by, trigger_id)
    by.require(Role.developer, row["project_id"])
    await pool.execute(
        """WITH gone AS (DELETE FROM triggers WHERE id = $1 RETURNING type)
           SELECT pg_notify($2, '') FROM gone WHERE type = 'event'""",
        trigger_id,
        TRIGGERS_CHANNEL,
    )


async def preview(pool: asyncpg.Pool, by: Principal, trigger_id: str, count: int) -> FireTimes:
    row = await fetch_trigger(pool, by, trigger_id)
    if row["type"] != "cron":
        raise Invalid.field("type", "only cron triggers have fire times")
    spec = CronSpec.model_validate(row["spec"])
    if not row["active"]:  # a paused trigger resumes from now: preview from now
        return FireTimes(items=fire_times(spec, utcnow(), count))
    start = row["next_fire_at"]
    if start is None:
        return FireTimes(items=[])
    return FireTimes(items=[start, *fire_times(spec, start, count - 1)])


async def set_pipeline_triggers_active(
    conn: asyncpg.Connection, pipeline_id: str, active: bool
) -> None:
    """Activate or pause the triggers that start a pipeline (its install and uninstall).

    A cron trigger that becomes active starts from now, like `resume`: no catch-up for the
    time its pipeline was not installed.
    """
    rows = await conn.fetch(
        "SELECT id, type, spec FROM triggers WHERE pipeline_id = $1 AND active <> $2 FOR UPDATE",
        pipeline_id,
        active,
    )
    if any(row["type"] == "event" for row in rows):
        await _notify_change(conn)
    for row in rows:
        next_fire_at, status = None, "ok"
        if active and row["type"] == "cron":
            next_fire_at = next_fire_time(CronSpec.model_validate(row["spec"]), utcnow())
            status = "finished" if next_fire_at is None else "ok"
        await conn.execute(
            """UPDATE triggers SET active = $2,
                   next_fire_at = CASE WHEN $2 THEN $3 ELSE next_fire_at END,
                   status = CASE WHEN $2 THEN $4 ELSE status END,
                   last_error = CASE WHEN $2 THEN NULL ELSE last_error END,
                   updated_at = now()
               WHERE id = $1""",
            row["id"],
            active,
            next_fire_at,
            status,
        )
