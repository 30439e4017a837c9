"""Small query functions. Each takes a cursor first (a psycopg2 RealDictCursor through aiopg),
returns plain dicts, and raises domain errors; views turn those into HTTP."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiopg
import psycopg2
import psycopg2.errors
from psycopg2.extras import RealDictCursor

from gateway.config import Settings
from gateway.errors import Conflict, NotFound, QuotaExceeded

Row = dict[str, Any]

# A VM in these states holds no share of its owner's quota.
FREE_STATES = ("error", "destroyed")
TRANSITIONAL_STATES = ("requested", "provisioning", "starting", "stopping", "destroying")

VM_COLUMNS = ("id, user_id, name, template, cpu, memory_mb, disk_gb, state, desired_state, error_reason,"
              " overlay_path, created_at, updated_at, started_at, stopped_at, destroyed_at")


@contextlib.asynccontextmanager
async def cursor(pool: aiopg.Pool) -> AsyncIterator[Any]:
    """Yield a dict cursor on a pooled connection (autocommit; use ``cur.begin()`` for transactions)."""
    async with pool.acquire() as conn, conn.cursor(cursor_factory=RealDictCursor) as cur:
        yield cur


# ---- users -----------------------------------------------------------------------------------------

async def create_user(cur: Any, email: str, password_hash: str, role: str = "user") -> Row:
    try:
        await cur.execute(
            "INSERT INTO users (id, email, password_hash, role) VALUES (%s, %s, %s, %s)"
            " RETURNING id, email, role, is_active, email_verified_at, created_at",
            (str(uuid.uuid4()), email, password_hash, role))
    except psycopg2.errors.UniqueViolation:
        raise Conflict("An account with this email already exists.", code="email_taken",
                       details={"field": "email"}) from None
    return dict(await cur.fetchone())


async def user_by_email(cur: Any, email: str) -> Row | None:
    await cur.execute("SELECT * FROM users WHERE lower(email) = lower(%s)", (email,))
    row = await cur.fetchone()
    return dict(row) if row else None


async def user_by_id(cur: Any, user_id: str) -> Row | None:
    await cur.execute("SELECT * FROM users WHERE id = %s", (user_id,))
    row = await cur.fetchone()
    return dict(row) if row else None


async def set_password_hash(cur: Any, user_id: str, password_hash: str) -> None:
    await cur.execute("UPDATE users SET password_hash = %s WHERE id = %s", (password_hash, user_id))


# ---- quotas ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Resources:
    vms: int
    vcpus: int
    memory_mb: int
    disk_gb: int

    def to_json(self) -> dict[str, int]:
        return {"vms": self.vms, "vcpus": self.vcpus, "memory_mb": self.memory_mb, "disk_gb": self.disk_gb}


def quota_of(user: Row, settings: Settings) -> Resources:
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


async def usage_of(cur: Any, user_id: str) -> Resources:
    await cur.execute(
        "SELECT count(*) AS vms, coalesce(sum(cpu), 0) AS vcpus, coalesce(sum(memory_mb), 0) AS memory_mb,"
        " coalesce(sum(disk_gb), 0) AS disk_gb FROM vms WHERE user_id = %s AND state <> ALL(%s)",
        (user_id, list(FREE_STATES)))
    row = await cur.fetchone()
    return Resources(int(row["vms"]), int(row["vcpus"]), int(row["memory_mb"]), int(row["disk_gb"]))


# ---- VMs -------------------------------------------------------------------------------------------

async def admit_vm(cur: Any, settings: Settings, user_id: str, vm: Row) -> Row:
    """Insert a VM in state ``provisioning`` if it fits the owner's quota, atomically.

    The owner's row is locked for the transaction, so concurrent creates by one user are
    admitted one at a time and can never exceed the quota together.
    """
    async with cur.begin():
        await cur.execute("SELECT * FROM users WHERE id = %s FOR UPDATE", (user_id,))
        user = await cur.fetchone()
        if user is None:
            raise NotFound("No such user.")
        quota = quota_of(dict(user), settings)
        used = await usage_of(cur, user_id)
        wanted = Resources(1, vm["cpu"], vm["memory_mb"], vm["disk_gb"])
        over = {
            name: {"quota": getattr(quota, name), "used": getattr(used, name), "requested": getattr(wanted, name)}
            for name in ("vms", "vcpus", "memory_mb", "disk_gb")
            if getattr(used, name) + getattr(wanted, name) > getattr(quota, name)
        }
        if over:
            raise QuotaExceeded(
                "This VM does not fit your quota: " + ", ".join(sorted(over)) + ".", details={"exceeded": over})
        await cur.execute(
            "INSERT INTO vms (id, user_id, name, template, cpu, memory_mb, disk_gb, userdata, state,"
            " desired_state, overlay_path) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, 'provisioning', 'running', %s)"
            f" RETURNING {VM_COLUMNS}",
            (vm["id"], user_id, vm["name"], vm["template"], vm["cpu"], vm["memory_mb"], vm["disk_gb"],
             vm["userdata"], vm["overlay_path"]))
        row = dict(await cur.fetchone())
        await cur.execute("INSERT INTO vm_events (vm_id, from_state, to_state) VALUES (%s, NULL, 'provisioning')",
                          (vm["id"],))
    return row


async def vm_for_owner(cur: Any, vm_id: str, user_id: str) -> Row:
    """The VM if it exists and belongs to ``user_id``; otherwise NotFound (never Forbidden)."""
    if not is_uuid(vm_id):
        raise NotFound("No such VM.")
    await cur.execute(f"SELECT {VM_COLUMNS}, jobspec FROM vms WHERE id = %s AND user_id = %s", (vm_id, user_id))
    row = await cur.fetchone()
    if row is None:
        raise NotFound("No such VM.")
    return dict(row)


async def vm_by_id(cur: Any, vm_id: str) -> Row | None:
    await cur.execute(f"SELECT {VM_COLUMNS}, jobspec FROM vms WHERE id = %s", (vm_id,))
    row = await cur.fetchone()
    return dict(row) if row else None


async def vms_of(cur: Any, user_id: str, include_destroyed: bool = False) -> list[Row]:
    where = "" if include_destroyed else " AND state <> 'destroyed'"
    await cur.execute(f"SELECT {VM_COLUMNS} FROM vms WHERE user_id = %s{where} ORDER BY created_at, id",
                      (user_id,))
    return [dict(r) for r in await cur.fetchall()]


async def vms_in_states(cur: Any, states: tuple[str, ...]) -> list[Row]:
    await cur.execute(f"SELECT {VM_COLUMNS}, jobspec FROM vms WHERE state = ANY(%s)", (list(states),))
    return [dict(r) for r in await cur.fetchall()]


async def set_jobspec(cur: Any, vm_id: str, job: dict[str, Any]) -> None:
    await cur.execute("UPDATE vms SET jobspec = %s, updated_at = now() WHERE id = %s", (json.dumps(job), vm_id))


_STAMPS = {"running": "started_at", "stopped": "stopped_at", "destroyed": "destroyed_at"}


async def transition(cur: Any, vm_id: str, to_state: str, *, only_from: tuple[str, ...] | None = None,
                     reason: str | None = None, desired: str | None = None) -> Row | None:
    """Move a VM to ``to_state`` (only from ``only_from``, when given) and record it in its history.

    Returns the updated row, or None when the VM was not in one of ``only_from`` (a lost race):
    the caller decides whether that is a conflict.
    """
    sets = ["state = %s", "updated_at = now()", "error_reason = %s"]
    params: list[Any] = [to_state, reason if to_state in ("error", "stopped") else None]
    if to_state in _STAMPS:
        sets.append(f"{_STAMPS[to_state]} = now()")
    if desired:
        sets.append("desired_state = %s")
        params.append(desired)
    where = "id = %s"
    params.append(vm_id)
    if only_from is not None:
        where += " AND state = ANY(%s)"
        params.append(list(only_from))
    async with cur.begin():
        await cur.execute("SELECT state FROM vms WHERE id = %s FOR UPDATE", (vm_id,))
        before = await cur.fetchone()
        if before is None:
            return None
        await cur.execute(f"UPDATE vms SET {', '.join(sets)} WHERE {where} RETURNING {VM_COLUMNS}", params)
        row = await cur.fetchone()
        if row is None:
            return None
        await cur.execute("INSERT INTO vm_events (vm_id, from_state, to_state, reason) VALUES (%s, %s, %s, %s)",
                          (vm_id, before["state"], to_state, reason))
    return dict(row)


async def require_transition(cur: Any, vm: Row, to_state: str, only_from: tuple[str, ...], action: str,
                             desired: str | None = None) -> Row:
    """Like ``transition`` but a VM in another state is a 409 naming its current state."""
    row = await transition(cur, str(vm["id"]), to_state, only_from=only_from, desired=desired)
    if row is None:
        current = await vm_by_id(cur, str(vm["id"]))
        state = current["state"] if current else "destroyed"
        raise Conflict(f"Cannot {action} a VM that is {state}.", code="invalid_state",
                       details={"state": state, "allowed_from": list(only_from)})
    return row


async def vm_events(cur: Any, vm_id: str) -> list[Row]:
    await cur.execute("SELECT from_state, to_state, reason, created_at FROM vm_events WHERE vm_id = %s ORDER BY id",
                      (vm_id,))
    return [dict(r) for r in await cur.fetchall()]


# ---- audit -----------------------------------------------------------------------------------------

async def audit(cur: Any, *, action: str, outcome: str, user_id: str | None = None, ip: str | None = None,
                vm_id: str | None = None, details: dict[str, Any] | None = None) -> None:
    await cur.execute(
        "INSERT INTO audit_log (user_id, ip, action, vm_id, outcome, details) VALUES (%s, %s, %s, %s, %s, %s)",
        (user_id, ip, action, vm_id, outcome, json.dumps(details or {})))


async def audit_of(cur: Any, user_id: str, limit: int = 100, before_id: int | None = None) -> list[Row]:
    await cur.execute(
        "SELECT id, created_at, ip, action, vm_id, outcome, details FROM audit_log"
        " WHERE user_id = %s AND (%s::bigint IS NULL OR id < %s) ORDER BY id DESC LIMIT %s",
        (user_id, before_id, before_id, limit))
    return [dict(r) for r in await cur.fetchall()]


def is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except (ValueError, TypeError, AttributeError):
        return False
    return True


def is_db_down(exc: BaseException) -> bool:
    """True for errors that mean Postgres is unreachable rather than a bad query."""
    return isinstance(exc, psycopg2.OperationalError | psycopg2.InterfaceError | OSError)
