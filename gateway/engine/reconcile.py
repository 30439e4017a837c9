"""The reconciler: compares every VM's row with what the driver reports and queues the VMs that disagree
(a crashed QEMU, a VM stopping when the gateway died, a message Redis lost), queues idle VMs for suspend,
and updates the queue and state metrics. One pass at a time across gateways (gateway/engine/locks.py).
gateway/engine/runner.py runs it every RECONCILE_INTERVAL and whenever the driver reports a change.
"""

from __future__ import annotations

import time
from typing import Any

from console import redis_keys
from drivers.base import VMStatus
from gateway import states, store
from gateway.engine import activity
from gateway.engine.deps import EngineDeps, now
from gateway.engine.locks import reconciler_turn
from gateway.engine.publish import Row, Transitions
from gateway.states import Desired, VmState

S = VmState


class Reconciler:
    """One gateway's reconciler passes. ``running_seen``: VMs recorded running whose QEMU runs, at the
    last pass (the start-up log line reports it)."""

    def __init__(self, deps: EngineDeps) -> None:
        self.deps = deps
        self.moves = Transitions(pool=deps.pool, redis=deps.redis, metrics=deps.metrics)
        self.running_seen = 0

    async def reconcile_once(self) -> list[str]:
        """Queue every VM whose row and actual state disagree; returns their ids. One gateway at a time."""
        async with reconciler_turn(self.deps.pool) as cur:
            if cur is None:
                return []
            started = time.perf_counter()
            rows = [dict(r) for r in await store.vms.live_vms(cur)]
            actual = await self.deps.driver.list_vms()
            queued = await self._needing_work(rows, actual)
            for vm_id in queued:
                await self.deps.queue.put(vm_id, "reconcile", once=True)
            queued += await self.suspend_idle([r for r in rows if str(r["id"]) not in queued])
            self.deps.metrics.reconcile.observe(time.perf_counter() - started)
        await self.update_metrics(rows)
        return queued

    async def _needing_work(self, rows: list[Row], actual: dict[str, VMStatus]) -> list[str]:
        at = now()
        running_ids = [str(r["id"]) for r in rows if r["state"] == S.RUNNING]
        published: list[Any] = []
        if running_ids:
            async with self.deps.redis.pipeline(transaction=False) as pipe:
                for vm_id in running_ids:
                    pipe.exists(redis_keys.vnc_target_key(vm_id))
                published = await pipe.execute()
        has_target = dict(zip(running_ids, published, strict=True))
        needing = []
        self.running_seen = sum(1 for r in rows if r["state"] == S.RUNNING and str(r["id"]) in actual
                                and actual[str(r["id"])].state == "running")
        for row in rows:
            vm_id, state, desired = str(row["id"]), row["state"], row["desired_state"]
            runs = vm_id in actual and actual[vm_id].state == "running"
            if state in states.TRANSITIONAL:
                need = row["restart_after"] is None or row["restart_after"] <= at
            elif state == S.RUNNING:
                need = desired != Desired.RUNNING or not runs or not has_target.get(vm_id)
            elif state in (S.STOPPED, S.SUSPENDED):
                need = desired != state or runs
            else:  # error
                need = runs
            need = need or bool(row.get("snapshot_work"))
            if need:
                needing.append(vm_id)
        return needing

    async def suspend_idle(self, rows: list[Row]) -> list[str]:
        """Queue for suspend every running VM unused for its IDLE_SUSPEND_AFTER; returns their ids."""
        if not self.deps.driver.saves_memory:
            return []
        # VM id -> (row, its template's idle time), for the running VMs whose template suspends at all.
        idle_after_of = self.deps.templates.idle_suspend_after
        candidates = {str(r["id"]): (r, idle_after_of(r["template"], self.deps.settings))
                      for r in rows if r["state"] == S.RUNNING and r["desired_state"] == Desired.RUNNING}
        candidates = {vm_id: pair for vm_id, pair in candidates.items() if pair[1] > 0}
        if not candidates:
            return []
        used = await activity.usage(self.deps.redis, list(candidates))
        at = time.time()
        suspended = []
        for vm_id, (row, idle_after) in candidates.items():
            last, console_open = used.get(vm_id, (0.0, False))
            idle_for = at - max(last, row["updated_at"].timestamp())
            if console_open or idle_for < idle_after:
                continue
            moved = await self.moves.move(row, S.SUSPENDING, desired=Desired.SUSPENDED,
                                          reason=f"idle for {idle_for:.0f} s (suspends after {idle_after} s)")
            if moved is not None:
                suspended.append(vm_id)
                await self.deps.queue.put(vm_id, "idle", once=True)
        return suspended

    async def update_metrics(self, rows: list[Row] | None = None) -> dict[str, Any]:
        """Set the queue gauges (and, given the live rows, the VMs-by-state gauges); returns the queue's stats."""
        stats = await self.deps.queue.stats()
        metrics = self.deps.metrics
        metrics.queue_depth.set(stats["depth"])
        metrics.queue_pending.set(stats["pending"])
        metrics.queue_oldest.set(stats["oldest_age_seconds"] or 0)
        if rows is not None:
            counts: dict[str, int] = {}
            for row in rows:
                counts[row["state"]] = counts.get(row["state"], 0) + 1
            for state in states.ALL:
                if state != S.DESTROYED:
                    metrics.vms_by_state.labels(state).set(counts.get(state, 0))
        return stats
