"""The collector: removes what no VM owns (overlays, memory states and driver VMs without a VM, stale
console records, expired session revocations), settles VMs stuck in a transitional state past their
deadline, and applies snapshot retention. gateway/engine/runner.py runs it every COLLECT_INTERVAL.
Anything younger than ORPHAN_GRACE is spared, and Postgres is asked again just before each removal:
a create may have begun since the scan.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

from console import redis_keys
from drivers.base import DriverError
from gateway import states, store
from gateway.engine import storage
from gateway.engine.converge import Converger
from gateway.engine.deps import EngineDeps, now
from gateway.engine.locks import VmLocker
from gateway.engine.publish import Row
from gateway.engine.saves import apply_retention
from gateway.states import Desired, VmState

log = logging.getLogger("vmgate.lifecycle")

S = VmState
# Files of a VM beside its overlay, by name: <VMS_ROOT>/users/<user>/<vm>.qcow2, its saved memory, and the
# .part leftovers of an interrupted create or save.
VM_FILES = ("*/*.qcow2", "*/*.qcow2.part", "*/*.state", "*/*.state.part")


def _age_of(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


class Collector:
    """One gateway's collector passes; ``converger`` finishes or undoes the work of stuck VMs."""

    def __init__(self, deps: EngineDeps, converger: Converger) -> None:
        self.deps = deps
        self.converger = converger

    async def collect_once(self) -> dict[str, list[str]]:
        """Remove what no VM owns and settle VMs stuck past their deadline. Returns what it did."""
        async with store.db.cursor(self.deps.pool) as cur:
            rows = {str(r["id"]): dict(r) for r in await store.vms.live_vms(cur)}
        report: dict[str, list[str]] = {
            "overlays": await self._collect_files(rows), "processes": await self._collect_driver_vms(rows),
            "console_records": await self._collect_console_records(rows), "network": await self._tidy_driver()}
        async with store.db.cursor(self.deps.pool) as cur:
            await store.lifecycle.forget_expired_revocations(cur)
        report["stuck"] = await self._settle_stuck(list(rows.values()))
        report["snapshots"] = await self.apply_retention()
        for kind, items in report.items():
            if items:
                log.info("collector: %s: %s", kind, ", ".join(items))
        return report

    async def apply_retention(self) -> list[str]:
        """Mark for deletion the snapshots SNAPSHOT_KEEP and SNAPSHOT_MAX_AGE no longer keep, and queue their VMs."""
        return await apply_retention(self.deps)

    async def _collect_files(self, rows: dict[str, Row]) -> list[str]:
        grace, removed = self.deps.settings.orphan_grace, []
        users_dir = self.deps.settings.vms_root / "users"
        candidates = [p for pattern in VM_FILES for p in sorted(users_dir.glob(pattern))]
        for folder in users_dir.glob("*"):
            # Empty user folders (overlays are removed, folders are not: see storage.remove_overlay).
            if folder.is_dir() and _age_of(folder) >= grace:
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only succeeds when empty; a create that races re-makes it
        for path in candidates:
            vm_id = path.name.split(".", 1)[0]
            if states.holds_quota(rows.get(vm_id)) or _age_of(path) < grace:
                continue
            if not await self._still_orphan(vm_id):
                continue
            await storage.remove_overlay(path.with_name(f"{vm_id}.qcow2"))
            removed.append(str(path))
        return removed

    async def _tidy_driver(self) -> list[str]:
        """What the driver keeps for running VMs outside their tasks (network namespaces) whose VM is gone."""
        try:
            return await self.deps.driver.tidy()
        except DriverError as exc:
            log.warning("collector: the driver could not tidy up: %s", exc)
            return []

    async def _collect_driver_vms(self, rows: dict[str, Row]) -> list[str]:
        """Driver VMs (QEMU processes, Nomad jobs) with no VM."""
        removed = []
        for vm_id, status in (await self.deps.driver.list_vms()).items():
            if states.holds_quota(rows.get(vm_id)):
                continue
            started = status.details.get("started_at_epoch")
            if isinstance(started, int | float) and time.time() - started < self.deps.settings.orphan_grace:
                continue
            if not await self._still_orphan(vm_id):
                continue
            await self.deps.driver.destroy(vm_id)
            removed.append(vm_id)
        return removed

    async def _still_orphan(self, vm_id: str) -> bool:
        """Look again, in Postgres, just before removing: a create may have begun since the scan."""
        if not store.db.is_uuid(vm_id):
            return True
        async with store.db.cursor(self.deps.pool) as cur:
            return not states.holds_quota(await store.vms.vm_by_id(cur, vm_id))

    async def _collect_console_records(self, rows: dict[str, Row]) -> list[str]:
        redis, removed = self.deps.redis, []
        async for key in redis.scan_iter(match=redis_keys.vnc_target_key("*"), count=200):
            name = key.decode() if isinstance(key, bytes) else key
            row = rows.get(name.rsplit(":", 1)[-1])
            if row is None or row["state"] not in states.MAY_HAVE_CONSOLE:
                await redis.delete(name)
                removed.append(name)
        for pattern in (redis_keys.vm_tokens_key("*"), redis_keys.user_tokens_key("*")):
            async for key in redis.scan_iter(match=pattern, count=200):
                name = key.decode() if isinstance(key, bytes) else key
                for digest in await redis.smembers(name):
                    digest = digest.decode() if isinstance(digest, bytes) else digest
                    if not await redis.exists(redis_keys.token_key(digest)):
                        await redis.srem(name, digest)
                        removed.append(f"{name} {digest[:8]}")
        return removed

    async def _settle_stuck(self, rows: list[Row]) -> list[str]:
        """A VM in a transitional state past its deadline: finish or undo what it was doing."""
        settings, settled, at = self.deps.settings, [], now()
        locker = VmLocker(settings.postgres_url)
        try:
            for row in rows:
                state = row["state"]
                if state not in states.TRANSITIONAL:
                    continue
                limit = settings.transition_timeout + (settings.stop_timeout if state == S.STOPPING else 0)
                since = max(row["updated_at"], row["restart_after"] or row["updated_at"])
                if (at - since).total_seconds() < limit:
                    continue
                async with locker.hold(str(row["id"]), wait=0) as got:
                    if not got:
                        continue  # a worker is on it
                    fresh = await self.converger.row(str(row["id"]))
                    if fresh is None or fresh["state"] != state or fresh["updated_at"] != row["updated_at"]:
                        continue
                    await self._settle(fresh, limit)
                    settled.append(f"{row['id']} ({state})")
        finally:
            await locker.close()
        return settled

    async def _settle(self, row: Row, limit: float) -> None:
        vm_id, state = str(row["id"]), row["state"]
        reason = f"{state} for more than {limit:g} s"
        if state in (S.PROVISIONING, S.STARTING) and row["started_at"] is None:
            await self.converger.fail_create(row, DriverError(reason))
        elif state in (S.STARTING, S.STOPPING) and row["suspended_at"] is None:
            with contextlib.suppress(DriverError):
                await self.deps.driver.stop(vm_id, timeout=0)
            await self.deps.revoke(vm_id)
            await self.converger.moves.move(row, S.STOPPED, reason=f"{reason}: stopped", desired=Desired.STOPPED)
        else:  # destroying, suspending, resuming, restoring: each step finishes or undoes itself
            await self.converger.converge(vm_id)
