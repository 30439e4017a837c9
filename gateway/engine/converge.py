"""One VM's steps: read its row, do the one thing its state and desired state need, read it again.

``Converger.converge`` is what a worker runs for a queued VM while holding the VM's lock (gateway/engine/
runner.py); the collector runs it for a VM stuck past its deadline. Here are the steps that create, start,
watch, stop and destroy a VM (the table in docs/LIFECYCLE.md, "Converging"); those that save a VM or bring
it back (suspend, resume, snapshots, restore) are in gateway/engine/saves.py. Every step is idempotent and
moves the row only from the state it read (``Transitions``), so a job delivered twice does the work once.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
from pathlib import Path
from typing import Any

from opentelemetry import trace

from drivers.base import DriverError, VMStatus
from gateway import store
from gateway.config import Settings
from gateway.engine import activity, console_grants, storage
from gateway.engine.deps import EngineDeps, now, reason_of
from gateway.engine.publish import Row, Transitions
from gateway.engine.saves import Saves, disk_missing
from gateway.errors import ApiError
from gateway.faults import crash_point
from gateway.states import Desired, VmState
from jobspecs import is_warm

log = logging.getLogger("vmgate.lifecycle")

MAX_STEPS = 12  # steps of one converge; each moves the VM on, so a handful always suffices
SERIAL_TAIL_LINES = 8
NS = 1_000_000_000
S = VmState


def restart_policy(job: dict[str, Any] | None, settings: Settings) -> dict[str, Any]:
    """The job's ``restart`` block (Nomad's RestartPolicy, durations in ns) in seconds."""
    policy: dict[str, Any] = {}
    with contextlib.suppress(KeyError, IndexError, TypeError):
        policy = dict((job or {})["TaskGroups"][0]["RestartPolicy"] or {})
    return {
        "attempts": int(policy.get("Attempts", settings.restart_attempts)),
        "interval": float(policy.get("Interval", settings.restart_interval * NS)) / NS,
        "delay": float(policy.get("Delay", settings.restart_delay * NS)) / NS,
        "mode": str(policy.get("Mode", settings.restart_mode)),
    }


def _serial_tail(text: str) -> str:
    lines = [line.strip() for line in text.replace("\r", "").splitlines() if line.strip()]
    return " | ".join(lines[-SERIAL_TAIL_LINES:])[-1500:]


def _since(at: dt.datetime) -> float:
    """Seconds from ``at`` (a row's timestamp, the database's clock) to now, never negative."""
    return max(0.0, (now() - at).total_seconds())


class Converger:
    """Brings one VM towards its desired state, a step at a time. The caller holds the VM's lock."""

    def __init__(self, deps: EngineDeps) -> None:
        self.deps = deps
        self.moves = Transitions(pool=deps.pool, redis=deps.redis, metrics=deps.metrics)
        self.saves = Saves(deps, self.moves)

    async def row(self, vm_id: str) -> Row | None:
        """The VM's row as it is now."""
        async with store.db.cursor(self.deps.pool) as cur:
            found = await store.vms.vm_by_id(cur, vm_id)
        return dict(found) if found is not None else None

    async def converge(self, vm_id: str) -> None:
        """Bring one VM towards its desired state. The caller holds the VM's lock."""
        for _ in range(MAX_STEPS):
            row = await self.row(vm_id)
            if row is None or row["state"] == S.DESTROYED:
                return
            with self.deps.tracer.start_as_current_span(
                    f"vm.step {row['state']}", attributes={"vm.id": vm_id, "vm.state": row["state"],
                                                           "vm.desired_state": row["desired_state"]}):
                if not await self._step(row):
                    return
        log.warning("VM %s: still not converged after %d steps; it is queued again", vm_id, MAX_STEPS)
        await self.deps.enqueue(vm_id, "more steps")

    async def _step(self, row: Row) -> bool:
        """Do the next thing the VM needs. True: something changed, look again."""
        state, desired, saves = row["state"], row["desired_state"], self.saves
        if desired == Desired.DESTROYED:
            return await self._destroy(row)
        if state in (S.REQUESTED, S.PROVISIONING):  # requested: a row no step would ever move on otherwise
            return await self._provision(row)
        if state == S.RESTORING:
            return await saves.restore(row)
        if state == S.SUSPENDING:
            return await saves.suspend(row)  # finished whatever is wanted now; the next step follows that
        if state == S.STOPPING or (desired == Desired.STOPPED and state in (S.RUNNING, S.STARTING)):
            return await self._stop(row)
        if desired == Desired.SUSPENDED:
            if state == S.RUNNING:
                return await saves.suspend(row)
            if state == S.SUSPENDED:
                await self._ensure_not_running(row, hard=True)
                return await saves.snapshot_work(row)
            return False
        if desired == Desired.RUNNING:
            if state == S.STARTING:
                return await self._start(row)
            if state == S.RUNNING:
                return await self._check_running(row) or await saves.snapshot_work(row)
            if state == S.STOPPED:
                return await self.moves.move(row, S.STARTING) is not None
            if state == S.SUSPENDED:
                return await self.moves.move(row, S.RESUMING) is not None
            if state == S.RESUMING:
                return await saves.resume(row)
            return False  # error (crashed and given up) waits for the user
        # desired stopped: stopped, or error
        await self._ensure_not_running(row)
        return await saves.snapshot_work(row)

    # ---- create and start

    async def _provision(self, row: Row) -> bool:
        vm_id, templates, settings = str(row["id"]), self.deps.templates, self.deps.settings
        crash_point("create.admitted")
        try:
            template = templates.get(row["template"])
            await templates.verify(template)
            job = row.get("jobspec")
            if not job:
                job = templates.render(template, {**row, "id": vm_id}, owner=str(row["user_id"]), settings=settings)
                async with store.db.cursor(self.deps.pool) as cur:
                    await store.vms.set_jobspec(cur, vm_id, job)
            # A warm job's overlay sits on the template's warm disk layer, a cold one's on the base disk.
            await storage.create_overlay(templates.overlay_base(template, job), Path(row["overlay_path"]),
                                         row["disk_gb"])
        except (ApiError, storage.StorageError, OSError) as exc:
            self.deps.metrics.booted("create", ok=False)  # the VM never started: a failed boot for its owner
            await self.fail_create(row, exc)
            return False
        crash_point("create.overlay")
        self.deps.metrics.provision.observe(_since(row["created_at"]))
        return await self.moves.move(row, S.STARTING) is not None

    async def fail_create(self, row: Row, exc: BaseException) -> None:
        """A create that cannot finish leaves nothing: no process, no console, no overlay, no quota use."""
        vm_id, reason = str(row["id"]), reason_of(exc)
        log.warning("create of VM %s failed: %s", vm_id, reason)
        with contextlib.suppress(DriverError):
            await self.deps.driver.destroy(vm_id)
        await self.deps.revoke(vm_id)
        if row["overlay_path"]:
            await storage.remove_overlay(Path(row["overlay_path"]))
        await self.moves.fail(row, "create", reason, to=S.ERROR, desired=Desired.DESTROYED)

    async def _start(self, row: Row) -> bool:
        vm_id, driver, templates = str(row["id"]), self.deps.driver, self.deps.templates
        if row["restart_after"] is not None and row["restart_after"] > now():
            return False  # waiting out the restart delay; the reconciler queues it when due
        first = row["started_at"] is None
        warm = False
        try:
            if disk_missing(row):
                raise DriverError("the VM's disk is missing")
            template = templates.get(row["template"])
            await templates.verify(template)
            job = row["jobspec"]
            warm = is_warm(job)
            if warm:
                # Only this first start may restore the saved memory state: once the VM ran, its disk
                # moved on. The cold job is stored before QEMU starts, so a retry or any later start
                # boots from the VM's own disk (docs/LIFECYCLE.md, "Warm starts").
                await templates.verify_warm(template, job)
                async with store.db.cursor(self.deps.pool) as cur:
                    await store.vms.set_jobspec(cur, vm_id, templates.cold(job, self.deps.settings))
            with self.deps.tracer.start_as_current_span("qemu.start", attributes={
                    "vm.id": vm_id, "vm.start": "warm" if warm else "cold", "vmgate.driver": driver.name}):
                status = await driver.start(vm_id, job)
            if status.state != "running":
                raise DriverError(f"the VM stopped as soon as it started: {status.reason or 'no reason given'}")
            if status.vnc is None:
                raise DriverError("the driver reported no VNC endpoint")
        except (ApiError, DriverError, storage.StorageError, OSError) as exc:
            with contextlib.suppress(DriverError):
                if first:
                    await driver.destroy(vm_id)
                else:  # the VM keeps its task dir: serial log and exit record say what went wrong
                    await driver.stop(vm_id, timeout=0)
            await self.deps.revoke(vm_id)
            self.deps.metrics.booted("create" if first else "start", ok=False)
            if first:
                await self.fail_create(row, exc)
            else:
                await self.moves.fail(row, "start", f"start failed: {reason_of(exc)}", to=S.STOPPED,
                                      desired=Desired.STOPPED)
            return False
        crash_point("create.started")
        await console_grants.publish_target(self.deps.redis, vm_id, status.vnc)
        trace.get_current_span().add_event("console.ready")  # the console takes connections from now on
        self.deps.metrics.booted("create" if first else "start", ok=True)
        if first:
            self.deps.metrics.time_to_console.labels("warm" if warm else "cold").observe(_since(row["created_at"]))
        moved = await self.moves.succeed(row, S.RUNNING, "create" if first else "start", extra={"restart_after": None})
        return moved is None  # lost a race (a stop or destroy came in): look again

    # ---- running

    async def _check_running(self, row: Row) -> bool:
        vm_id, driver = str(row["id"]), self.deps.driver
        status = await driver.status(vm_id)
        if status.state == "running":
            # Published again when missing, or when the VM's VNC moved (Nomad restarted or rescheduled it:
            # another allocation, address, port or VNC password); consoles open on the old one end.
            if status.vnc is not None and await console_grants.target_of(self.deps.redis, vm_id) != status.vnc:
                await console_grants.publish_target(self.deps.redis, vm_id, status.vnc)
                log.info("VM %s: console target published again", vm_id)
            return False
        await self.deps.revoke(vm_id)
        if driver.manages_restarts and status.details.get("how") == "pending":
            reason = f"the cluster is restarting the VM: {status.reason}"
            return await self.moves.move(row, S.STARTING, reason=reason) is not None
        if status.details.get("returncode") == 0:
            moved = await self.moves.move(row, S.STOPPED, reason="the guest powered off", desired=Desired.STOPPED)
            return moved is not None
        return await self._crashed(row, status)

    async def _crashed(self, row: Row, status: VMStatus) -> bool:
        """QEMU died unexpectedly: restart it following the job's restart block, or give up."""
        policy = restart_policy(row.get("jobspec"), self.deps.settings)
        at = now()
        window = at - dt.timedelta(seconds=policy["interval"])
        crashes = [t for t in (row["crash_times"] or []) if t > window] + [at]
        why = status.reason or "QEMU stopped unexpectedly"
        log.warning("VM %s crashed (%s); %d crash(es) in the last %g s", row["id"], why, len(crashes),
                    policy["interval"])
        manages = self.deps.driver.manages_restarts
        if not manages and len(crashes) <= policy["attempts"]:
            reason = (f"{why}; restart {len(crashes)} of {policy['attempts']} within {policy['interval']:g} s,"
                      f" after {policy['delay']:g} s")
            return await self.moves.move(row, S.STARTING, reason=reason, extra={
                "crash_times": crashes[-100:], "restart_after": at + dt.timedelta(seconds=policy["delay"])}) is not None
        if not manages and policy["mode"] == "delay":
            resume = min(crashes) + dt.timedelta(seconds=policy["interval"])
            reason = (f"{why}; {policy['attempts']} restarts within {policy['interval']:g} s used up, "
                      f"waiting until {resume.isoformat(timespec='seconds')} (restart mode delay)")
            return await self.moves.move(row, S.STARTING, reason=reason, extra={
                "crash_times": crashes[-100:], "restart_after": resume}) is not None
        try:
            tail = _serial_tail(await self.deps.driver.logs(str(row["id"]), 8192))
        except DriverError:
            tail = ""
        reason = (f"{why}; gave up after {policy['attempts']} restart(s) within {policy['interval']:g} s"
                  + (f". Last serial output: {tail}" if tail else ""))
        await self.moves.fail(row, "crash", reason, to=S.ERROR, desired=Desired.STOPPED,
                              extra={"crash_times": crashes[-100:]})
        return False

    # ---- stop and destroy

    async def _stop(self, row: Row) -> bool:
        vm_id = str(row["id"])
        entered = await self.moves.enter(row, S.STOPPING)
        if entered is None:
            return True
        row = entered
        crash_point("stop.requested")
        await self.deps.revoke(vm_id)
        if row["suspended_at"] is not None:
            row = await self.saves.wake_to_stop(row)
        try:
            await self.deps.driver.stop(vm_id, timeout=self.deps.settings.stop_timeout)
        except DriverError as exc:
            await self.moves.fail(row, "stop", f"stop failed: {reason_of(exc)}", to=S.ERROR)
            return False
        await self.moves.succeed(row, S.STOPPED, "stop", extra={"restart_after": None, "suspended_at": None})
        return True

    async def _ensure_not_running(self, row: Row, hard: bool = False) -> None:
        """A VM that should not run but does (the user stopped it while the gateway was away...).
        ``hard``: a suspended VM's QEMU is ended without a shutdown (its memory is saved already)."""
        vm_id = str(row["id"])
        status = await self.deps.driver.status(vm_id)
        if status.state == "running":
            log.info("VM %s is %s but QEMU runs; stopping it", vm_id, row["state"])
            await self.deps.revoke(vm_id)
            await self.deps.driver.stop(vm_id, timeout=0 if hard else self.deps.settings.stop_timeout)

    async def _destroy(self, row: Row) -> bool:
        if row["state"] != S.ERROR:
            entered = await self.moves.enter(row, S.DESTROYING)
            if entered is None:
                return True
            row = entered
        vm_id = str(row["id"])
        try:
            await self.deps.revoke(vm_id, "vm destroyed")
            await activity.forget(self.deps.redis, vm_id)
            await self.deps.driver.destroy(vm_id)
            if row["overlay_path"]:
                await storage.remove_overlay(Path(row["overlay_path"]))
            async with store.db.cursor(self.deps.pool) as cur:
                await store.snapshots.forget_snapshots(cur, vm_id, "vm destroyed")
        except (DriverError, OSError) as exc:
            if row["state"] != S.ERROR:
                await self.moves.fail(row, "destroy", f"destroy failed: {reason_of(exc)}", to=S.ERROR)
            return False
        if row["state"] == S.DESTROYING:
            await self.moves.succeed(row, S.DESTROYED, "destroy")
        return False
