"""What clients see of each kind of row: one function per kind, used by the API's routes and by the pages
alike, so a page and ``/api`` never disagree (docs/API.md describes the fields)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from gateway import store
from gateway.config import Settings
from gateway.rows import AdminUserRow, SnapshotRow, UserRow, VmEvent, VmRow


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def public_user(user: UserRow) -> dict[str, Any]:
    """A user as they and the pages see themselves."""
    return {
        "id": str(user["id"]),
        "email": user["email"],
        "role": user["role"],
        "email_verified": user.get("email_verified_at") is not None,
        "is_active": user.get("is_active", True),
        "created_at": user["created_at"].isoformat(),
    }


def admin_user(row: AdminUserRow, settings: Settings, storage_bytes: int) -> dict[str, Any]:
    """A user as admins see them: the public view plus quota (effective and overrides) and usage
    (``storage_bytes``: what their files take on disk, measured by the caller)."""
    return {**public_user(row),
            "quota": {**store.users.quota_of(row, settings).to_json(),
                      "storage_gb": store.users.storage_quota_bytes(row, settings) // store.users.GIB},
            "quota_overrides": {name: row[column] for name, column in store.users.QUOTA_COLUMNS.items()},
            "usage": {**store.users.usage_in(row).to_json(), "storage_bytes": storage_bytes}}


def public_vm(row: VmRow, public_url: str) -> dict[str, Any]:
    """The API's view of a VM row."""
    vm_id = str(row["id"])
    return {
        "vm_id": vm_id,
        "name": row["name"],
        "template": row["template"],
        "cpu": row["cpu"],
        "memory_mb": row["memory_mb"],
        "disk_gb": row["disk_gb"],
        "network": row.get("network", "none"),
        "state": row["state"],
        "desired_state": row["desired_state"],
        "error": row["error_reason"],
        "vnc_url": f"{public_url}/vms/{vm_id}/console",
        "created_at": _iso(row["created_at"]),
        "updated_at": _iso(row["updated_at"]),
        "started_at": _iso(row["started_at"]),
        "stopped_at": _iso(row["stopped_at"]),
        "suspended_at": _iso(row.get("suspended_at")),
    }


def history(events: list[VmEvent]) -> list[dict[str, Any]]:
    """A VM's history entries, oldest first."""
    return [{"from": e["from_state"], "to": e["to_state"], "reason": e["reason"], "at": e["created_at"].isoformat()}
            for e in events]


def public_snapshot(row: SnapshotRow) -> dict[str, Any]:
    """The API's view of a snapshot row."""
    return {
        "snapshot_id": str(row["id"]),
        "vm_id": str(row["vm_id"]),
        "name": row["name"],
        "state": row["state"],
        "memory": row["has_memory"],
        "memory_bytes": row["memory_bytes"],
        "error": row["error_reason"],
        "deleted_by": row["deleted_by"],
        "created_at": _iso(row["created_at"]),
        "ready_at": _iso(row["ready_at"]),
        "deleted_at": _iso(row["deleted_at"]),
    }


def public_token(row: Mapping[str, Any], current_id: str | None = None) -> dict[str, Any]:
    """The listing view of an API token: never the token itself."""
    return {
        "id": str(row["id"]),
        "name": row["name"],
        "prefix": row["prefix"],
        "created_at": _iso(row["created_at"]),
        "expires_at": _iso(row["expires_at"]),
        "last_used_at": _iso(row["last_used_at"]),
        "revoked": row["revoked_at"] is not None,
        "revoked_at": _iso(row["revoked_at"]),
        "current": current_id is not None and str(row["id"]) == current_id,
    }


def audit_entry(row: Mapping[str, Any], *, with_user: bool = False) -> dict[str, Any]:
    """The API's view of an audit_log row (``with_user`` adds whose entry it is, for admins)."""
    entry: dict[str, Any] = {"id": row["id"], "at": row["created_at"].isoformat(), "action": row["action"],
                             "outcome": row["outcome"], "vm_id": str(row["vm_id"]) if row["vm_id"] else None,
                             "ip": row["ip"], "details": row["details"]}
    if with_user:
        entry["user_id"] = str(row["user_id"]) if row["user_id"] else None
    return entry
