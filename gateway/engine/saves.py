"""The steps that save a VM or bring it back: suspend (its memory to ``<vm_id>.state`` beside its overlay),
resume, the snapshots owed on a VM (make, delete) and restoring one, and snapshot retention.

gateway/engine/converge.py calls these from its step table; they follow its rules (idempotent, every
move a compare-and-set from the state read). docs/LIFECYCLE.md, "Suspend and resume"; docs/SNAPSHOTS.md.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any

from drivers.base import DriverError, NotSupported
from gateway import store
from gateway.engine import console_grants, storage
from gateway.engine.deps import EngineDeps, now, reason_of
from gateway.engine.publish import Row, Transitions
from gateway.errors import ApiError
from gateway.faults import crash_point
from gateway.states import Desired, SnapshotState, VmState

log = logging.getLogger("vmgate.lifecycle")

S = VmState


def disk_missing(row: Row) -> bool:
    """The VM has no job or no overlay to start from."""
    return not row.get("jobspec") or not row["overlay_path"] or not Path(row["overlay_path"]).exists()


async def _drop_suspend_state(row: Row) -> None:
    """Delete the saved memory once the VM runs on from it (or its disk went back to a snapshot): the
    disk has moved on since, so it must never be restored again."""
    await storage.remove_state(Path(row["overlay_path"]))


def _suspend_state_saved(row: Row) -> bool:
    """True when a complete memory state was saved since the VM began suspending (the driver renames it
    into place only once QEMU wrote all of it)."""
    try:
        info = storage.state_path(Path(row["overlay_path"])).stat()
    except (OSError, TypeError):
        return False
    return info.st_size > 0 and info.st_mtime >= row["updated_at"].timestamp() - 1


async def apply_retention(deps: EngineDeps) -> list[str]:
    """Mark for deletion the snapshots SNAPSHOT_KEEP and SNAPSHOT_MAX_AGE no longer keep, and queue their VMs."""
    async with store.db.cursor(deps.pool) as cur:
        settings = deps.settings
        expired = await store.snapshots.expire_snapshots(cur, settings.snapshot_keep, settings.snapshot_max_age)
    for vm_id in sorted({str(snap["vm_id"]) for snap in expired}):
        await deps.enqueue(vm_id, "retention")
    return [str(snap["id"]) for snap in expired]


class Saves:
    """Suspend, resume, snapshot and restore steps of one VM (the caller holds its lock)."""

    def __init__(self, deps: EngineDeps, moves: Transitions) -> None:
        self.deps = deps
        self.moves = moves

    # ---- suspend and resume

    async def suspend(self, row: Row) -> bool:
        """Save the VM's memory to ``<vm_id>.state`` beside its overlay and end QEMU."""
        vm_id, driver = str(row["id"]), self.deps.driver
        entered = await self.moves.enter(row, S.SUSPENDING)
        if entered is None:
            return True
        row = entered
        await self.deps.revoke(vm_id, "vm suspended")
        status = await driver.status(vm_id)
        if status.state == "running":
            try:
                size = await driver.suspend_to(vm_id, str(storage.state_path(Path(row["overlay_path"]))))
            except DriverError as exc:
                # QEMU goes on (suspend_to resumes it on failure): the VM is running, as before.
                reason = f"suspend failed: {reason_of(exc)}"
                log.warning("VM %s: %s", vm_id, reason)
                await self.moves.fail(row, "suspend", reason, to=S.RUNNING, desired=Desired.RUNNING)
                return True
            reason = f"memory saved ({size >> 20} MiB)"
            crash_point("suspend.saved")
        elif _suspend_state_saved(row):
            reason = "memory saved"  # saved, and the worker that saved it died before recording it
        else:
            return await self.moves.move(row, S.STOPPED, reason="QEMU ended before its memory was saved",
                                         desired=Desired.STOPPED) is not None
        await self.moves.succeed(row, S.SUSPENDED, "suspend", reason=reason, extra={"suspended_at": now()})
        return True

    def _resume_job(self, row: Row) -> dict[str, Any]:
        return self.deps.templates.resume(row["jobspec"], storage.state_path(Path(row["overlay_path"])),
                                          self.deps.settings)

    async def resume(self, row: Row) -> bool:
        """Start QEMU from the suspend state (``-loadvm``): the VM runs on where it was."""
        vm_id = str(row["id"])
        started = time.perf_counter()
        try:
            if disk_missing(row):
                raise DriverError("the VM's disk is missing")
            with self.deps.tracer.start_as_current_span("qemu.start", attributes={
                    "vm.id": vm_id, "vm.start": "resume", "vmgate.driver": self.deps.driver.name}):
                status = await self.deps.driver.start(vm_id, self._resume_job(row))
            if status.state != "running" or status.vnc is None:
                raise DriverError(f"the VM did not come back: {status.reason or 'no VNC endpoint'}")
            crash_point("resume.started")
        except (ApiError, DriverError, storage.StorageError, OSError) as exc:
            with contextlib.suppress(DriverError):
                await self.deps.driver.stop(vm_id, timeout=0)
            reason = f"resume failed: {reason_of(exc)}"
            log.warning("VM %s: %s", vm_id, reason)
            self.deps.metrics.booted("resume", ok=False)
            # Still suspended: its saved memory and disk are untouched. Stopping it (or destroying it) works.
            await self.moves.fail(row, "resume", reason, to=S.SUSPENDED, desired=Desired.SUSPENDED)
            return False
        await console_grants.publish_target(self.deps.redis, vm_id, status.vnc)
        self.deps.metrics.booted("resume", ok=True)
        self.deps.metrics.resume.observe(time.perf_counter() - started)
        if await self.moves.succeed(row, S.RUNNING, "resume",
                                    extra={"suspended_at": None, "restart_after": None}) is not None:
            await _drop_suspend_state(row)
        return True

    async def wake_to_stop(self, row: Row) -> Row:
        """A suspended VM that is to stop: load its memory and let the guest power off as any other VM
        does, rather than throw its memory away (its file systems' unwritten data is in there). If the saved
        state cannot be loaded, the VM stops as it is: its disk is as it was when it was suspended."""
        vm_id = str(row["id"])
        try:
            await self.deps.driver.start(vm_id, self._resume_job(row))
            await _drop_suspend_state(row)
        except (ApiError, DriverError, storage.StorageError, OSError) as exc:
            log.warning("VM %s: its saved memory could not be loaded to shut it down: %s", vm_id, reason_of(exc))
            with contextlib.suppress(DriverError):
                await self.deps.driver.stop(vm_id, timeout=0)
        async with store.db.cursor(self.deps.pool) as cur:
            await store.lifecycle.clear_suspended(cur, vm_id)
        return {**row, "suspended_at": None}

    # ---- snapshots (docs/SNAPSHOTS.md)

    async def snapshot_work(self, row: Row) -> bool:
        """Make or delete the VM's next pending snapshot. True: one was done (look again)."""
        async with store.db.cursor(self.deps.pool) as cur:
            work = [dict(s) for s in await store.snapshots.snapshot_work(cur, str(row["id"]))]
        for snap in work:
            if snap["state"] == SnapshotState.CREATING:
                if row["state"] == S.SUSPENDED:  # its memory is in the suspend state: resume, then snapshot
                    return await self.moves.move(row, S.RESUMING, desired=Desired.RUNNING) is not None
                return await self._make_snapshot(row, snap)
            if row["state"] != S.RUNNING or self.deps.driver.saves_memory:
                return await self._delete_snapshot(row, snap)
            # A running VM's disk cannot be changed without its QEMU: deleted once the VM stops.
        return False

    async def _make_snapshot(self, row: Row, snap: Row) -> bool:
        vm_id, tag, driver = str(row["id"]), store.snapshots.snapshot_tag(str(snap["id"])), self.deps.driver
        try:
            if row["state"] == S.RUNNING:
                memory = await driver.save_state(vm_id, tag)
            else:
                if (await driver.status(vm_id)).state == "running":
                    raise DriverError("QEMU runs although the VM is not running; try again")
                await storage.create_snapshot(Path(row["overlay_path"]), tag)
                memory = 0
        except (DriverError, storage.StorageError, OSError) as exc:
            reason = reason_of(exc)
            if isinstance(exc, NotSupported):
                reason += "; stop the VM and take the snapshot then"
            log.warning("VM %s: snapshot %s failed: %s", vm_id, snap["id"], reason)
            await self._drop_snapshot_tag(row, tag)
            async with store.db.cursor(self.deps.pool) as cur:
                await store.snapshots.set_snapshot(cur, str(snap["id"]), SnapshotState.ERROR,
                                                   only_from=(SnapshotState.CREATING,), error_reason=reason)
            await self.moves.fail(row, "snapshot", reason)
            return True
        async with store.db.cursor(self.deps.pool) as cur:
            done = await store.snapshots.set_snapshot(cur, str(snap["id"]), SnapshotState.READY,
                                                      only_from=(SnapshotState.CREATING,), has_memory=memory > 0,
                                                      memory_bytes=memory)
        if done is None:  # deleted (with its VM) while it was being made
            await self._drop_snapshot_tag(row, tag)
        self.moves.succeeded("snapshot")
        await apply_retention(self.deps)
        return True

    async def _delete_tag(self, row: Row, tag: str) -> None:
        """Delete the internal snapshot ``tag`` of the VM's overlay: through its QEMU if it runs (the image is
        open), with qemu-img otherwise."""
        if (await self.deps.driver.status(str(row["id"]))).state == "running":
            await self.deps.driver.delete_state(str(row["id"]), tag)
        else:
            await storage.delete_snapshot(Path(row["overlay_path"]), tag)

    async def _drop_snapshot_tag(self, row: Row, tag: str) -> None:
        """``_delete_tag`` for a snapshot that never became ready: best effort."""
        with contextlib.suppress(DriverError, storage.StorageError, OSError):
            await self._delete_tag(row, tag)

    async def _delete_snapshot(self, row: Row, snap: Row) -> bool:
        try:
            await self._delete_tag(row, store.snapshots.snapshot_tag(str(snap["id"])))
        except (DriverError, storage.StorageError, OSError) as exc:
            log.warning("VM %s: deleting snapshot %s failed: %s; tried again later", row["id"], snap["id"],
                        reason_of(exc))
            return False
        async with store.db.cursor(self.deps.pool) as cur:
            await store.snapshots.set_snapshot(cur, str(snap["id"]), SnapshotState.DELETED,
                                               only_from=(SnapshotState.DELETING,))
        return True

    # ---- restore

    async def restore(self, row: Row) -> bool:
        """Put the VM back to the snapshot ``restore_snapshot``: with its memory, the VM runs on from that
        moment; disk only, the disk goes back and the VM boots from it (or stays stopped)."""
        vm_id, driver = str(row["id"]), self.deps.driver
        async with store.db.cursor(self.deps.pool) as cur:
            wanted = str(row["restore_snapshot"]) if row["restore_snapshot"] else None
            snap = await store.snapshots.snapshot_by_id(cur, wanted) if wanted else None
        running = (await driver.status(vm_id)).state == "running"
        settled = S.RUNNING if running else S.STOPPED
        clear = {"restore_snapshot": None}
        if snap is None or snap["state"] != SnapshotState.READY:
            return await self.moves.move(row, settled, reason="restore: the snapshot is gone",
                                         desired=Desired(settled), extra=clear) is not None
        tag = store.snapshots.snapshot_tag(str(snap["id"]))
        try:
            if snap["has_memory"]:
                if running:
                    await driver.load_state(vm_id, tag)
                    status = await driver.status(vm_id)
                else:
                    status = await driver.start(vm_id, self.deps.templates.loadvm(row["jobspec"], tag,
                                                                                   self.deps.settings))
                if status.state != "running" or status.vnc is None:
                    raise DriverError(f"the VM did not come back: {status.reason or 'no VNC endpoint'}")
                if row["suspended_at"] is not None:
                    await _drop_suspend_state(row)
                await console_grants.publish_target(self.deps.redis, vm_id, status.vnc)
                to_state, desired = S.RUNNING, Desired.RUNNING
            else:
                if running:
                    await self.deps.revoke(vm_id, "vm restored")
                    await driver.stop(vm_id, timeout=0)  # what runs is being thrown away
                await storage.apply_snapshot(Path(row["overlay_path"]), tag)
                if row["suspended_at"] is not None:
                    await _drop_suspend_state(row)
                to_state = S.STARTING if row["desired_state"] == Desired.RUNNING else S.STOPPED
                desired = Desired.RUNNING if to_state == S.STARTING else Desired.STOPPED
        except (ApiError, DriverError, storage.StorageError, OSError) as exc:
            reason = f"restore failed: {reason_of(exc)}"
            log.warning("VM %s: %s", vm_id, reason)
            running = (await driver.status(vm_id)).state == "running"
            back = S.RUNNING if running else (S.SUSPENDED if row["suspended_at"] is not None else S.STOPPED)
            await self.moves.fail(row, "restore", reason, to=back, desired=Desired(back), extra=clear)
            return False
        await self.moves.succeed(row, to_state, "restore", reason=f"restored snapshot {snap['name']!r}",
                                 desired=desired, extra={**clear, "suspended_at": None})
        return True
