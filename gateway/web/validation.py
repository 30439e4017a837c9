"""Reading JSON bodies and checking fields, with errors that name the field."""

from __future__ import annotations

import json
import re
from typing import Any

from aiohttp import web

from gateway.errors import ApiError, BadRequest, ValidationFailed

# Deliberately simple: one @, no spaces, a dot in the domain. Mail delivery is the real check.
EMAIL_RE = re.compile(r"^[^@\s]{1,64}@[^@\s]+\.[^@\s]+$")
NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
MIN_PASSWORD, MAX_PASSWORD = 10, 1024


async def json_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object, or a 4xx: 415 for another media type, 400 for bad JSON or a non-object."""
    if request.content_type != "application/json":
        raise ApiError("Send the body as JSON with Content-Type: application/json.",
                       status=415, code="unsupported_media_type")
    raw = await request.read()  # aiohttp answers 413 itself past client_max_size
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"The body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise BadRequest("The body must be a JSON object.", code="invalid_json")
    return body


def _fail(field: str, message: str) -> ValidationFailed:
    return ValidationFailed(f"{field}: {message}", details={"field": field})


def check_unknown(body: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ValidationFailed(f"Unknown field(s): {', '.join(unknown)}.",
                               details={"field": unknown[0], "unknown": unknown})


def string(body: dict[str, Any], field: str, *, max_len: int, required: bool = True,
           min_len: int = 0) -> str | None:
    value = body.get(field)
    if value is None:
        if required:
            raise _fail(field, "is required")
        return None
    if not isinstance(value, str):
        raise _fail(field, "must be a string")
    if len(value) > max_len:
        raise _fail(field, f"must be at most {max_len} characters")
    if len(value) < min_len:
        raise _fail(field, f"must be at least {min_len} characters")
    return value


def integer(body: dict[str, Any], field: str, *, lo: int, hi: int, default: int | None = None) -> int:
    value = body.get(field)
    if value is None:
        if default is None:
            raise _fail(field, "is required")
        return default
    # bool is an int in Python; JSON true is not a number here.
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(field, "must be an integer")
    if not lo <= value <= hi:
        raise ValidationFailed(f"{field}: must be between {lo} and {hi}",
                               details={"field": field, "min": lo, "max": hi})
    return value


def email(body: dict[str, Any]) -> str:
    value = string(body, "email", max_len=254) or ""
    value = value.strip()
    if not EMAIL_RE.match(value):
        raise _fail("email", "is not an email address")
    return value


def password(body: dict[str, Any]) -> str:
    value = string(body, "password", max_len=MAX_PASSWORD) or ""
    if len(value) < MIN_PASSWORD:
        raise _fail("password", f"must be at least {MIN_PASSWORD} characters")
    return value
