"""VMs: admission under the owner's quota, reads, state changes as compare-and-set with their history
(``vm_events``), and the lists the engine, the event streams and the administrators read."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, cast

import aiopg

from gateway.config import Settings
from gateway.errors import Conflict, NotFound, QuotaExceeded
from gateway.rows import AdminVm, LiveVm, VmChange, VmEvent, VmRow
from gateway.store.db import Row, fetch_all, fetch_found, fetch_one, fetch_returned, is_uuid
from gateway.store.users import Resources, lock_user, quota_of, usage_of

VM_COLUMNS = ("id, user_id, name, template, cpu, memory_mb, disk_gb, state, desired_state, error_reason,"
              " overlay_path, created_at, updated_at, started_at, stopped_at, destroyed_at, crash_times,"
              " restart_after, suspended_at, restore_snapshot, network")


def _change(row: Row, event_id: int | None, reason: str | None) -> VmChange:
    return cast(VmChange, {**row, "event_id": event_id, "reason": reason})


# ---- admission and reads ---------------------------------------------------------------------------

async def admit_vm(cur: aiopg.Cursor, settings: Settings, user_id: str, vm: Mapping[str, Any]) -> VmChange:
    """Insert a VM in state ``provisioning`` if it fits the owner's quota, atomically.

    The owner's row is locked for the transaction, so concurrent creates by one user are
    admitted one at a time and can never exceed the quota together.
    """
    async with cur.begin():
        quota = quota_of(await lock_user(cur, user_id), settings)
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
            " desired_state, overlay_path, jobspec, network)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, 'provisioning', 'running', %s, %s, %s)"
            f" RETURNING {VM_COLUMNS}",
            (vm["id"], user_id, vm["name"], vm["template"], vm["cpu"], vm["memory_mb"], vm["disk_gb"],
             vm["userdata"], vm["overlay_path"], json.dumps(vm["jobspec"]) if vm.get("jobspec") else None,
             vm.get("network", "none")))
        row = await fetch_returned(cur)
        await cur.execute("INSERT INTO vm_events (vm_id, from_state, to_state) VALUES (%s, NULL, 'provisioning')"
                          " RETURNING id", (vm["id"],))
        event = await fetch_returned(cur)
    return _change(row, event["id"], None)


async def vm_for_owner(cur: aiopg.Cursor, vm_id: str, user_id: str) -> VmRow:
    """The VM if it exists and belongs to ``user_id``; otherwise NotFound (never Forbidden)."""
    if not is_uuid(vm_id):
        raise NotFound("No such VM.")
    await cur.execute(f"SELECT {VM_COLUMNS}, jobspec FROM vms WHERE id = %s AND user_id = %s", (vm_id, user_id))
    return cast(VmRow, await fetch_found(cur, "No such VM."))


async def vm_by_id(cur: aiopg.Cursor, vm_id: str) -> VmRow | None:
    await cur.execute(f"SELECT {VM_COLUMNS}, jobspec FROM vms WHERE id = %s", (vm_id,))
    return cast("VmRow | None", await fetch_one(cur))


async def vms_of(cur: aiopg.Cursor, user_id: str, include_destroyed: bool = False) -> list[VmRow]:
    """The user's VMs, oldest first (without their jobs)."""
    where = "" if include_destroyed else " AND state <> 'destroyed'"
    await cur.execute(f"SELECT {VM_COLUMNS} FROM vms WHERE user_id = %s{where} ORDER BY created_at, id",
                      (user_id,))
    return cast(list[VmRow], await fetch_all(cur))


async def vms_in_states(cur: aiopg.Cursor, states: tuple[str, ...]) -> list[VmRow]:
    await cur.execute(f"SELECT {VM_COLUMNS}, jobspec FROM vms WHERE state = ANY(%s)", (list(states),))
    return cast(list[VmRow], await fetch_all(cur))


async def set_network(cur: aiopg.Cursor, vm_id: str, network: str, job: dict[str, Any],
                      only_from: tuple[str, ...]) -> VmRow | None:
    """Give the VM ``network`` and the job that runs it, if it is in one of ``only_from`` (else None): one
    statement, so a start cannot slip in between the check and the change."""
    await cur.execute(f"UPDATE vms SET network = %s, jobspec = %s, updated_at = now() WHERE id = %s AND state = ANY(%s)"
                      f" RETURNING {VM_COLUMNS}", (network, json.dumps(job), vm_id, list(only_from)))
    return cast("VmRow | None", await fetch_one(cur))


async def set_jobspec(cur: aiopg.Cursor, vm_id: str, job: dict[str, Any]) -> None:
    await cur.execute("UPDATE vms SET jobspec = %s, updated_at = now() WHERE id = %s", (json.dumps(job), vm_id))


# ---- state changes ---------------------------------------------------------------------------------

_STAMPS = {"running": "started_at", "stopped": "stopped_at", "destroyed": "destroyed_at"}


# Columns ``transition`` may set besides the state (the lifecycle engine's restart bookkeeping).
_EXTRA_COLUMNS = frozenset({"crash_times", "restart_after", "suspended_at", "restore_snapshot"})


async def transition(cur: aiopg.Cursor, vm_id: str, to_state: str, *, only_from: tuple[str, ...] | None = None,
                     reason: str | None = None, desired: str | None = None,
                     extra: dict[str, Any] | None = None) -> VmChange | None:
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
        before = await fetch_one(cur)
        if before is None:
            return None
        await cur.execute(f"UPDATE vms SET {', '.join(sets)} WHERE {where} RETURNING {VM_COLUMNS}", params)
        row = await fetch_one(cur)
        if row is None:
            return None
        await cur.execute("INSERT INTO vm_events (vm_id, from_state, to_state, reason) VALUES (%s, %s, %s, %s)"
                          " RETURNING id", (vm_id, before["state"], to_state, reason))
        event = await fetch_returned(cur)
    return _change(row, event["id"], reason)


async def require_transition(cur: aiopg.Cursor, vm: Mapping[str, Any], to_state: str, only_from: tuple[str, ...],
                             action: str, desired: str | None = None,
                             extra: dict[str, Any] | None = None) -> VmChange:
    """Like ``transition`` but a VM in another state is a 409 naming its current state."""
    row = await transition(cur, str(vm["id"]), to_state, only_from=only_from, desired=desired, extra=extra)
    if row is None:
        current = await vm_by_id(cur, str(vm["id"]))
        state = current["state"] if current else "destroyed"
        raise Conflict(f"Cannot {action} a VM that is {state}.", code="invalid_state",
                       details={"state": state, "allowed_from": list(only_from)})
    return row


async def set_desired(cur: aiopg.Cursor, vm_id: str, desired: str, only_from: tuple[str, ...]) -> VmChange | None:
    """Change only what the user wants of a VM in one of ``only_from`` (a VM being suspended that is
    wanted back: the engine finishes the suspend, then resumes it). None when it was in another state."""
    await cur.execute(f"UPDATE vms SET desired_state = %s, updated_at = now() WHERE id = %s AND state = ANY(%s)"
                      f" RETURNING {VM_COLUMNS}", (desired, vm_id, list(only_from)))
    row = await fetch_one(cur)
    return _change(row, None, None) if row else None


# ---- history ---------------------------------------------------------------------------------------

async def vm_events(cur: aiopg.Cursor, vm_id: str) -> list[VmEvent]:
    """A VM's history, oldest first."""
    await cur.execute("SELECT from_state, to_state, reason, created_at FROM vm_events WHERE vm_id = %s ORDER BY id",
                      (vm_id,))
    return cast(list[VmEvent], await fetch_all(cur))


async def events_after(cur: aiopg.Cursor, after_id: int, *, vm_id: str | None = None, user_id: str | None = None,
                       limit: int = 500) -> list[Row]:
    """History entries newer than ``after_id`` of one VM or of every VM of one user, with the VM's columns."""
    await cur.execute(
        "SELECT e.id AS event_id, e.to_state AS state, e.reason, e.created_at AS at, v.id AS vm_id, v.user_id,"
        " v.desired_state, v.error_reason FROM vm_events e JOIN vms v ON v.id = e.vm_id"
        " WHERE e.id > %(after)s AND (%(vm)s::uuid IS NULL OR e.vm_id = %(vm)s)"
        " AND (%(user)s::uuid IS NULL OR v.user_id = %(user)s) ORDER BY e.id LIMIT %(limit)s",
        {"after": after_id, "vm": vm_id, "user": user_id, "limit": limit})
    return await fetch_all(cur)


async def current_states(cur: aiopg.Cursor, user_id: str, vm_id: str | None = None) -> list[Row]:
    """The state of the user's VM ``vm_id`` (or of each of their VMs not destroyed) with its latest history
    entry's id (``event_id``), oldest VM first: what an event stream sends first."""
    await cur.execute(
        "SELECT v.id, v.user_id, v.state, v.desired_state, v.error_reason, v.updated_at,"
        " (SELECT max(e.id) FROM vm_events e WHERE e.vm_id = v.id) AS event_id FROM vms v"
        " WHERE v.user_id = %(user)s AND (%(vm)s::uuid IS NULL AND v.state <> 'destroyed' OR v.id = %(vm)s)"
        " ORDER BY v.created_at, v.id", {"user": user_id, "vm": vm_id})
    return await fetch_all(cur)


# ---- the engine's and the administrators' lists ----------------------------------------------------

async def live_vms(cur: aiopg.Cursor) -> list[LiveVm]:
    """Every VM not destroyed, for the reconciler and the collector; ``snapshot_work``: a snapshot of it
    waits to be made or deleted."""
    await cur.execute(f"SELECT {VM_COLUMNS}, EXISTS (SELECT 1 FROM snapshots s WHERE s.vm_id = vms.id"
                      f" AND s.state IN ('creating', 'deleting')) AS snapshot_work FROM vms WHERE state <> 'destroyed'")
    return cast(list[LiveVm], await fetch_all(cur))


async def count_in_states(cur: aiopg.Cursor, states: tuple[str, ...]) -> dict[str, int]:
    """How many VMs are in each of ``states`` (a state no VM is in is left out)."""
    await cur.execute("SELECT state, count(*) AS n FROM vms WHERE state = ANY(%s) GROUP BY state", (list(states),))
    return {r["state"]: int(r["n"]) for r in await fetch_all(cur)}


async def vms_page(cur: aiopg.Cursor, limit: int, after: tuple[Any, str] | None = None, *,
                   user_id: str | None = None, state: str | None = None,
                   include_destroyed: bool = False) -> list[AdminVm]:
    """Every user's VMs with the owner's email, newest first, after the cursor (created_at, id)."""
    at, last_id = after if after is not None else (None, None)
    await cur.execute(
        f"SELECT {VM_COLUMNS}, (SELECT email FROM users WHERE users.id = vms.user_id) AS owner_email FROM vms"
        " WHERE (%(at)s::timestamptz IS NULL OR (created_at, id) < (%(at)s, %(id)s::uuid))"
        " AND (%(user)s::uuid IS NULL OR user_id = %(user)s) AND (%(state)s::text IS NULL OR state = %(state)s)"
        " AND (%(all)s OR state <> 'destroyed')"
        " ORDER BY created_at DESC, id DESC LIMIT %(limit)s",
        {"at": at, "id": last_id, "user": user_id, "state": state, "all": include_destroyed, "limit": limit})
    return cast(list[AdminVm], await fetch_all(cur))


async def running_vm_ids(cur: aiopg.Cursor, user_id: str) -> list[str]:
    await cur.execute("SELECT id FROM vms WHERE user_id = %s AND state = 'running' ORDER BY created_at",
                      (user_id,))
    return [str(r["id"]) for r in await fetch_all(cur)]
