"""Users: accounts, their quotas and what they use of them, and the administrators' view of them."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

import aiopg
import psycopg2.errors

from gateway.config import Settings
from gateway.errors import Conflict, NotFound
from gateway.rows import AdminUserRow, UserRecord, UserRow
from gateway.states import HOLDS_QUOTA_SQL
from gateway.store.db import fetch_all, fetch_found, fetch_one, fetch_returned, is_uuid

# ---- accounts --------------------------------------------------------------------------------------

async def create_user(cur: aiopg.Cursor, email: str, password_hash: str, role: str = "user") -> UserRow:
    """Insert an account; a taken address (in any case) is a Conflict on ``email``."""
    try:
        await cur.execute(
            "INSERT INTO users (id, email, password_hash, role) VALUES (%s, %s, %s, %s)"
            " RETURNING id, email, role, is_active, email_verified_at, created_at",
            (str(uuid.uuid4()), email, password_hash, role))
    except psycopg2.errors.UniqueViolation:
        raise Conflict("An account with this email already exists.", code="email_taken",
                       details={"field": "email"}) from None
    return cast(UserRow, await fetch_returned(cur))


async def user_by_email(cur: aiopg.Cursor, email: str) -> UserRecord | None:
    """The account of an address, in any case."""
    await cur.execute("SELECT * FROM users WHERE lower(email) = lower(%s)", (email,))
    return cast("UserRecord | None", await fetch_one(cur))


async def user_by_id(cur: aiopg.Cursor, user_id: str) -> UserRecord | None:
    await cur.execute("SELECT * FROM users WHERE id = %s", (user_id,))
    return cast("UserRecord | None", await fetch_one(cur))


async def set_password_hash(cur: aiopg.Cursor, user_id: str, password_hash: str) -> None:
    await cur.execute("UPDATE users SET password_hash = %s WHERE id = %s", (password_hash, user_id))


async def mark_verified(cur: aiopg.Cursor, user_id: str) -> bool:
    """The address is confirmed (a mailed link came back); the first confirmation's time is kept.
    True when this was the first confirmation."""
    await cur.execute("UPDATE users SET email_verified_at = now() WHERE id = %s AND email_verified_at IS NULL",
                      (user_id,))
    return bool(cur.rowcount)


async def set_active(cur: aiopg.Cursor, user_id: str, active: bool) -> None:
    await cur.execute("UPDATE users SET is_active = %s WHERE id = %s", (active, user_id))


async def make_admin(cur: aiopg.Cursor, user_id: str) -> None:
    """Give the admin role; an operator vouches for the address, so it counts as verified."""
    await cur.execute("UPDATE users SET role = 'admin', email_verified_at = coalesce(email_verified_at, now())"
                      " WHERE id = %s", (user_id,))


async def lock_user(cur: aiopg.Cursor, user_id: str) -> UserRecord:
    """The user's row, locked until the transaction ends (the same lock VM admission takes)."""
    if not is_uuid(user_id):
        raise NotFound("No such user.")
    await cur.execute("SELECT * FROM users WHERE id = %s FOR UPDATE", (user_id,))
    return cast(UserRecord, await fetch_found(cur, "No such user."))


# ---- quotas ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Resources:
    """What a user may hold (their quota) or holds (their usage)."""

    vms: int
    vcpus: int
    memory_mb: int
    disk_gb: int

    def to_json(self) -> dict[str, int]:
        return {"vms": self.vms, "vcpus": self.vcpus, "memory_mb": self.memory_mb, "disk_gb": self.disk_gb}


# The API's quota names and the users columns that override them (NULL: the configured default).
QuotaColumn = Literal["quota_max_vms", "quota_vcpus", "quota_memory_mb", "quota_disk_gb", "quota_storage_gb"]
QUOTA_COLUMNS: dict[str, QuotaColumn] = {"vms": "quota_max_vms", "vcpus": "quota_vcpus", "memory_mb": "quota_memory_mb",
                                         "disk_gb": "quota_disk_gb", "storage_gb": "quota_storage_gb"}
GIB = 1 << 30


def storage_quota_bytes(user: Mapping[str, Any], settings: Settings) -> int:
    """The bytes the user's files may take on disk (gateway/web/quota.py measures what they take)."""
    value = user.get("quota_storage_gb")
    return (settings.quota_storage_gb if value is None else int(value)) * GIB


def quota_of(user: Mapping[str, Any], settings: Settings) -> Resources:
    """A user's quota: their own overrides, else the configured defaults."""
    def pick(column: str, default: int) -> int:
        value = user.get(column)
        return default if value is None else int(value)

    return Resources(
        vms=pick("quota_max_vms", settings.quota_max_vms),
        vcpus=pick("quota_vcpus", settings.quota_vcpus),
        memory_mb=pick("quota_memory_mb", settings.quota_memory_mb),
        disk_gb=pick("quota_disk_gb", settings.quota_disk_gb),
    )


async def usage_of(cur: aiopg.Cursor, user_id: str) -> Resources:
    """What the user's VMs that hold quota use of it."""
    await cur.execute(
        "SELECT count(*) AS vms, coalesce(sum(cpu), 0) AS vcpus, coalesce(sum(memory_mb), 0) AS memory_mb,"
        f" coalesce(sum(disk_gb), 0) AS disk_gb FROM vms WHERE user_id = %s AND {HOLDS_QUOTA_SQL}",
        (user_id,))
    row = await fetch_returned(cur)
    return Resources(int(row["vms"]), int(row["vcpus"]), int(row["memory_mb"]), int(row["disk_gb"]))


async def set_quota(cur: aiopg.Cursor, user_id: str, overrides: dict[str, int | None]) -> None:
    """Set some of a user's quota overrides (keys of QUOTA_COLUMNS); None restores the default."""
    if overrides:
        sets = ", ".join(f"{QUOTA_COLUMNS[name]} = %s" for name in overrides)
        await cur.execute(f"UPDATE users SET {sets} WHERE id = %s", (*overrides.values(), user_id))


# ---- the administrators' view ----------------------------------------------------------------------

_ADMIN_USER_SQL = (
    "SELECT u.id, u.email, u.role, u.is_active, u.email_verified_at, u.created_at, u.quota_max_vms, u.quota_vcpus,"
    " u.quota_memory_mb, u.quota_disk_gb, u.quota_storage_gb, us.vms AS used_vms, us.vcpus AS used_vcpus,"
    " us.memory_mb AS used_memory_mb, us.disk_gb AS used_disk_gb FROM users u CROSS JOIN LATERAL"
    " (SELECT count(*) AS vms, coalesce(sum(cpu), 0) AS vcpus, coalesce(sum(memory_mb), 0) AS memory_mb,"
    f" coalesce(sum(disk_gb), 0) AS disk_gb FROM vms WHERE vms.user_id = u.id AND {HOLDS_QUOTA_SQL}) us")


def usage_in(row: Mapping[str, Any]) -> Resources:
    """The usage columns ``users_page`` and ``user_for_admin`` add to a user row."""
    return Resources(int(row["used_vms"]), int(row["used_vcpus"]), int(row["used_memory_mb"]),
                     int(row["used_disk_gb"]))


async def users_page(cur: aiopg.Cursor, limit: int, after: tuple[Any, str] | None = None,
                     email_contains: str | None = None) -> list[AdminUserRow]:
    """Users with their usage, newest first, after the cursor (created_at, id)."""
    at, last_id = after if after is not None else (None, None)
    await cur.execute(
        _ADMIN_USER_SQL + " WHERE (%(at)s::timestamptz IS NULL OR (u.created_at, u.id) < (%(at)s, %(id)s::uuid))"
        " AND (%(email)s::text IS NULL OR strpos(lower(u.email), lower(%(email)s)) > 0)"
        " ORDER BY u.created_at DESC, u.id DESC LIMIT %(limit)s",
        {"at": at, "id": last_id, "email": email_contains, "limit": limit})
    return cast(list[AdminUserRow], await fetch_all(cur))


async def user_for_admin(cur: aiopg.Cursor, user_id: str) -> AdminUserRow:
    """One user with their usage; NotFound for an unknown or malformed id."""
    if not is_uuid(user_id):
        raise NotFound("No such user.")
    await cur.execute(_ADMIN_USER_SQL + " WHERE u.id = %(id)s", {"id": user_id})
    return cast(AdminUserRow, await fetch_found(cur, "No such user."))
