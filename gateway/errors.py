"""Domain errors that carry their HTTP status. Every layer raises them; the web layer's one
middleware (gateway/web/envelope.py) turns them into the JSON envelope or an HTML page."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """An error a client can act on. Subclasses set ``status`` and ``code``."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, details: dict[str, Any] | None = None,
                 code: str | None = None, status: int | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}
        self.headers = headers or {}
        if code:
            self.code = code
        if status:
            self.status = status


class BadRequest(ApiError):
    status, code = 400, "bad_request"


class ValidationFailed(ApiError):
    status, code = 422, "validation_failed"


class Unauthorized(ApiError):
    status, code = 401, "unauthorized"


class Forbidden(ApiError):
    status, code = 403, "forbidden"


class NotFound(ApiError):
    status, code = 404, "not_found"


class Conflict(ApiError):
    status, code = 409, "conflict"


class QuotaExceeded(ApiError):
    status, code = 403, "quota_exceeded"


class ServiceUnavailable(ApiError):
    status, code = 503, "service_unavailable"
