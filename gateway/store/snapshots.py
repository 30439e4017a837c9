"""Users' snapshots of their VMs: requests under the owner's snapshot quota, reads, state changes, retention
(docs/SNAPSHOTS.md). A snapshot's row is never removed; ``deleted`` and ``error`` ones are history."""

from __future__ import annotations

import uuid
from typing import Any, cast

import aiopg
import psycopg2.errors

from gateway.errors import Conflict, NotFound, QuotaExceeded
from gateway.rows import SnapshotRow
from gateway.states import SNAPSHOT_COUNTS
from gateway.store.db import fetch_all, fetch_found, fetch_one, fetch_returned, is_uuid

SNAPSHOT_COLUMNS = ("id, vm_id, user_id, name, state, has_memory, memory_bytes, error_reason, deleted_by, created_at,"
                    " ready_at, deleted_at")
# A snapshot uses its owner's snapshot quota from its request until it is being deleted (or failed).
SNAPSHOT_COUNTS_SQL = "state IN (" + ", ".join(f"'{s}'" for s in sorted(SNAPSHOT_COUNTS)) + ")"


def snapshot_tag(snapshot_id: str) -> str:
    """The qcow2 internal snapshot's tag of a user's snapshot."""
    return f"s-{snapshot_id}"


async def snapshot_usage(cur: aiopg.Cursor, user_id: str) -> int:
    """How many of the user's snapshots count against their snapshot quota."""
    await cur.execute(f"SELECT count(*) AS n FROM snapshots WHERE user_id = %s AND {SNAPSHOT_COUNTS_SQL}", (user_id,))
    return int((await fetch_returned(cur))["n"])


async def request_snapshot(cur: aiopg.Cursor, user_id: str, vm_id: str, name: str, quota: int) -> SnapshotRow:
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
        return cast(SnapshotRow, await fetch_returned(cur))


async def snapshots_of(cur: aiopg.Cursor, vm_id: str, include_gone: bool = False) -> list[SnapshotRow]:
    """A VM's snapshots, oldest first; ``include_gone`` adds deleted and failed ones."""
    where = "" if include_gone else " AND state IN ('creating', 'ready', 'deleting')"
    await cur.execute(f"SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE vm_id = %s{where} ORDER BY created_at, id",
                      (vm_id,))
    return cast(list[SnapshotRow], await fetch_all(cur))


async def snapshot_of_vm(cur: aiopg.Cursor, vm_id: str, snapshot_id: str) -> SnapshotRow:
    """One snapshot of the VM that is not gone; NotFound otherwise (the VM's ownership is checked already)."""
    if not is_uuid(snapshot_id):
        raise NotFound("No such snapshot.")
    await cur.execute(f"SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE id = %s AND vm_id = %s"
                      " AND state IN ('creating', 'ready', 'deleting')", (snapshot_id, vm_id))
    return cast(SnapshotRow, await fetch_found(cur, "No such snapshot."))


async def snapshot_by_id(cur: aiopg.Cursor, snapshot_id: str) -> SnapshotRow | None:
    await cur.execute(f"SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE id = %s", (snapshot_id,))
    return cast("SnapshotRow | None", await fetch_one(cur))


async def set_snapshot(cur: aiopg.Cursor, snapshot_id: str, state: str, *, only_from: tuple[str, ...],
                       **columns: Any) -> SnapshotRow | None:
    """Move a snapshot to ``state`` from one of ``only_from``, setting ``columns`` (has_memory, memory_bytes,
    error_reason, deleted_by); None when it was in another state."""
    allowed = {"has_memory", "memory_bytes", "error_reason", "deleted_by"}
    if set(columns) - allowed:
        raise ValueError(f"set_snapshot cannot set {sorted(set(columns) - allowed)}")
    stamp = {"ready": ", ready_at = now()", "deleted": ", deleted_at = now()"}.get(state, "")
    sets = "".join(f", {name} = %s" for name in columns)
    await cur.execute(f"UPDATE snapshots SET state = %s{stamp}{sets} WHERE id = %s AND state = ANY(%s)"
                      f" RETURNING {SNAPSHOT_COLUMNS}", (state, *columns.values(), snapshot_id, list(only_from)))
    return cast("SnapshotRow | None", await fetch_one(cur))


async def snapshot_work(cur: aiopg.Cursor, vm_id: str) -> list[SnapshotRow]:
    """The VM's snapshots waiting to be made or deleted, oldest request first."""
    await cur.execute(f"SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE vm_id = %s AND state IN ('creating', 'deleting')"
                      " ORDER BY created_at, id", (vm_id,))
    return cast(list[SnapshotRow], await fetch_all(cur))


async def forget_snapshots(cur: aiopg.Cursor, vm_id: str, why: str) -> None:
    """Every snapshot of a VM whose disk is gone is gone with it."""
    await cur.execute("UPDATE snapshots SET state = CASE WHEN state = 'creating' THEN 'error' ELSE 'deleted' END,"
                      " deleted_at = now(), deleted_by = %s"
                      " WHERE vm_id = %s AND state IN ('creating', 'ready', 'deleting')",
                      (why, vm_id))


async def expire_snapshots(cur: aiopg.Cursor, keep: int, max_age: int) -> list[SnapshotRow]:
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
    return cast(list[SnapshotRow], await fetch_all(cur))
