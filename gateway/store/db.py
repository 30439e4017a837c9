"""Small query functions. Each takes a cursor first (a ``DictCursor`` through aiopg),
returns plain dicts, and raises domain errors; views turn those into HTTP."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import aiopg
import psycopg2
import psycopg2.errors
import psycopg2.extensions

from gateway.config import Settings
from gateway.errors import Conflict, NotFound, QuotaExceeded
from gateway.states import HOLDS_QUOTA_SQL, SNAPSHOT_COUNTS

Row = dict[str, Any]


VM_COLUMNS = ("id, user_id, name, template, cpu, memory_mb, disk_gb, state, desired_state, error_reason,"
              " overlay_path, created_at, updated_at, started_at, stopped_at, destroyed_at, crash_times,"
              " restart_after, suspended_at, restore_snapshot")


class DictCursor(psycopg2.extensions.cursor):
    """Rows as plain dicts, each built in one ``dict(zip(...))``. (psycopg2's RealDictCursor builds a row a
    column at a time through a Python ``__setitem__``: on a list of VMs, a large share of a request.)"""

    def _names(self) -> list[str]:
        return [column[0] for column in self.description or ()]

    def fetchone(self) -> Row | None:
        row = super().fetchone()
        return None if row is None else dict(zip(self._names(), row, strict=True))

    def fetchmany(self, size: int | None = None) -> list[Row]:
        names = self._names()
        rows = super().fetchmany(size) if size is not None else super().fetchmany()
        return [dict(zip(names, row, strict=True)) for row in rows]

    def fetchall(self) -> list[Row]:
        names = self._names()
        return [dict(zip(names, row, strict=True)) for row in super().fetchall()]

    def __iter__(self) -> Iterator[Row]:  # psycopg2's own iteration would skip fetchone and yield tuples
        while (row := self.fetchone()) is not None:
            yield row


@contextlib.asynccontextmanager
async def cursor(pool: aiopg.Pool) -> AsyncIterator[Any]:
    """Yield a dict cursor on a pooled connection (autocommit; use ``cur.begin()`` for transactions)."""
    async with pool.acquire() as conn, conn.cursor(cursor_factory=DictCursor) as cur:
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
        f" coalesce(sum(disk_gb), 0) AS disk_gb FROM vms WHERE user_id = %s AND {HOLDS_QUOTA_SQL}",
        (user_id,))
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
            " desired_state, overlay_path, jobspec)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, 'provisioning', 'running', %s, %s)"
            f" RETURNING {VM_COLUMNS}",
            (vm["id"], user_id, vm["name"], vm["template"], vm["cpu"], vm["memory_mb"], vm["disk_gb"],
             vm["userdata"], vm["overlay_path"], json.dumps(vm["jobspec"]) if vm.get("jobspec") else None))
        row = dict(await cur.fetchone())
        await cur.execute("INSERT INTO vm_events (vm_id, from_state, to_state) VALUES (%s, NULL, 'provisioning')"
                          " RETURNING id", (vm["id"],))
        event = await cur.fetchone()
    return {**row, "event_id": event["id"], "reason": None}


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


# Columns ``transition`` may set besides the state (the lifecycle engine's restart bookkeeping).
_EXTRA_COLUMNS = frozenset({"crash_times", "restart_after", "suspended_at", "restore_snapshot"})


async def transition(cur: Any, vm_id: str, to_state: str, *, only_from: tuple[str, ...] | None = None,
                     reason: str | None = None, desired: str | None = None,
                     extra: dict[str, Any] | None = None) -> Row | None:
    """Move a VM to ``to_state`` (only from ``only_from``, when given) and record it in its history.

    Returns the updated row with ``event_id`` (its history entry), or None when the VM was not in
    one of ``only_from`` (a lost race): the caller decides whether that is a conflict.
    """
    sets = ["state = %s", "updated_at = now()", "error_reason = %s"]
    params: list[Any] = [to_state, reason if to_state in ("error", "stopped") else None]
    if to_state in _STAMPS:
        sets.append(f"{_STAMPS[to_state]} = now()")
    if desired:
        sets.append("desired_state = %s")
        params.append(desired)
    for column, value in (extra or {}).items():
        if column not in _EXTRA_COLUMNS:
            raise ValueError(f"transition cannot set {column}")
        sets.append(f"{column} = %s")
        params.append(value)
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
        await cur.execute("INSERT INTO vm_events (vm_id, from_state, to_state, reason) VALUES (%s, %s, %s, %s)"
                          " RETURNING id", (vm_id, before["state"], to_state, reason))
        event = await cur.fetchone()
    return {**dict(row), "event_id": event["id"], "reason": reason}


async def require_transition(cur: Any, vm: Row, to_state: str, only_from: tuple[str, ...], action: str,
                             desired: str | None = None, extra: dict[str, Any] | None = None) -> Row:
    """Like ``transition`` but a VM in another state is a 409 naming its current state."""
    row = await transition(cur, str(vm["id"]), to_state, only_from=only_from, desired=desired, extra=extra)
    if row is None:
        current = await vm_by_id(cur, str(vm["id"]))
        state = current["state"] if current else "destroyed"
        raise Conflict(f"Cannot {action} a VM that is {state}.", code="invalid_state",
                       details={"state": state, "allowed_from": list(only_from)})
    return row


async def set_desired(cur: Any, vm_id: str, desired: str, only_from: tuple[str, ...]) -> Row | None:
    """Change only what the user wants of a VM in one of ``only_from`` (a VM being suspended that is
    wanted back: the engine finishes the suspend, then resumes it). None when it was in another state."""
    await cur.execute(f"UPDATE vms SET desired_state = %s, updated_at = now() WHERE id = %s AND state = ANY(%s)"
                      f" RETURNING {VM_COLUMNS}", (desired, vm_id, list(only_from)))
    row = await cur.fetchone()
    return {**dict(row), "event_id": None, "reason": None} if row else None


async def vm_events(cur: Any, vm_id: str) -> list[Row]:
    await cur.execute("SELECT from_state, to_state, reason, created_at FROM vm_events WHERE vm_id = %s ORDER BY id",
                      (vm_id,))
    return [dict(r) for r in await cur.fetchall()]


async def events_after(cur: Any, after_id: int, *, vm_id: str | None = None, user_id: str | None = None,
                       limit: int = 500) -> list[Row]:
    """History entries newer than ``after_id`` of one VM or of every VM of one user, with the VM's columns."""
    await cur.execute(
        "SELECT e.id AS event_id, e.to_state AS state, e.reason, e.created_at AS at, v.id AS vm_id, v.user_id,"
        " v.desired_state, v.error_reason FROM vm_events e JOIN vms v ON v.id = e.vm_id"
        " WHERE e.id > %(after)s AND (%(vm)s::uuid IS NULL OR e.vm_id = %(vm)s)"
        " AND (%(user)s::uuid IS NULL OR v.user_id = %(user)s) ORDER BY e.id LIMIT %(limit)s",
        {"after": after_id, "vm": vm_id, "user": user_id, "limit": limit})
    return [dict(r) for r in await cur.fetchall()]


async def live_vms(cur: Any) -> list[Row]:
    """Every VM not destroyed, for the reconciler and the collector; ``snapshot_work``: a snapshot of it
    waits to be made or deleted."""
    await cur.execute(f"SELECT {VM_COLUMNS}, EXISTS (SELECT 1 FROM snapshots s WHERE s.vm_id = vms.id"
                      f" AND s.state IN ('creating', 'deleting')) AS snapshot_work FROM vms WHERE state <> 'destroyed'")
    return [dict(r) for r in await cur.fetchall()]


# ---- snapshots -------------------------------------------------------------------------------------

SNAPSHOT_COLUMNS = ("id, vm_id, user_id, name, state, has_memory, memory_bytes, error_reason, deleted_by, created_at,"
                    " ready_at, deleted_at")
# A snapshot uses its owner's snapshot quota from its request until it is being deleted (or failed).
SNAPSHOT_COUNTS_SQL = "state IN (" + ", ".join(f"'{s}'" for s in sorted(SNAPSHOT_COUNTS)) + ")"


def snapshot_tag(snapshot_id: str) -> str:
    """The qcow2 internal snapshot's tag of a user's snapshot."""
    return f"s-{snapshot_id}"


async def snapshot_usage(cur: Any, user_id: str) -> int:
    await cur.execute(f"SELECT count(*) AS n FROM snapshots WHERE user_id = %s AND {SNAPSHOT_COUNTS_SQL}", (user_id,))
    return int((await cur.fetchone())["n"])


async def request_snapshot(cur: Any, user_id: str, vm_id: str, name: str, quota: int) -> Row:
    """Record a snapshot to be made (state ``creating``) if it fits the owner's snapshot quota and its name
    is free on the VM; under the owner's row lock, like VM admission."""
    async with cur.begin():
        await cur.execute("SELECT id FROM users WHERE id = %s FOR UPDATE", (user_id,))
        used = await snapshot_usage(cur, user_id)
        if used + 1 > quota:
            raise QuotaExceeded(f"You have {used} of your {quota} snapshots; delete one first.",
                                details={"exceeded": {"snapshots": {"quota": quota, "used": used, "requested": 1}}})
        try:
            await cur.execute(
                "INSERT INTO snapshots (id, vm_id, user_id, name, state) VALUES (%s, %s, %s, %s, 'creating')"
                f" RETURNING {SNAPSHOT_COLUMNS}", (str(uuid.uuid4()), vm_id, user_id, name))
        except psycopg2.errors.UniqueViolation:
            raise Conflict("This VM already has a snapshot of that name.", code="name_taken",
                           details={"field": "name"}) from None
        return dict(await cur.fetchone())


async def snapshots_of(cur: Any, vm_id: str, include_gone: bool = False) -> list[Row]:
    """A VM's snapshots, oldest first; ``include_gone`` adds deleted and failed ones."""
    where = "" if include_gone else " AND state IN ('creating', 'ready', 'deleting')"
    await cur.execute(f"SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE vm_id = %s{where} ORDER BY created_at, id",
                      (vm_id,))
    return [dict(r) for r in await cur.fetchall()]


async def snapshot_of_vm(cur: Any, vm_id: str, snapshot_id: str) -> Row:
    """One snapshot of the VM that is not gone; NotFound otherwise (the VM's ownership is checked already)."""
    if not is_uuid(snapshot_id):
        raise NotFound("No such snapshot.")
    await cur.execute(f"SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE id = %s AND vm_id = %s"
                      " AND state IN ('creating', 'ready', 'deleting')", (snapshot_id, vm_id))
    row = await cur.fetchone()
    if row is None:
        raise NotFound("No such snapshot.")
    return dict(row)


async def snapshot_by_id(cur: Any, snapshot_id: str) -> Row | None:
    await cur.execute(f"SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE id = %s", (snapshot_id,))
    row = await cur.fetchone()
    return dict(row) if row else None


async def set_snapshot(cur: Any, snapshot_id: str, state: str, *, only_from: tuple[str, ...],
                       **columns: Any) -> Row | None:
    """Move a snapshot to ``state`` from one of ``only_from``, setting ``columns`` (has_memory, memory_bytes,
    error_reason, deleted_by); None when it was in another state."""
    allowed = {"has_memory", "memory_bytes", "error_reason", "deleted_by"}
    if set(columns) - allowed:
        raise ValueError(f"set_snapshot cannot set {sorted(set(columns) - allowed)}")
    stamp = {"ready": ", ready_at = now()", "deleted": ", deleted_at = now()"}.get(state, "")
    sets = "".join(f", {name} = %s" for name in columns)
    await cur.execute(f"UPDATE snapshots SET state = %s{stamp}{sets} WHERE id = %s AND state = ANY(%s)"
                      f" RETURNING {SNAPSHOT_COLUMNS}", (state, *columns.values(), snapshot_id, list(only_from)))
    row = await cur.fetchone()
    return dict(row) if row else None


async def snapshot_work(cur: Any, vm_id: str) -> list[Row]:
    """The VM's snapshots waiting to be made or deleted, oldest request first."""
    await cur.execute(f"SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE vm_id = %s AND state IN ('creating', 'deleting')"
                      " ORDER BY created_at, id", (vm_id,))
    return [dict(r) for r in await cur.fetchall()]


async def forget_snapshots(cur: Any, vm_id: str, why: str) -> None:
    """Every snapshot of a VM whose disk is gone is gone with it."""
    await cur.execute("UPDATE snapshots SET state = CASE WHEN state = 'creating' THEN 'error' ELSE 'deleted' END,"
                      " deleted_at = now(), deleted_by = %s"
                      " WHERE vm_id = %s AND state IN ('creating', 'ready', 'deleting')",
                      (why, vm_id))


async def expire_snapshots(cur: Any, keep: int, max_age: int) -> list[Row]:
    """Mark for deletion the ready snapshots retention no longer keeps: beyond the newest ``keep`` of their VM
    (0: no limit) or older than ``max_age`` seconds (0: no limit). Returns them (their VMs need work)."""
    await cur.execute(
        "WITH ranked AS (SELECT id, created_at,"
        " row_number() OVER (PARTITION BY vm_id ORDER BY created_at DESC, id DESC) AS newest"
        " FROM snapshots WHERE state = 'ready')"
        " UPDATE snapshots s SET state = 'deleting', deleted_by = CASE WHEN %(keep)s > 0 AND r.newest > %(keep)s"
        " THEN 'retention: keep ' || %(keep)s ELSE 'retention: older than ' || %(age)s || ' s' END"
        " FROM ranked r WHERE s.id = r.id AND s.state = 'ready'"
        " AND ((%(keep)s > 0 AND r.newest > %(keep)s)"
        " OR (%(age)s > 0 AND r.created_at < now() - make_interval(secs => %(age)s)))"
        f" RETURNING {', '.join('s.' + c.strip() for c in SNAPSHOT_COLUMNS.split(','))}",
        {"keep": keep, "age": max_age})
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


async def audit_page(cur: Any, limit: int, before_id: int | None = None, *, user_id: str | None = None,
                     vm_id: str | None = None, action: str | None = None) -> list[Row]:
    """Every user's entries, newest first; ``action`` matches a prefix (``admin.`` finds every admin action)."""
    await cur.execute(
        "SELECT id, created_at, user_id, ip, action, vm_id, outcome, details FROM audit_log"
        " WHERE (%(before)s::bigint IS NULL OR id < %(before)s) AND (%(user)s::uuid IS NULL OR user_id = %(user)s)"
        " AND (%(vm)s::uuid IS NULL OR vm_id = %(vm)s)"
        " AND (%(action)s::text IS NULL OR left(action, length(%(action)s)) = %(action)s)"
        " ORDER BY id DESC LIMIT %(limit)s",
        {"before": before_id, "user": user_id, "vm": vm_id, "action": action, "limit": limit})
    return [dict(r) for r in await cur.fetchall()]


# ---- API tokens ------------------------------------------------------------------------------------

API_TOKEN_COLUMNS = "id, user_id, name, prefix, created_at, expires_at, last_used_at, revoked_at"  # noqa: S105


async def create_api_token(cur: Any, user_id: str, *, name: str, token_hash: str, prefix: str, expires_in: int,
                           max_live: int) -> Row:
    """Store a new token (its hash only) unless the user already has ``max_live`` usable ones."""
    async with cur.begin():
        # Serialises a user's concurrent creates, so the cap holds.
        await cur.execute("SELECT id FROM users WHERE id = %s FOR UPDATE", (user_id,))
        await cur.execute("SELECT count(*) AS n FROM api_tokens WHERE user_id = %s AND revoked_at IS NULL"
                          " AND expires_at > now()", (user_id,))
        if int((await cur.fetchone())["n"]) >= max_live:
            raise Conflict(f"You already have {max_live} active API tokens; revoke one first.",
                           code="too_many_tokens", details={"max": max_live})
        await cur.execute(
            "INSERT INTO api_tokens (id, user_id, name, token_hash, prefix, expires_at)"
            " VALUES (%s, %s, %s, %s, %s, now() + make_interval(secs => %s))"
            f" RETURNING {API_TOKEN_COLUMNS}",
            (str(uuid.uuid4()), user_id, name, token_hash, prefix, expires_in))
        return dict(await cur.fetchone())


async def api_tokens_of(cur: Any, user_id: str, limit: int, after: tuple[Any, str] | None = None) -> list[Row]:
    """A user's tokens (revoked and expired ones too), newest first, after the cursor (created_at, id)."""
    at, last_id = after if after is not None else (None, None)
    await cur.execute(
        f"SELECT {API_TOKEN_COLUMNS} FROM api_tokens WHERE user_id = %s"
        " AND (%s::timestamptz IS NULL OR (created_at, id) < (%s::timestamptz, %s::uuid))"
        " ORDER BY created_at DESC, id DESC LIMIT %s",
        (user_id, at, at, last_id, limit))
    return [dict(r) for r in await cur.fetchall()]


async def revoke_api_token(cur: Any, token_id: str, user_id: str) -> Row:
    """Revoke the owner's token (again is a no-op); another user's or a malformed id is NotFound."""
    if not is_uuid(token_id):
        raise NotFound("No such API token.")
    await cur.execute(
        "UPDATE api_tokens SET revoked_at = coalesce(revoked_at, now()) WHERE id = %s AND user_id = %s"
        f" RETURNING {API_TOKEN_COLUMNS}, (revoked_at = now()) AS revoked_now", (token_id, user_id))
    row = await cur.fetchone()
    if row is None:
        raise NotFound("No such API token.")
    return dict(row)


async def revoke_api_tokens_of(cur: Any, user_id: str) -> int:
    """Revoke every usable token of a user; returns how many."""
    await cur.execute("UPDATE api_tokens SET revoked_at = now() WHERE user_id = %s AND revoked_at IS NULL"
                      " AND expires_at > now()", (user_id,))
    return int(cur.rowcount)


# ---- administration --------------------------------------------------------------------------------

# The API's quota names and the users columns that override them (NULL: the configured default).
QUOTA_COLUMNS = {"vms": "quota_max_vms", "vcpus": "quota_vcpus", "memory_mb": "quota_memory_mb",
                 "disk_gb": "quota_disk_gb"}
_ADMIN_USER_SQL = (
    "SELECT u.id, u.email, u.role, u.is_active, u.email_verified_at, u.created_at, u.quota_max_vms, u.quota_vcpus,"
    " u.quota_memory_mb, u.quota_disk_gb, us.vms AS used_vms, us.vcpus AS used_vcpus,"
    " us.memory_mb AS used_memory_mb, us.disk_gb AS used_disk_gb FROM users u CROSS JOIN LATERAL"
    " (SELECT count(*) AS vms, coalesce(sum(cpu), 0) AS vcpus, coalesce(sum(memory_mb), 0) AS memory_mb,"
    f" coalesce(sum(disk_gb), 0) AS disk_gb FROM vms WHERE vms.user_id = u.id AND {HOLDS_QUOTA_SQL}) us")


def usage_in(row: Row) -> Resources:
    """The usage columns ``users_page`` and ``user_for_admin`` add to a user row."""
    return Resources(int(row["used_vms"]), int(row["used_vcpus"]), int(row["used_memory_mb"]),
                     int(row["used_disk_gb"]))


async def users_page(cur: Any, limit: int, after: tuple[Any, str] | None = None,
                     email_contains: str | None = None) -> list[Row]:
    """Users with their usage, newest first, after the cursor (created_at, id)."""
    at, last_id = after if after is not None else (None, None)
    await cur.execute(
        _ADMIN_USER_SQL + " WHERE (%(at)s::timestamptz IS NULL OR (u.created_at, u.id) < (%(at)s, %(id)s::uuid))"
        " AND (%(email)s::text IS NULL OR strpos(lower(u.email), lower(%(email)s)) > 0)"
        " ORDER BY u.created_at DESC, u.id DESC LIMIT %(limit)s",
        {"at": at, "id": last_id, "email": email_contains, "limit": limit})
    return [dict(r) for r in await cur.fetchall()]


async def user_for_admin(cur: Any, user_id: str) -> Row:
    """One user with their usage; NotFound for an unknown or malformed id."""
    if not is_uuid(user_id):
        raise NotFound("No such user.")
    await cur.execute(_ADMIN_USER_SQL + " WHERE u.id = %(id)s", {"id": user_id})
    row = await cur.fetchone()
    if row is None:
        raise NotFound("No such user.")
    return dict(row)


async def lock_user(cur: Any, user_id: str) -> Row:
    """The user's row, locked until the transaction ends (the same lock VM admission takes)."""
    if not is_uuid(user_id):
        raise NotFound("No such user.")
    await cur.execute("SELECT * FROM users WHERE id = %s FOR UPDATE", (user_id,))
    row = await cur.fetchone()
    if row is None:
        raise NotFound("No such user.")
    return dict(row)


async def set_quota(cur: Any, user_id: str, overrides: dict[str, int | None]) -> None:
    """Set some of a user's quota overrides (keys of QUOTA_COLUMNS); None restores the default."""
    if overrides:
        sets = ", ".join(f"{QUOTA_COLUMNS[name]} = %s" for name in overrides)
        await cur.execute(f"UPDATE users SET {sets} WHERE id = %s", (*overrides.values(), user_id))


async def set_active(cur: Any, user_id: str, active: bool) -> None:
    await cur.execute("UPDATE users SET is_active = %s WHERE id = %s", (active, user_id))


async def make_admin(cur: Any, user_id: str) -> None:
    """Give the admin role; an operator vouches for the address, so it counts as verified."""
    await cur.execute("UPDATE users SET role = 'admin', email_verified_at = coalesce(email_verified_at, now())"
                      " WHERE id = %s", (user_id,))


async def vms_page(cur: Any, limit: int, after: tuple[Any, str] | None = None, *, user_id: str | None = None,
                   state: str | None = None, include_destroyed: bool = False) -> list[Row]:
    """Every user's VMs with the owner's email, newest first, after the cursor (created_at, id)."""
    at, last_id = after if after is not None else (None, None)
    await cur.execute(
        f"SELECT {VM_COLUMNS}, (SELECT email FROM users WHERE users.id = vms.user_id) AS owner_email FROM vms"
        " WHERE (%(at)s::timestamptz IS NULL OR (created_at, id) < (%(at)s, %(id)s::uuid))"
        " AND (%(user)s::uuid IS NULL OR user_id = %(user)s) AND (%(state)s::text IS NULL OR state = %(state)s)"
        " AND (%(all)s OR state <> 'destroyed')"
        " ORDER BY created_at DESC, id DESC LIMIT %(limit)s",
        {"at": at, "id": last_id, "user": user_id, "state": state, "all": include_destroyed, "limit": limit})
    return [dict(r) for r in await cur.fetchall()]


async def running_vm_ids(cur: Any, user_id: str) -> list[str]:
    await cur.execute("SELECT id FROM vms WHERE user_id = %s AND state = 'running' ORDER BY created_at",
                      (user_id,))
    return [str(r["id"]) for r in await cur.fetchall()]


def is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except (ValueError, TypeError, AttributeError):
        return False
    return True


def is_db_down(exc: BaseException) -> bool:
    """True for errors that mean Postgres is unreachable rather than a bad query."""
    return isinstance(exc, psycopg2.OperationalError | psycopg2.InterfaceError | OSError)
