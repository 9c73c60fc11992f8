"""The SDK's exceptions: what the API answered (code, message, field details), or that it
could not be reached at all."""

from __future__ import annotations

from typing import Any


class FerryError(Exception):
    """Base of every error the SDK raises."""


class Unreachable(FerryError):
    """No answer from Ferry's URL (not running, wrong URL, network down)."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"cannot reach {url}: is `ferry up` running? ({reason})")
        self.url = url


class ApiError(FerryError):
    """An error answer of the API: its HTTP status, `code`, `message` and per-field `details`."""

    def __init__(
        self, status: int, code: str, message: str, details: list[dict[str, Any]] | None = None
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details or []

    @property
    def fields(self) -> dict[str, str]:
        """Each named field's message, e.g. {"input.who": "expected string, got integer"}."""
        return {str(d.get("field")): str(d.get("message")) for d in self.details}


class NotFound(ApiError):
    """404: no such resource, or not visible to the token."""


class Conflict(ApiError):
    """409."""


class InvalidInput(ApiError):
    """400 or 422: the request named a bad field."""


class Unfinished(FerryError):
    """An execution was still running when a wait gave up."""


def error_from_answer(status: int, body: Any, text: str) -> ApiError:
    """The exception for an error answer, from the API's `{"error": {...}}` body."""
    code, message, details = "error", text[:300] or f"HTTP {status}", []
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        error = body["error"]
        code = str(error.get("code") or code)
        message = str(error.get("message") or message)
        details = [d for d in error.get("details") or [] if isinstance(d, dict)]
    kind = {404: NotFound, 409: Conflict, 400: InvalidInput, 422: InvalidInput}.get(
        status, ApiError
    )
    return kind(status, code, message, details)
