"""Query parameters of paginated lists, newest first: ``?limit=`` and an opaque ``?cursor=``
(lists ordered by creation time and id) or ``?before=`` (the audit log, ordered by its id).

A page is fetched with ``limit + 1`` rows: the extra row only says whether another page exists.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from aiohttp import web

from gateway.errors import BadRequest
from gateway.store.db import is_uuid

MAX_LIMIT = 200
R = TypeVar("R", bound=Mapping[str, Any])


def limit(request: web.Request, default: int = 50) -> int:
    """``?limit=``: 1 to MAX_LIMIT, else 400 naming the field."""
    raw = request.query.get("limit", str(default))
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise BadRequest(f"limit must be an integer from 1 to {MAX_LIMIT}.", details={"field": "limit"})
    return int(raw)


def before(request: web.Request) -> int | None:
    """``?before=<id>``: only entries with a smaller id (the audit log's cursor)."""
    raw = request.query.get("before")
    if raw is None:
        return None
    if not raw.isdigit() or not 1 <= int(raw) < 2**63:
        raise BadRequest("before must be a positive integer (an entry id).", details={"field": "before"})
    return int(raw)


def encode_cursor(created_at: dt.datetime, row_id: Any) -> str:
    raw = json.dumps([created_at.isoformat(), str(row_id)]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def cursor(request: web.Request) -> tuple[dt.datetime, str] | None:
    """``?cursor=``: the ``next_cursor`` of the previous page, decoded to (created_at, id)."""
    raw = request.query.get("cursor")
    if raw is None:
        return None
    try:
        created_at, row_id = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
        when = dt.datetime.fromisoformat(created_at)
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        when, row_id = None, None
    if when is None or when.tzinfo is None or not isinstance(row_id, str) or not is_uuid(row_id):
        raise BadRequest("cursor is not a cursor this API returned.", details={"field": "cursor"})
    return when, row_id


def page(rows: list[R], size: int, next_of: Callable[[R], Any]) -> tuple[list[R], Any]:
    """Split ``size + 1`` fetched rows into the page and the next page's cursor (None on the last page)."""
    if len(rows) <= size:
        return rows, None
    rows = rows[:size]
    return rows, next_of(rows[-1])


def by_creation(row: Mapping[str, Any]) -> str:
    return encode_cursor(row["created_at"], row["id"])
