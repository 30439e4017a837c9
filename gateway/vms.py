"""The VM lifecycle: create, stop, start, destroy, and re-adopting running VMs at start-up.

Postgres holds the desired state and the state machine; every transition is a compare-and-set
on the row, so two requests racing on one VM cannot both act (the loser gets 409). A create
that fails at any step leaves no overlay, no process, no console target and no quota use:
the VM row ends in ``error`` with the reason.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from pathlib import Path
from typing import Any

from aiohttp import web

from drivers.base import DriverError, VMStatus
from gateway import consoles, db, storage
from gateway.catalog import Catalog
from gateway.errors import ApiError, NotFound, ServiceUnavailable
from gateway.keys import catalog_key, db_key, driver_key, redis_key, settings_key

log = logging.getLogger("vmgate.vms")

MAX_USERDATA = 64 * 1024


class ProvisioningFailed(ServiceUnavailable):
    code = "provisioning_failed"


def public_vm(row: dict[str, Any], public_url: str) -> dict[str, Any]:
    """The API's view of a VM row."""
    def iso(value: Any) -> str | None:
        return value.isoformat() if value is not None else None

    vm_id = str(row["id"])
    return {
        "vm_id": vm_id,
        "name": row["name"],
        "template": row["template"],
        "cpu": row["cpu"],
        "memory_mb": row["memory_mb"],
        "disk_gb": row["disk_gb"],
        "state": row["state"],
        "desired_state": row["desired_state"],
        "error": row["error_reason"],
        "vnc_url": f"{public_url}/vms/{vm_id}/console",
        "created_at": iso(row["created_at"]),
        "updated_at": iso(row["updated_at"]),
        "started_at": iso(row["started_at"]),
        "stopped_at": iso(row["stopped_at"]),
    }


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ApiError):
        return exc.message
    if isinstance(exc, DriverError | storage.StorageError):
        return str(exc)[:1000]
    return f"internal error ({type(exc).__name__})"


async def _audit(app: web.Application, action: str, outcome: str, user: dict[str, Any], ip: str | None,
                 vm_id: str | None = None, **details: Any) -> None:
    async with db.cursor(app[db_key]) as cur:
        await db.audit(cur, action=action, outcome=outcome, user_id=str(user["id"]), ip=ip, vm_id=vm_id,
                       details=details)


async def _launch(app: web.Application, vm_id: str, job: dict[str, Any]) -> VMStatus:
    """Start the job and publish its VNC target; on failure nothing of the run is left."""
    driver = app[driver_key]
    try:
        status = await driver.start(vm_id, job)
        if status.vnc is None:
            raise DriverError("the driver reported no VNC endpoint")
        await consoles.publish_target(app[redis_key], vm_id, status.vnc)
    except BaseException:
        with contextlib.suppress(Exception):
            await driver.destroy(vm_id)
        with contextlib.suppress(Exception):
            await consoles.revoke_vm(app[redis_key], vm_id)
        raise
    return status


async def create(app: web.Application, user: dict[str, Any], request: dict[str, Any],
                 ip: str | None) -> dict[str, Any]:
    """Admit, render, make the overlay, start. Returns the VM row (state running)."""
    settings = app[settings_key]
    catalog: Catalog = app[catalog_key]
    template = catalog.get(request["template"])
    await catalog.verify(template)
    vm_id = str(uuid.uuid4())
    user_id = str(user["id"])
    overlay = storage.overlay_path(settings.vms_root, user_id, vm_id)
    name = request.get("name") or f"{template.name}-{vm_id[:8]}"
    vm = {"id": vm_id, "name": name, "template": template.name, "cpu": request["cpu"],
          "memory_mb": request["memory_mb"], "disk_gb": request["disk_gb"],
          "userdata": request.get("userdata"), "overlay_path": str(overlay)}
    pool = app[db_key]
    async with db.cursor(pool) as cur:
        try:
            await db.admit_vm(cur, settings, user_id, vm)
        except ApiError as exc:
            await db.audit(cur, action="vm.create", outcome="denied", user_id=user_id, ip=ip,
                           details={"reason": exc.message, "template": template.name})
            raise
    try:
        job = catalog.render(template, vm, owner=user_id, settings=settings)
        async with db.cursor(pool) as cur:
            await db.set_jobspec(cur, vm_id, job)
        await storage.create_overlay(template.disk, overlay, vm["disk_gb"])
        async with db.cursor(pool) as cur:
            await db.transition(cur, vm_id, "starting", only_from=("provisioning",))
        await _launch(app, vm_id, job)
        async with db.cursor(pool) as cur:
            row = await db.transition(cur, vm_id, "running", only_from=("starting",))
    except BaseException as exc:
        reason = _reason(exc)
        log.warning("create of VM %s failed: %s", vm_id, reason)
        with contextlib.suppress(Exception):
            await app[driver_key].destroy(vm_id)
        with contextlib.suppress(Exception):
            await consoles.revoke_vm(app[redis_key], vm_id)
        storage.remove_overlay(overlay)
        async with db.cursor(pool) as cur:
            await db.transition(cur, vm_id, "error", reason=reason, desired="destroyed")
            await db.audit(cur, action="vm.create", outcome="error", user_id=user_id, ip=ip, vm_id=vm_id,
                           details={"reason": reason})
        if isinstance(exc, Exception):
            raise ProvisioningFailed(f"The VM could not be started: {reason}",
                                     details={"vm_id": vm_id, "reason": reason}) from exc
        raise
    await _audit(app, "vm.create", "ok", user, ip, vm_id, template=template.name, cpu=vm["cpu"],
                 memory_mb=vm["memory_mb"], disk_gb=vm["disk_gb"])
    assert row is not None
    return row


# Past tense of each action, for error messages.
_DONE = {"stop": "stopped", "start": "started", "destroy": "destroyed"}


async def _begin(app: web.Application, user: dict[str, Any], vm_id: str, action: str, to_state: str,
                 only_from: tuple[str, ...], desired: str) -> dict[str, Any]:
    """Claim the owner's VM for ``action``: 404 if not theirs, 409 if in another state."""
    async with db.cursor(app[db_key]) as cur:
        vm = await db.vm_for_owner(cur, vm_id, str(user["id"]))
        await db.require_transition(cur, vm, to_state, only_from, action, desired=desired)
    return vm


async def _failed(app: web.Application, user: dict[str, Any], ip: str | None, vm_id: str, action: str,
                  exc: Exception, state: str, desired: str | None = None) -> ServiceUnavailable:
    """Record a failed action (state, history, audit) and return the 503 to raise."""
    reason = _reason(exc)
    async with db.cursor(app[db_key]) as cur:
        await db.transition(cur, vm_id, state, reason=f"{action} failed: {reason}", desired=desired)
        await db.audit(cur, action=f"vm.{action}", outcome="error", user_id=str(user["id"]), ip=ip, vm_id=vm_id,
                       details={"reason": reason})
    return ServiceUnavailable(f"The VM could not be {_DONE[action]}: {reason}", code=f"{action}_failed",
                              details={"vm_id": vm_id, "reason": reason})


async def _done(app: web.Application, user: dict[str, Any], ip: str | None, vm_id: str, action: str,
                from_state: str, to_state: str) -> dict[str, Any]:
    """Record a finished action and return the VM's row."""
    async with db.cursor(app[db_key]) as cur:
        row = await db.transition(cur, vm_id, to_state, only_from=(from_state,))
        await db.audit(cur, action=f"vm.{action}", outcome="ok", user_id=str(user["id"]), ip=ip, vm_id=vm_id)
    if row is None:
        raise NotFound("No such VM.")
    return row


async def stop(app: web.Application, user: dict[str, Any], vm_id: str, ip: str | None) -> dict[str, Any]:
    """Graceful stop (ACPI, then hard after STOP_TIMEOUT); the disk is kept."""
    await _begin(app, user, vm_id, "stop", "stopping", ("running",), desired="stopped")
    await consoles.revoke_vm(app[redis_key], vm_id)
    try:
        await app[driver_key].stop(vm_id, timeout=app[settings_key].stop_timeout)
    except Exception as exc:
        raise await _failed(app, user, ip, vm_id, "stop", exc, state="error") from exc
    return await _done(app, user, ip, vm_id, "stop", "stopping", "stopped")


async def start(app: web.Application, user: dict[str, Any], vm_id: str, ip: str | None) -> dict[str, Any]:
    """Start a stopped VM on its existing overlay. A failed start leaves it stopped, disk intact."""
    vm = await _begin(app, user, vm_id, "start", "starting", ("stopped",), desired="running")
    try:
        if not vm["jobspec"] or not vm["overlay_path"] or not Path(vm["overlay_path"]).exists():
            raise DriverError("the VM's disk is missing")
        template = app[catalog_key].get(vm["template"])
        await app[catalog_key].verify(template)
        await _launch(app, vm_id, vm["jobspec"])
    except Exception as exc:
        raise await _failed(app, user, ip, vm_id, "start", exc, state="stopped", desired="stopped") from exc
    return await _done(app, user, ip, vm_id, "start", "starting", "running")


async def destroy(app: web.Application, user: dict[str, Any], vm_id: str, ip: str | None) -> dict[str, Any]:
    """Stop hard, revoke consoles, remove the overlay; the row stays as history, state destroyed."""
    vm = await _begin(app, user, vm_id, "destroy", "destroying", ("running", "stopped", "error"),
                      desired="destroyed")
    await consoles.revoke_vm(app[redis_key], vm_id)
    try:
        await app[driver_key].destroy(vm_id)
        if vm["overlay_path"]:
            storage.remove_overlay(Path(vm["overlay_path"]))
    except Exception as exc:
        raise await _failed(app, user, ip, vm_id, "destroy", exc, state="error") from exc
    return await _done(app, user, ip, vm_id, "destroy", "destroying", "destroyed")


async def readopt(app: web.Application) -> None:
    """At start-up: re-publish consoles of VMs still running, and settle VMs whose QEMU is gone.

    QEMU processes outlive the gateway; the driver finds them again. A VM recorded as running
    whose process ended while the gateway was down is marked stopped with the reason (its disk is kept).
    """
    driver = app[driver_key]
    pool = app[db_key]
    async with db.cursor(pool) as cur:
        rows = await db.vms_in_states(cur, ("running", "starting", "stopping"))
    for row in rows:
        vm_id = str(row["id"])
        try:
            status = await driver.status(vm_id)
        except DriverError as exc:
            log.warning("cannot read status of VM %s: %s", vm_id, exc)
            continue
        if status.state == "running" and status.vnc is not None and row["state"] != "stopping":
            await consoles.publish_target(app[redis_key], vm_id, status.vnc)
            if row["state"] == "starting":
                async with db.cursor(pool) as cur:
                    await db.transition(cur, vm_id, "running", only_from=("starting",))
            log.info("re-adopted VM %s (pid %s)", vm_id, status.pid)
        elif status.state == "running":
            await driver.stop(vm_id, timeout=app[settings_key].stop_timeout)
            async with db.cursor(pool) as cur:
                await db.transition(cur, vm_id, "stopped", reason="stopped after a gateway restart")
        else:
            await consoles.revoke_vm(app[redis_key], vm_id)
            async with db.cursor(pool) as cur:
                await db.transition(cur, vm_id, "stopped",
                                    reason=status.reason or "QEMU was not running when the gateway started")
            log.info("VM %s was not running at start-up; marked stopped", vm_id)
