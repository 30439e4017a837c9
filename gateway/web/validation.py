"""Checking the fields of a JSON body (read by ``http.json_body``), with errors that name the field."""

from __future__ import annotations

import re
from typing import Any

from gateway.credentials import EMAIL_RE, MAX_PASSWORD, MIN_PASSWORD
from gateway.errors import ValidationFailed

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


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
    if not EMAIL_RE.fullmatch(value):
        raise _fail("email", "is not an email address")
    return value


def password(body: dict[str, Any]) -> str:
    value = string(body, "password", max_len=MAX_PASSWORD) or ""
    if len(value) < MIN_PASSWORD:
        raise _fail("password", f"must be at least {MIN_PASSWORD} characters")
    return value
