"""``Engine``: the lifecycle engine of one gateway process, assembled from its parts and given its
collaborators by keyword. What the web layer (and the tests) call is here; the work is in the parts:

    converge.py, saves.py   one VM's steps                 reconcile.py   rows against the driver
    collect.py              orphans, stuck VMs, retention  runner.py      workers, loops, start and stop
    publish.py              moving rows, events, audit     locks.py       advisory locks
"""

from __future__ import annotations

import logging
from typing import Any

import aiopg
import redis.asyncio as aioredis
from opentelemetry.trace import NoOpTracer, Tracer

from drivers.base import Driver
from gateway.config import Settings
from gateway.engine.collect import Collector
from gateway.engine.converge import Converger
from gateway.engine.deps import EngineDeps
from gateway.engine.queue import WorkQueue
from gateway.engine.reconcile import Reconciler
from gateway.engine.runner import STOP_GRACE, Runner
from gateway.engine.templates import Templates
from gateway.metrics import Metrics

log = logging.getLogger("vmgate.lifecycle")


class Engine:
    """Workers, reconciler and collector of one gateway process."""

    def __init__(self, *, pool: aiopg.Pool, redis: aioredis.Redis, driver: Driver, templates: Templates,
                 settings: Settings, metrics: Metrics, tracer: Tracer | None = None) -> None:
        self.deps = EngineDeps(pool=pool, redis=redis, driver=driver, templates=templates, settings=settings,
                               metrics=metrics, tracer=tracer or NoOpTracer())
        self.converger = Converger(self.deps)
        self.reconciler = Reconciler(self.deps)
        self.collector = Collector(self.deps, self.converger)
        self.runner = Runner(self.deps, converge=self.converger.converge, reconcile=self.reconciler.reconcile_once,
                             collect=self.collector.collect_once)

    @property
    def settings(self) -> Settings:
        """The settings every part reads; assigning replaces them for all parts."""
        return self.deps.settings

    @settings.setter
    def settings(self, value: Settings) -> None:
        self.deps.settings = value

    @property
    def queue(self) -> WorkQueue:
        """The work queue the workers consume."""
        return self.deps.queue

    @property
    def running_seen(self) -> int:
        """VMs recorded running whose QEMU runs, at the last reconciler pass."""
        return self.reconciler.running_seen

    @property
    def watch_wakeups(self) -> int:
        """Reconciler passes the driver's change notifications started."""
        return self.runner.watch_wakeups

    async def start(self) -> None:
        """One reconciler pass at once (re-adopting what runs, when this gateway has workers), then the loops."""
        if self.settings.workers:
            try:
                queued = await self.reconcile_once()
                log.info("start-up: %d running VM(s) re-adopted as they are; %d VM(s) queued for work",
                         self.running_seen, len(queued))
            except Exception as exc:
                log.warning("first reconciler pass failed: %s; the loop tries again", exc)
        await self.runner.start()

    async def stop(self, grace: float = STOP_GRACE) -> None:
        """Let the loops finish (up to ``grace`` s), then cancel them."""
        await self.runner.stop(grace)

    async def enqueue(self, vm_id: str, reason: str) -> None:
        """Queue a VM; if Redis is away, the reconciler queues it when Redis is back."""
        await self.deps.enqueue(vm_id, reason)

    async def converge(self, vm_id: str) -> None:
        """Bring one VM towards its desired state; the caller holds the VM's lock."""
        await self.converger.converge(vm_id)

    async def reconcile_once(self) -> list[str]:
        """One reconciler pass; returns the ids of the VMs it queued."""
        return await self.reconciler.reconcile_once()

    async def update_metrics(self, rows: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Set the queue (and VMs-by-state) gauges; returns the queue's stats."""
        return await self.reconciler.update_metrics(rows)

    async def collect_once(self) -> dict[str, list[str]]:
        """One collector pass; returns what it removed and settled."""
        return await self.collector.collect_once()

    async def apply_retention(self) -> list[str]:
        """Apply snapshot retention now; returns the ids of the snapshots marked for deletion."""
        return await self.collector.apply_retention()
