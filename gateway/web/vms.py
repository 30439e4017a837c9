"""The API's side of the VM lifecycle: admit a create, record a stop, start or destroy, and queue
the VM for the lifecycle engine (gateway/engine), which does the work.

Postgres holds the desired state and the state machine; every request is a compare-and-set on the
row, so two requests racing on one VM cannot both act (the loser gets 409). A create that fails at
any step leaves no overlay, no process, no console target and no quota use: the engine puts the
VM in ``error`` with the reason. Requests answer at once (202) or, with ``?wait=``, once the VM settled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import aiopg
import redis.exceptions
from aiohttp import web

from gateway import states, store
from gateway.engine import activity, console_grants, storage
from gateway.engine.publish import publish, watching
from gateway.engine.templates import Templates
from gateway.errors import ApiError, Conflict, NotFound, ServiceUnavailable, ValidationFailed
from gateway.rows import UserRow, VmChange, VmRow
from gateway.states import Desired, VmState
from gateway.web import quota
from gateway.web.appkeys import db_key, driver_key, engine_key, redis_key, settings_key, templates_key
from jobspecs import with_network
from jobspecs.devices import NETWORKS
from jobspecs.render import MAX_USERDATA as MAX_JOB_USERDATA
from jobspecs.render import JobSpecError

log = logging.getLogger("vmgate.vms")

MAX_USERDATA = MAX_JOB_USERDATA  # bytes of the script a VM runs at first boot
SETTLE_POLL = 0.1


R = TypeVar("R", bound=Mapping[str, Any])


class ProvisioningFailed(ServiceUnavailable):
    code = "provisioning_failed"


async def audit(app: web.Application, action: str, outcome: str, user: UserRow, ip: str | None,
                vm_id: str | None = None, **details: Any) -> None:
    """One audit-log entry of a user's action on a VM."""
    async with store.db.cursor(app[db_key]) as cur:
        await store.audit.record(cur, action=action, outcome=outcome, user_id=str(user["id"]), ip=ip, vm_id=vm_id,
                                 details=details)


async def poll_row(app: web.Application, fetch: Callable[[aiopg.Cursor], Awaitable[R | None]],
                   done: Callable[[R], bool], wait: float, poll: float = SETTLE_POLL,
                   changed: asyncio.Event | None = None) -> R:
    """Read a row with ``await fetch(cursor)`` until ``done(row)`` or ``wait`` s passed; returns the last one.
    A row that is gone is NotFound. ``changed``: read again as soon as it is set, not only every ``poll`` s."""
    deadline = time.monotonic() + wait
    while True:
        if changed is not None:
            changed.clear()  # before the read: a change after it sets it again
        async with store.db.cursor(app[db_key]) as cur:
            row = await fetch(cur)
        if row is None:
            raise NotFound("No such VM.")
        if done(row) or time.monotonic() >= deadline:
            return row
        if changed is None:
            await asyncio.sleep(poll)
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), poll)


async def settle(app: web.Application, vm_id: str, wait: float, poll: float = SETTLE_POLL) -> VmRow:
    """The VM's row once it is settled (``is_settled``) or ``wait`` s passed."""
    with watching(vm_id) as changed:
        return await poll_row(app, lambda cur: store.vms.vm_by_id(cur, vm_id), states.is_settled, wait, poll,
                              changed)


def refuse_failed_create(vm: VmRow) -> None:
    """409 for a VM whose creation failed: nothing of it is left to start or restore."""
    if states.creation_failed(vm):
        raise Conflict("This VM's creation failed and nothing of it is left; destroy it and create another.",
                       code="invalid_state", details={"state": "error", "allowed_from": ["stopped", "error"]})


def network_of(app: web.Application, template: Any, requested: Any) -> str:
    """The network a VM gets: the one asked for, else its template's if this installation gives it, else
    none. 422 for anything but outbound or none, 409 not_supported for outbound where VMs get no network."""
    offered = app[driver_key].networks()
    if requested is None and template is not None:
        return str(template.network) if template.network in offered else "none"
    if requested not in NETWORKS:
        raise ValidationFailed("network: outbound or none", details={"field": "network"})
    if requested not in offered:
        why = getattr(app[driver_key], "network_problem", None) or f"the {app[driver_key].name} driver has none yet"
        raise Conflict(f"This installation gives VMs no outbound network: {why}.", code="not_supported",
                       details={"field": "network", "offered": list(offered)})
    return str(requested)


CHANGEABLE = (VmState.STOPPED.value, VmState.SUSPENDED.value)  # states in which a VM's network may change


async def change_network(app: web.Application, user: UserRow, vm: VmRow, network: str, ip: str | None) -> VmRow:
    """Put the VM on ``network`` from its next start (it is stopped or suspended: the NIC is the same device,
    so its saved memory still fits). 409 while it runs or changes state, or for a VM made without a NIC."""
    if vm["state"] not in CHANGEABLE:
        raise Conflict("Stop the VM first: its network changes while it is stopped or suspended.",
                       code="invalid_state", details={"state": vm["state"], "allowed_from": list(CHANGEABLE)})
    try:
        job = with_network(vm.get("jobspec") or {}, network)
    except (JobSpecError, KeyError, IndexError, TypeError) as exc:
        raise Conflict("This VM was made before VMs had a network card; create a new one.",
                       code="not_supported") from exc
    async with store.db.cursor(app[db_key]) as cur:
        row = await store.vms.set_network(cur, str(vm["id"]), network, job, CHANGEABLE)
        if row is None:
            raise Conflict("The VM started meanwhile; stop it first.", code="invalid_state")
        await store.audit.record(cur, action="vm.network", outcome="ok", user_id=str(user["id"]), ip=ip,
                                 vm_id=str(vm["id"]), details={"from": vm.get("network"), "to": network})
    return row


async def create(app: web.Application, user: UserRow, request: dict[str, Any],
                 ip: str | None, wait: float = 0) -> tuple[VmRow, bool]:
    """Admit the VM (quota, under the owner's lock) and queue it; a worker makes its overlay and starts it.

    Returns (row, settled). With ``wait``, waits up to that many seconds for the VM to be running;
    a create that failed meanwhile raises ProvisioningFailed (the VM is in ``error`` and holds nothing).
    """
    settings = app[settings_key]
    catalog: Templates = app[templates_key]
    template = catalog.get(request["template"])
    await catalog.verify(template)
    vm_id = str(uuid.uuid4())
    user_id = str(user["id"])
    overlay = storage.overlay_path(settings.vms_root, user_id, vm_id)
    name = request.get("name") or f"{template.name}-{vm_id[:8]}"
    vm = {"id": vm_id, "name": name, "template": template.name, "cpu": request["cpu"],
          "memory_mb": request["memory_mb"], "disk_gb": request["disk_gb"],
          "userdata": request.get("userdata"), "overlay_path": str(overlay), "network": request.get("network", "none")}
    vm["jobspec"] = catalog.render(template, vm, owner=user_id, settings=settings)
    await quota.require_storage(app, user, quota.NEW_OVERLAY_BYTES, "A new VM")
    async with store.db.cursor(app[db_key]) as cur:
        try:
            row: VmRow = await store.vms.admit_vm(cur, settings, user_id, vm)
        except ApiError as exc:
            await store.audit.record(cur, action="vm.create", outcome="denied", user_id=user_id, ip=ip,
                                     details={"reason": exc.message, "template": template.name})
            raise
        await store.audit.record(cur, action="vm.create", outcome="accepted", user_id=user_id, ip=ip, vm_id=vm_id,
                                 details={"template": template.name, "cpu": vm["cpu"], "memory_mb": vm["memory_mb"],
                                          "disk_gb": vm["disk_gb"]})
    await publish(app[redis_key], row)
    await app[engine_key].enqueue(vm_id, "create")
    if wait <= 0:
        return row, False
    row = await settle(app, vm_id, wait)
    if row["state"] == "error":
        reason = row["error_reason"] or "unknown"
        raise ProvisioningFailed(f"The VM could not be started: {reason}", details={"vm_id": vm_id, "reason": reason})
    return row, row["state"] == "running"


async def awake(app: web.Application, vm: VmRow, wait: float, poll: float) -> VmRow:
    """The VM's row, after resuming it first (waiting up to ``wait`` s) if it was suspended: what a request that
    needs the VM running (a console, a file transfer) does before it checks the state."""
    if vm["state"] in states.WAKEABLE and await wake(app, str(vm["id"])) is not None:
        return await settle(app, str(vm["id"]), wait, poll=poll)
    return vm


async def wake(app: web.Application, vm_id: str) -> VmChange | None:
    """Ask for a suspended (or suspending) VM back; the engine resumes it. None: it is in no such state."""
    async with store.db.cursor(app[db_key]) as cur:
        row = await store.vms.transition(cur, vm_id, VmState.RESUMING, only_from=(VmState.SUSPENDED,),
                                         desired=Desired.RUNNING)
        if row is None:
            row = await store.vms.set_desired(cur, vm_id, Desired.RUNNING,
                                              only_from=(VmState.SUSPENDING, VmState.RESUMING))
    if row is None:
        return None
    if row.get("event_id") is not None:
        await publish(app[redis_key], row)
    await app[engine_key].enqueue(vm_id, "resume")
    return row


async def request_action(app: web.Application, user: UserRow, vm_id: str, action: str, ip: str | None,
                         wait: float = 0) -> tuple[VmRow, bool]:
    """Record the user's wish (404 if not their VM, 409 if its state does not allow it) and queue the VM.

    Returns (row, settled): with ``wait``, the row once the action finished; an action that failed
    meanwhile raises ServiceUnavailable with the reason.
    """
    wanted = states.ACTIONS[action]
    async with store.db.cursor(app[db_key]) as cur:
        vm = await store.vms.vm_for_owner(cur, vm_id, str(user["id"]))
    if states.holds_quota(vm):
        await activity.touch(app[redis_key], vm_id)
    if action == "suspend" and not app[driver_key].saves_memory:
        raise Conflict(f"The {app[driver_key].name} driver cannot save a running VM's memory; stop it instead.",
                       code="not_supported")
    if action == "suspend":  # its memory goes to a file beside the overlay
        await quota.require_storage(app, user, vm["memory_mb"] * quota.MIB, "Suspending this VM")
    if action == "start" and vm["state"] in states.WAKEABLE:
        woken = await wake(app, vm_id)
        if woken is not None:
            await audit(app, "vm.resume", "accepted", user, ip, vm_id)
            return await _settled(app, vm_id, woken, wait, wanted)
    if action == "start":
        refuse_failed_create(vm)
    async with store.db.cursor(app[db_key]) as cur:
        extra: dict[str, Any] | None = {"crash_times": [], "restart_after": None} if action == "start" else None
        row = await store.vms.require_transition(cur, vm, wanted.enters, wanted.allowed_from, action,
                                                 desired=wanted.desired, extra=extra)
        await store.audit.record(cur, action=f"vm.{action}", outcome="accepted", user_id=str(user["id"]), ip=ip,
                                 vm_id=vm_id)
    await publish(app[redis_key], row)
    if action != "start":
        # The console goes at once, not when a worker gets to the VM (which revokes again: with Redis
        # away now, that is when it happens; websockify cannot redeem tokens without Redis meanwhile).
        try:
            reason = "vm destroyed" if action == "destroy" else "vm stopped"
            await console_grants.revoke_vm(app[redis_key], vm_id, reason)
        except (redis.exceptions.RedisError, OSError) as exc:
            log.warning("could not revoke the consoles of VM %s yet: %s", vm_id, exc)
    await app[engine_key].enqueue(vm_id, action)
    return await _settled(app, vm_id, row, wait, wanted)


async def _settled(app: web.Application, vm_id: str, row: VmRow, wait: float,
                   wanted: states.Action) -> tuple[VmRow, bool]:
    if wait <= 0:
        return row, False
    row = await settle(app, vm_id, wait)
    if states.is_settled(row) and row["state"] != wanted.done:
        reason = row["error_reason"] or f"the VM is {row['state']}"
        raise ServiceUnavailable(f"The VM could not be {wanted.past}: {reason}", code=f"{wanted.name}_failed",
                                 details={"vm_id": vm_id, "reason": reason, "state": row["state"]})
    return row, row["state"] == wanted.done
