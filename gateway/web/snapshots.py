"""Users' snapshots of their VMs: ``/api/vms/{vm_id}/snapshots`` (docs/SNAPSHOTS.md).

A snapshot is a qcow2 internal snapshot of the VM's own overlay, tagged ``s-<snapshot id>``: the disk
always, and the memory when the VM was running (taken by its QEMU without stopping it). Like every
other change to a VM the API only records the request (a row in ``creating`` or ``deleting``, or the
VM in ``restoring``) and the lifecycle engine does the work under the VM's lock; ``?wait=`` answers
once it is done. Snapshots count against the owner's snapshot quota (SNAPSHOT_QUOTA) from the request
until they are being deleted; the collector applies the retention policy (SNAPSHOT_KEEP newest per VM,
none older than SNAPSHOT_MAX_AGE).
"""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from gateway import states, store
from gateway.engine.publish import publish
from gateway.errors import Conflict, ServiceUnavailable, ValidationFailed
from gateway.rows import SnapshotRow, UserRow, VmRow
from gateway.states import VmState
from gateway.web import quota, ratelimit, validation, views, vms
from gateway.web.appkeys import db_key, driver_key, engine_key, redis_key, settings_key
from gateway.web.http import client_ip, json_body, json_response, owned_vm, wait_param

routes = web.RouteTableDef()

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,62}[A-Za-z0-9._-]?$")
# The VM states a snapshot can be taken in (suspended: the VM is resumed for it, its memory is in use).


async def _audit(request: web.Request, user: UserRow, vm: VmRow, action: str,
                 **details: Any) -> None:
    await vms.audit(request.app, action, "accepted", user, client_ip(request), str(vm["id"]), **details)


async def _snapshot_settled(app: web.Application, snapshot_id: str, wait: float, until: tuple[str, ...]) \
        -> SnapshotRow:
    """The snapshot's row once its state is one of ``until`` or ``wait`` s passed (rows are never removed)."""
    return await vms.poll_row(app, lambda cur: store.snapshots.snapshot_by_id(cur, snapshot_id),
                              lambda row: row["state"] in until, wait)


@routes.get("/api/vms/{vm_id}/snapshots")
async def list_snapshots(request: web.Request) -> web.Response:
    user, vm = await owned_vm(request)
    settings = request.app[settings_key]
    async with store.db.cursor(request.app[db_key]) as cur:
        rows = await store.snapshots.snapshots_of(cur, str(vm["id"]))
        used = await store.snapshots.snapshot_usage(cur, str(user["id"]))
    return json_response({"snapshots": [views.public_snapshot(r) for r in rows],
                          "quota": {"snapshots": settings.snapshot_quota, "used": used},
                          "retention": {"keep": settings.snapshot_keep, "max_age_seconds": settings.snapshot_max_age}})


@routes.post("/api/vms/{vm_id}/snapshots")
async def create_snapshot(request: web.Request) -> web.Response:
    user, vm = await owned_vm(request)
    await ratelimit.limit(request, "snapshot_user", str(user["id"]))
    body = await json_body(request)
    validation.check_unknown(body, {"name"})
    name = validation.string(body, "name", max_len=64, min_len=1) or ""
    if not NAME_RE.fullmatch(name):
        raise ValidationFailed("name: 1 to 64 of letters, digits, space, '.', '_' and '-', starting with a letter "
                               "or digit", details={"field": "name"})
    wait = wait_param(request)
    app = request.app
    if vm["state"] not in states.SNAPSHOT_FROM or vm["desired_state"] not in states.SNAPSHOT_DESIRED:
        raise Conflict(f"Cannot snapshot a VM that is {vm['state']}.", code="invalid_state",
                       details={"state": vm["state"], "allowed_from": list(states.SNAPSHOT_FROM)})
    if vm["state"] != "stopped" and not app[driver_key].saves_memory:
        raise Conflict(f"The {app[driver_key].name} driver cannot snapshot a running VM (its memory, or its disk "
                       "while in use); stop the VM first.", code="not_supported")
    # A snapshot of a running (or suspended) VM saves its memory too, into the overlay.
    needs = quota.NEW_OVERLAY_BYTES if vm["state"] == "stopped" else vm["memory_mb"] * quota.MIB
    await quota.require_storage(app, user, needs, "This snapshot")
    async with store.db.cursor(app[db_key]) as cur:
        row = await store.snapshots.request_snapshot(cur, str(user["id"]), str(vm["id"]), name,
                                                     app[settings_key].snapshot_quota)
    await _audit(request, user, vm, "vm.snapshot", snapshot_id=str(row["id"]), name=name)
    await app[engine_key].enqueue(str(vm["id"]), "snapshot")
    if wait > 0:
        row = await _snapshot_settled(app, str(row["id"]), wait, until=("ready", "error", "deleting", "deleted"))
        if row["state"] == "error":
            raise ServiceUnavailable(f"The snapshot could not be taken: {row['error_reason']}",
                                     code="snapshot_failed", details={"snapshot_id": str(row["id"]),
                                                                      "reason": row["error_reason"]})
    response = json_response(views.public_snapshot(row), status=201 if row["state"] == "ready" else 202)
    response.headers["Location"] = f"/api/vms/{vm['id']}/snapshots/{row['id']}"
    return response


@routes.get("/api/vms/{vm_id}/snapshots/{snapshot_id}")
async def get_snapshot(request: web.Request) -> web.Response:
    _, vm = await owned_vm(request)
    async with store.db.cursor(request.app[db_key]) as cur:
        row = await store.snapshots.snapshot_of_vm(cur, str(vm["id"]), request.match_info["snapshot_id"])
    return json_response(views.public_snapshot(row))


@routes.delete("/api/vms/{vm_id}/snapshots/{snapshot_id}")
async def delete_snapshot(request: web.Request) -> web.Response:
    user, vm = await owned_vm(request)
    wait = wait_param(request)
    app = request.app
    async with store.db.cursor(app[db_key]) as cur:
        row = await store.snapshots.snapshot_of_vm(cur, str(vm["id"]), request.match_info["snapshot_id"])
        if row["state"] == "creating":
            raise Conflict("The snapshot is still being taken; delete it once it is ready.", code="invalid_state",
                           details={"state": "creating"})
        if str(row["id"]) == str(vm["restore_snapshot"] or "") and vm["state"] == "restoring":
            raise Conflict("The VM is being restored from this snapshot.", code="invalid_state",
                           details={"state": "restoring"})
        moved = await store.snapshots.set_snapshot(cur, str(row["id"]), "deleting", only_from=("ready",),
                                                   deleted_by="user")
    row = moved or row
    await _audit(request, user, vm, "vm.snapshot.delete", snapshot_id=str(row["id"]), name=row["name"])
    await app[engine_key].enqueue(str(vm["id"]), "snapshot delete")
    if wait > 0:
        row = await _snapshot_settled(app, str(row["id"]), wait, until=("deleted",))
    return json_response(views.public_snapshot(row), status=200 if row["state"] == "deleted" else 202)


@routes.post("/api/vms/{vm_id}/snapshots/{snapshot_id}/restore")
async def restore_snapshot(request: web.Request) -> web.Response:
    """The VM goes back to the snapshot: a running one, or any VM to a snapshot with memory, runs on from
    that moment; otherwise the disk goes back and the VM stays stopped."""
    user, vm = await owned_vm(request)
    await ratelimit.limit(request, "snapshot_user", str(user["id"]))
    wait = wait_param(request)
    app = request.app
    async with store.db.cursor(app[db_key]) as cur:
        snap = await store.snapshots.snapshot_of_vm(cur, str(vm["id"]), request.match_info["snapshot_id"])
        if snap["state"] != "ready":
            raise Conflict(f"The snapshot is {snap['state']}; only a ready one can be restored.",
                           code="invalid_state", details={"snapshot_state": snap["state"]})
        if snap["has_memory"] and not app[driver_key].saves_memory and vm["state"] == "running":
            raise Conflict(f"The {app[driver_key].name} driver cannot load memory into a running VM; stop it "
                           "first.", code="not_supported")
        desired = "running" if snap["has_memory"] or vm["state"] == "running" else "stopped"
        vms.refuse_failed_create(vm)
        extra: dict[str, Any] = {"restore_snapshot": str(snap["id"]), "crash_times": [], "restart_after": None}
        row: VmRow = await store.vms.require_transition(cur, vm, VmState.RESTORING, states.RESTORE_FROM, "restore",
                                                        desired=desired, extra=extra)
    await _audit(request, user, vm, "vm.restore", snapshot_id=str(snap["id"]), name=snap["name"])
    await publish(app[redis_key], row)
    await app[engine_key].enqueue(str(vm["id"]), "restore")
    done = False
    if wait > 0:
        row = await vms.settle(app, str(vm["id"]), wait)
        if states.is_settled(row) and row["state"] != desired:
            reason = row["error_reason"] or f"the VM is {row['state']}"
            raise ServiceUnavailable(f"The VM could not be restored: {reason}", code="restore_failed",
                                     details={"vm_id": str(vm["id"]), "reason": reason, "state": row["state"]})
        done = states.is_settled(row)
    return json_response(views.public_vm(row, app[settings_key].public_url), status=200 if done else 202)
