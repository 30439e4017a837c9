"""The audit log: who did what, from where, to which VM, with what outcome (docs/SECURITY.md)."""

from __future__ import annotations

import json
from typing import Any

import aiopg

from gateway.store.db import Row, fetch_all


async def record(cur: aiopg.Cursor, *, action: str, outcome: str, user_id: str | None = None, ip: str | None = None,
                 vm_id: str | None = None, details: dict[str, Any] | None = None) -> None:
    """Add one entry."""
    await cur.execute(
        "INSERT INTO audit_log (user_id, ip, action, vm_id, outcome, details) VALUES (%s, %s, %s, %s, %s, %s)",
        (user_id, ip, action, vm_id, outcome, json.dumps(details or {})))


async def audit_of(cur: aiopg.Cursor, user_id: str, limit: int = 100, before_id: int | None = None) -> list[Row]:
    """One user's entries, newest first, older than ``before_id``."""
    await cur.execute(
        "SELECT id, created_at, ip, action, vm_id, outcome, details FROM audit_log"
        " WHERE user_id = %s AND (%s::bigint IS NULL OR id < %s) ORDER BY id DESC LIMIT %s",
        (user_id, before_id, before_id, limit))
    return await fetch_all(cur)


async def audit_page(cur: aiopg.Cursor, limit: int, before_id: int | None = None, *, user_id: str | None = None,
                     vm_id: str | None = None, action: str | None = None) -> list[Row]:
    """Every user's entries, newest first; ``action`` matches a prefix (``admin.`` finds every admin action)."""
    await cur.execute(
        "SELECT id, created_at, user_id, ip, action, vm_id, outcome, details FROM audit_log"
        " WHERE (%(before)s::bigint IS NULL OR id < %(before)s) AND (%(user)s::uuid IS NULL OR user_id = %(user)s)"
        " AND (%(vm)s::uuid IS NULL OR vm_id = %(vm)s)"
        " AND (%(action)s::text IS NULL OR left(action, length(%(action)s)) = %(action)s)"
        " ORDER BY id DESC LIMIT %(limit)s",
        {"before": before_id, "user": user_id, "vm": vm_id, "action": action, "limit": limit})
    return await fetch_all(cur)
