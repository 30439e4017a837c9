"""The rows the store hands to the engine and the web layer, typed: one ``TypedDict`` per shape a query returns.

Keys are the columns' names, values what psycopg2 gives for their types (uuid as ``str``, timestamptz as an aware
``datetime``, jsonb as parsed JSON). ``state`` stays a ``str``: it equals the ``gateway.states`` enum members
without being one. A subclass is a query that returns the same columns and more; a ``NotRequired`` key is one
that some queries of that shape leave out.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, NotRequired, TypedDict


class VmRow(TypedDict):
    """A VM: the columns of ``gateway.store.vms.VM_COLUMNS``."""

    id: str
    user_id: str
    name: str
    template: str
    cpu: int
    memory_mb: int
    disk_gb: int
    state: str
    desired_state: str
    error_reason: str | None
    overlay_path: str | None
    created_at: dt.datetime
    updated_at: dt.datetime
    started_at: dt.datetime | None
    stopped_at: dt.datetime | None
    destroyed_at: dt.datetime | None
    crash_times: list[dt.datetime]
    restart_after: dt.datetime | None
    suspended_at: dt.datetime | None
    restore_snapshot: str | None
    network: str  # outbound or none (docs/NETWORK.md)
    # The rendered Nomad job: read with one VM (and by the engine), left out of lists.
    jobspec: NotRequired[dict[str, Any] | None]


class VmChange(VmRow):
    """A VM as a change of it left it, with the history entry the change wrote (None: only what the owner wants
    changed, no state) and that entry's reason."""

    event_id: int | None
    reason: str | None


class LiveVm(VmRow):
    """A VM not destroyed, as the reconciler and the collector read it."""

    snapshot_work: bool  # a snapshot of it waits to be made or deleted


class AdminVm(VmRow):
    """A VM in the administrators' list, with its owner's address."""

    owner_email: str | None


class VmEvent(TypedDict):
    """One entry of a VM's history (``vm_events``)."""

    from_state: str | None
    to_state: str
    reason: str | None
    created_at: dt.datetime


class SnapshotRow(TypedDict):
    """A user's snapshot of a VM: the columns of ``gateway.store.snapshots.SNAPSHOT_COLUMNS``."""

    id: str
    vm_id: str
    user_id: str
    name: str
    state: str
    has_memory: bool | None
    memory_bytes: int | None
    error_reason: str | None
    deleted_by: str | None
    created_at: dt.datetime
    ready_at: dt.datetime | None
    deleted_at: dt.datetime | None


class UserRow(TypedDict):
    """An account as every query of users returns it (what ``create_user`` returns)."""

    id: str
    email: str
    role: str  # "user" or "admin"
    is_active: bool
    email_verified_at: dt.datetime | None
    created_at: dt.datetime


class UserQuota(TypedDict):
    """A user's quota overrides; None: the configured default."""

    quota_max_vms: int | None
    quota_vcpus: int | None
    quota_memory_mb: int | None
    quota_disk_gb: int | None
    quota_storage_gb: int | None


class UserRecord(UserRow, UserQuota):
    """Every column of a user: the caller of a request, a user looked up or locked."""

    password_hash: str
    session_epoch: int


class AdminUserRow(UserRow, UserQuota):
    """A user in the administrators' view: with what their VMs use of the quota."""

    used_vms: int
    used_vcpus: int
    used_memory_mb: int
    used_disk_gb: int
