"""The engine's loops in one gateway process: WORKERS workers consuming the queue (gateway/engine/queue.py),
the reconciler and collector passes on their intervals, and a watch on the driver's change notifications;
``start`` and ``stop`` them.

A worker takes a job, holds the VM's advisory lock (gateway/engine/locks.py) while ``converge`` runs, and
acknowledges the job only once it finished: a job cut short (an outage, a crash, a stop) comes back after
CLAIM_IDLE. The loops are given what they run (``converge``, ``reconcile``, ``collect``), nothing more.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import redis.exceptions

from drivers.base import DriverError
from gateway import store, tracing
from gateway.engine.deps import EngineDeps, is_outage
from gateway.engine.locks import VmLocker
from gateway.engine.queue import Job

log = logging.getLogger("vmgate.lifecycle")

MAX_DELIVERIES = 10  # a job delivered this often without finishing is dropped (the collector settles its VM)
LOCK_WAIT = 60  # seconds a worker waits for another worker's lock on the same VM
STOP_GRACE = 5.0  # seconds the loops get to finish at shutdown
WATCH_WAIT = 5.0  # seconds of one blocking query on the driver (short: a query in flight delays shutdown)

Pass = Callable[[], Awaitable[Any]]


class Runner:
    """Starts and stops the loops. ``watch_wakeups``: reconciler passes the driver's notifications started."""

    def __init__(self, deps: EngineDeps, *, converge: Callable[[str], Awaitable[None]], reconcile: Pass,
                 collect: Pass) -> None:
        self.deps = deps
        self.converge = converge
        self.reconcile = reconcile
        self.collect = collect
        self.tasks: list[asyncio.Task[None]] = []
        self._waiting: set[asyncio.Task[Any]] = set()  # workers blocked in the queue read, nothing in hand
        self.name = f"{socket.gethostname()}-{os.getpid()}"
        self.watch_wakeups = 0
        self.stopping = asyncio.Event()

    async def start(self) -> None:
        """Start the workers and, when there are workers, the reconciler, collector and driver watch."""
        settings = self.deps.settings
        with contextlib.suppress(redis.exceptions.RedisError, OSError):
            await self.deps.queue.ensure_group()
        for index in range(settings.workers):
            self.tasks.append(asyncio.create_task(self._worker(index), name=f"vmgate-worker-{index}"))
        if settings.workers:
            self.tasks.append(asyncio.create_task(self._every(settings.reconcile_interval, self.reconcile),
                                                  name="vmgate-reconciler"))
            self.tasks.append(asyncio.create_task(self._every(settings.collect_interval, self.collect,
                                                              first_delay=settings.collect_interval),
                                                  name="vmgate-collector"))
            self.tasks.append(asyncio.create_task(self._watch_driver(), name="vmgate-driver-watch"))

    async def stop(self, grace: float = STOP_GRACE) -> None:
        """Let the loops finish what they are doing (up to ``grace`` s), then cancel them. A job cut
        short is not acknowledged: another worker (or this gateway, restarted) finishes it."""
        self.stopping.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        pending: set[asyncio.Task[None]] = set(self.tasks)
        while pending and loop.time() < deadline:
            # Workers only waiting for a job have nothing to finish: cancel the read rather than wait it out.
            # Again on every turn: a cancel that lands while redis-py opens a connection can be swallowed
            # (asyncio's timeouts on Python 3.11).
            for task in self._waiting:
                task.cancel()
            _done, pending = await asyncio.wait(pending, timeout=min(0.05, max(0.0, deadline - loop.time())))
        if pending:
            for task in pending:
                task.cancel()
            for task in pending:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self.tasks.clear()

    async def _watch_driver(self) -> None:
        """Reconcile as soon as the driver says something changed (Nomad: a blocking query on its
        allocations), besides the RECONCILE_INTERVAL passes. Drivers that cannot tell end this at once."""
        index, backoff = 0, 1.0
        while not self.stopping.is_set():
            try:
                new = await self.deps.driver.wait_for_change(index, WATCH_WAIT)
            except Exception as exc:
                log.warning("watching the driver: %s", exc, exc_info=not isinstance(exc, DriverError))
                await self._pause(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            backoff = 1.0
            if new is None:
                return
            changed, index = index not in (0, new), (new if new >= index else 0)  # an index going back: start over
            if changed and not self.stopping.is_set():
                self.watch_wakeups += 1
                try:
                    await self.reconcile()
                except Exception as exc:
                    log.warning("reconciling after a driver change: %s", exc, exc_info=not is_outage(exc))

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake at once when the engine stops."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), timeout=seconds)

    async def _every(self, interval: float, action: Pass, first_delay: float = 0.0) -> None:
        await self._pause(first_delay)
        while not self.stopping.is_set():
            try:
                await action()
            except Exception as exc:  # Postgres, Redis or the driver away: try again next time
                log.warning("%s failed: %s", getattr(action, "__name__", action), exc,
                            exc_info=not is_outage(exc))
            await self._pause(interval)

    # ---- workers

    async def _worker(self, index: int) -> None:
        consumer = f"{self.name}-{index}"
        locker = VmLocker(self.deps.settings.postgres_url)
        backoff = 0.2
        try:
            while not self.stopping.is_set():
                try:
                    job = await self._take(consumer)
                    if job is not None:
                        await self._handle(consumer, job, locker)
                    backoff = 0.2
                except Exception as exc:
                    # Not acknowledged: the job comes back after CLAIM_IDLE.
                    log.warning("worker %s: %s", consumer, exc, exc_info=not is_outage(exc))
                    await locker.reset()
                    await self._pause(backoff)
                    backoff = min(backoff * 2, 5.0)
        finally:
            await locker.close()

    async def _take(self, consumer: str) -> Job | None:
        """The next job, or None after a while; stop() cancels this wait at once. A job read from the stream
        just as that cancel lands stays unacknowledged and is claimed again after CLAIM_IDLE, as after a crash."""
        task = asyncio.current_task()
        assert task is not None
        self._waiting.add(task)
        try:
            if self.stopping.is_set():  # stop() came before this worker was waiting: it cancelled nothing here
                return None
            return await self.deps.queue.take(consumer, block_ms=500)
        finally:
            self._waiting.discard(task)

    async def _handle(self, consumer: str, job: Job, locker: VmLocker) -> None:
        queue = self.deps.queue
        if not store.db.is_uuid(job.vm_id):
            await queue.done(job)
            return
        if job.deliveries > MAX_DELIVERIES:
            log.error("VM %s: job %s delivered %d times without finishing; dropped (the collector settles the VM)",
                      job.vm_id, job.id, job.deliveries)
            await queue.done(job)
            return
        keeper = asyncio.create_task(self._keep_fresh(consumer, job))
        tracer, parent = self.deps.tracer, tracing.context_of(job.context)
        request = tracing.REQUEST_ID.set(job.context.get("request_id"))
        try:
            attributes = {"vm.id": job.vm_id, "vmgate.job.reason": job.reason, "vmgate.job.deliveries": job.deliveries}
            # The wait in the queue, as a span of its own: from the message's time to now.
            tracer.start_span("queue.wait", context=parent, attributes=attributes,
                              start_time=int(job.enqueued_at * 1e9)).end()
            with tracer.start_as_current_span("vm.converge", context=parent, attributes=attributes):
                async with locker.hold(job.vm_id, wait=LOCK_WAIT):
                    await self.converge(job.vm_id)
            await queue.done(job)
        finally:
            tracing.REQUEST_ID.reset(request)
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await keeper

    async def _keep_fresh(self, consumer: str, job: Job) -> None:
        while True:
            await asyncio.sleep(max(0.2, self.deps.settings.claim_idle / 3))
            with contextlib.suppress(redis.exceptions.RedisError, OSError):
                await self.deps.queue.touch(consumer, job)
