"""Domain errors, raised below the HTTP layer and mapped to responses in one middleware.

Every error carries a stable machine `code`, an HTTP `status`, a human `message` and,
for validation failures, `details`: one entry per offending field, each
`{"field": "input.size", "message": "..."}` with a dotted path to the field.
"""

from __future__ import annotations

from typing import Any


class FerryError(Exception):
    status = 500
    code = "internal"

    def __init__(self, message: str, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []

    def describe(self) -> str:
        """One line for a log or a status: the message, led by the field it concerns."""
        field = self.details[0].get("field") if self.details else None
        if field and not self.message.startswith(str(field)):
            return f"{field}: {self.message}"
        return self.message

    def to_json(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}


class BadRequest(FerryError):
    status = 400
    code = "bad_request"


class Unauthorized(FerryError):
    status = 401
    code = "unauthorized"


class Forbidden(FerryError):
    status = 403
    code = "forbidden"


class NotFound(FerryError):
    status = 404
    code = "not_found"


class Conflict(FerryError):
    status = 409
    code = "conflict"


class InvalidTransition(Conflict):
    """A status change the state machine does not allow (e.g. terminating a finished run)."""

    code = "invalid_transition"


class TooLarge(FerryError):
    status = 413
    code = "too_large"


class UnsupportedMediaType(FerryError):
    status = 415
    code = "unsupported_media_type"


class Invalid(FerryError):
    """Well-formed input that breaks a rule; `details` names each offending field."""

    status = 422
    code = "invalid"

    @classmethod
    def field(cls, field: str, message: str) -> Invalid:
        return cls(f"{field}: {message}", [{"field": field, "message": message}])


class Unavailable(FerryError):
    status = 503
    code = "unavailable"
