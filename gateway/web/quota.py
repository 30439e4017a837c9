"""The storage quota: what a user's files take on disk, measured, against ``QUOTA_STORAGE_GB``.

The other quotas (VMs, vCPUs, memory, disk) count what VMs were created with, under the owner's row
lock (gateway/store/vms.py). Storage is measured instead: the allocated bytes of the user's folder
(gateway/engine/storage.py ``allocated_bytes``): overlays as the guests filled them, every snapshot
inside them with the memory it saved, and suspend states. Whatever adds to it on a user's request
asks first: a new VM, a snapshot, a suspend. A measurement is a scandir of one folder (a few files):
cheap enough for each such request and each page that shows it. Idle suspend, which vmgate does on
its own, is not refused; its state file counts from then on. docs/SECURITY.md, "Disk and storage".
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from gateway import store
from gateway.engine import storage
from gateway.errors import QuotaExceeded
from gateway.rows import AdminUserRow
from gateway.web import views
from gateway.web.appkeys import settings_key

MIB = 1 << 20
NEW_OVERLAY_BYTES = MIB  # what a fresh overlay and a disk-only snapshot take at first (metadata, a few clusters)


def _size(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / MIB:.0f} MiB"


async def storage_used(app: web.Application, user_id: str) -> int:
    """The bytes the user's files take on disk now."""
    return await asyncio.to_thread(storage.allocated_bytes, app[settings_key].vms_root, user_id)


async def require_storage(app: web.Application, user: Mapping[str, Any], requested: int, what: str) -> None:
    """Refuse (403 ``quota_exceeded``) what would take the user past their storage quota."""
    quota = store.users.storage_quota_bytes(user, app[settings_key])
    used = await storage_used(app, str(user["id"]))
    if used + requested > quota:
        raise QuotaExceeded(
            f"{what} does not fit your storage quota: {_size(used)} of {_size(quota)} in use, about "
            f"{_size(requested)} more needed. Delete snapshots or VMs to make room.",
            details={"exceeded": {"storage_bytes": {"quota": quota, "used": used, "requested": requested}}})


async def quota_and_usage(app: web.Application, user: Mapping[str, Any],
                          usage: store.users.Resources) -> tuple[dict[str, int], dict[str, int]]:
    """The ``quota`` and ``usage`` objects of /api/me and the pages: the counted resources and storage."""
    settings = app[settings_key]
    quota = {**store.users.quota_of(user, settings).to_json(),
             "storage_gb": store.users.storage_quota_bytes(user, settings) // store.users.GIB}
    return quota, {**usage.to_json(), "storage_bytes": await storage_used(app, str(user["id"]))}


async def admin_views(app: web.Application, rows: list[AdminUserRow]) -> list[dict[str, Any]]:
    """The admin view of each user, with the storage their files take (one folder scan each)."""
    settings = app[settings_key]
    used = await asyncio.to_thread(lambda: [storage.allocated_bytes(settings.vms_root, str(r["id"])) for r in rows])
    return [views.admin_user(row, settings, n) for row, n in zip(rows, used, strict=True)]
