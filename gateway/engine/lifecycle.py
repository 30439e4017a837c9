"""The lifecycle engine: desired state in Postgres, actual state from the driver, and the loops
that make them agree. docs/LIFECYCLE.md is the long version.

- The API only records what the user wants (a compare-and-set on the VM's row: its state becomes
  ``provisioning``, ``starting``, ``stopping`` or ``destroying`` and its desired state changes) and
  queues the VM (gateway.workqueue).
- Workers take queued VMs and ``converge`` them, one step at a time, re-reading the row after each
  step, while holding the VM's Postgres advisory lock: two workers (in one process or in several
  gateways) never act on one VM at once, and a worker that dies releases the lock with its
  connection. Every step is idempotent, so a job re-delivered after a crash finishes the work once.
- The reconciler compares every VM's row with what the driver reports and queues those that
  disagree (a crashed QEMU, a VM stopping when the gateway died, a message Redis lost).
- The collector removes what nothing owns (overlays and QEMU processes without a VM, stale
  console records) and settles VMs stuck in a transitional state past their deadline.

Every state change is published on Redis (``publish``) for the server-sent events of gateway.events.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiopg
import psycopg2
import redis.asyncio as aioredis
import redis.exceptions
from aiohttp import web

from console import redis_keys
from drivers.base import Driver, DriverError, NotSupported, VMStatus
from gateway import states, store
from gateway.config import Settings
from gateway.engine import activity, console_grants, storage
from gateway.engine.queue import Job, WorkQueue
from gateway.engine.templates import Templates
from gateway.errors import ApiError
from gateway.faults import crash_point
from gateway.web.appkeys import db_key, driver_key, metrics_key, redis_key, settings_key, templates_key
from jobspecs import is_warm

log = logging.getLogger("vmgate.lifecycle")

MAX_STEPS = 12  # steps of one converge; each moves the VM on, so a handful always suffices
MAX_DELIVERIES = 10  # a job delivered this often without finishing is dropped (the collector settles its VM)
LOCK_WAIT = 60  # seconds a worker waits for another worker's lock on the same VM
RECONCILER_LOCK = 0x766D67617465  # "vmgate": one reconciler pass at a time across gateways
SERIAL_TAIL_LINES = 8
STOP_GRACE = 5.0  # seconds the loops get to finish at shutdown
WATCH_WAIT = 5.0  # seconds of one blocking query on the driver (short: a query in flight delays shutdown)
NS = 1_000_000_000

ENGINE_KEY = web.AppKey("engine", object)


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# ---- events ----------------------------------------------------------------------------------------

def vm_channel(vm_id: str) -> str:
    return f"{redis_keys.PREFIX}events:vm:{vm_id}"


def user_channel(user_id: str) -> str:
    return f"{redis_keys.PREFIX}events:user:{user_id}"


def event_of(row: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON of one state change (the ``data`` of a server-sent ``state`` event)."""
    at = row.get("at") or row.get("updated_at") or now()
    return {"id": row.get("event_id"), "vm_id": str(row.get("vm_id") or row["id"]), "state": row["state"],
            "desired_state": row["desired_state"], "error": row.get("error_reason"), "reason": row.get("reason"),
            "at": at.isoformat() if isinstance(at, dt.datetime) else str(at)}


async def publish(redis_client: aioredis.Redis, row: Mapping[str, Any]) -> None:
    """Tell live event streams about a state change. A Redis outage loses nothing: streams replay
    missed changes from Postgres (Last-Event-ID)."""
    payload = json.dumps(event_of(row))
    try:
        async with redis_client.pipeline(transaction=False) as pipe:
            pipe.publish(vm_channel(str(row["id"])), payload)
            pipe.publish(user_channel(str(row["user_id"])), payload)
            await pipe.execute()
    except (redis.exceptions.RedisError, OSError) as exc:
        log.warning("could not publish the state change of VM %s: %s", row["id"], exc)


async def set_state(app: web.Application, vm_id: str, to_state: str, *, only_from: tuple[str, ...] | None = None,
                    reason: str | None = None, desired: str | None = None,
                    extra: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """``store.vms.transition`` then ``publish``; None when the VM was not in ``only_from``."""
    async with store.db.cursor(app[db_key]) as cur:
        row = await store.vms.transition(cur, vm_id, to_state, only_from=only_from, reason=reason, desired=desired,
                                         extra=extra)
    if row is not None:
        await publish(app[redis_key], row)
    return dict(row) if row is not None else None


# ---- the restart policy ----------------------------------------------------------------------------

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


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ApiError):
        return exc.message
    if isinstance(exc, DriverError | storage.StorageError | OSError):
        return str(exc)[:1000]
    return f"internal error ({type(exc).__name__})"


def _serial_tail(text: str) -> str:
    lines = [line.strip() for line in text.replace("\r", "").splitlines() if line.strip()]
    return " | ".join(lines[-SERIAL_TAIL_LINES:])[-1500:]


# ---- the engine ------------------------------------------------------------------------------------

class Engine:
    """Workers, reconciler and collector of one gateway process."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.settings: Settings = app[settings_key]
        self.driver: Driver = app[driver_key]
        self.redis: aioredis.Redis = app[redis_key]
        self.pool: aiopg.Pool = app[db_key]
        self.catalog: Templates = app[templates_key]
        self.queue = WorkQueue(self.redis, claim_idle=self.settings.claim_idle)
        self.tasks: list[asyncio.Task[None]] = []
        self.name = f"{socket.gethostname()}-{os.getpid()}"
        self.running_seen = 0  # VMs recorded running whose QEMU runs, at the last reconciler pass
        self.watch_wakeups = 0  # reconciler passes the driver's change notifications started
        self.stopping = asyncio.Event()

    # ---- running the loops

    async def start(self) -> None:
        with contextlib.suppress(redis.exceptions.RedisError, OSError):
            await self.queue.ensure_group()
        for index in range(self.settings.workers):
            self.tasks.append(asyncio.create_task(self._worker(index), name=f"vmgate-worker-{index}"))
        if self.settings.workers:
            self.tasks.append(asyncio.create_task(self._every(self.settings.reconcile_interval, self.reconcile_once),
                                                  name="vmgate-reconciler"))
            self.tasks.append(asyncio.create_task(self._every(self.settings.collect_interval, self.collect_once,
                                                              first_delay=self.settings.collect_interval),
                                                  name="vmgate-collector"))
            self.tasks.append(asyncio.create_task(self._watch_driver(), name="vmgate-driver-watch"))

    async def stop(self, grace: float = STOP_GRACE) -> None:
        """Let the loops finish what they are doing (up to ``grace`` s), then cancel them. A job cut
        short is not acknowledged: another worker (or this gateway, restarted) finishes it."""
        self.stopping.set()
        if self.tasks:
            _done, pending = await asyncio.wait(self.tasks, timeout=grace)
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
                new = await self.driver.wait_for_change(index, WATCH_WAIT)
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
                    await self.reconcile_once()
                except Exception as exc:
                    log.warning("reconciling after a driver change: %s", exc, exc_info=not _is_outage(exc))

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake at once when the engine stops."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), timeout=seconds)

    async def _every(self, interval: float, action: Any, first_delay: float = 0.0) -> None:
        await self._pause(first_delay)
        while not self.stopping.is_set():
            try:
                await action()
            except Exception as exc:  # Postgres, Redis or the driver away: try again next time
                log.warning("%s failed: %s", getattr(action, "__name__", action), exc,
                            exc_info=not _is_outage(exc))
            await self._pause(interval)

    # ---- workers

    async def _worker(self, index: int) -> None:
        consumer = f"{self.name}-{index}"
        locker = VmLocker(self.settings.postgres_url)
        backoff = 0.2
        try:
            while not self.stopping.is_set():
                try:
                    job = await self.queue.take(consumer, block_ms=500)
                    if job is not None:
                        await self._handle(consumer, job, locker)
                    backoff = 0.2
                except Exception as exc:
                    # Not acknowledged: the job comes back after CLAIM_IDLE.
                    log.warning("worker %s: %s", consumer, exc, exc_info=not _is_outage(exc))
                    await locker.reset()
                    await self._pause(backoff)
                    backoff = min(backoff * 2, 5.0)
        finally:
            await locker.close()

    async def _handle(self, consumer: str, job: Job, locker: VmLocker) -> None:
        if not store.db.is_uuid(job.vm_id):
            await self.queue.done(job)
            return
        if job.deliveries > MAX_DELIVERIES:
            log.error("VM %s: job %s delivered %d times without finishing; dropped (the collector settles the VM)",
                      job.vm_id, job.id, job.deliveries)
            await self.queue.done(job)
            return
        keeper = asyncio.create_task(self._keep_fresh(consumer, job))
        try:
            async with locker.hold(job.vm_id, wait=LOCK_WAIT):
                await self.converge(job.vm_id)
            await self.queue.done(job)
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await keeper

    async def _keep_fresh(self, consumer: str, job: Job) -> None:
        while True:
            await asyncio.sleep(max(0.2, self.settings.claim_idle / 3))
            with contextlib.suppress(redis.exceptions.RedisError, OSError):
                await self.queue.touch(consumer, job)

    async def enqueue(self, vm_id: str, reason: str) -> None:
        """Queue a VM; if Redis is away, the reconciler queues it when Redis is back."""
        try:
            await self.queue.put(vm_id, reason)
        except (redis.exceptions.RedisError, OSError) as exc:
            log.warning("could not queue VM %s (%s): %s; the reconciler will", vm_id, reason, exc)

    # ---- converging one VM

    async def _row(self, vm_id: str) -> dict[str, Any] | None:
        async with store.db.cursor(self.pool) as cur:
            row = await store.vms.vm_by_id(cur, vm_id)
        return dict(row) if row is not None else None

    async def converge(self, vm_id: str) -> None:
        """Bring one VM towards its desired state. The caller holds the VM's lock."""
        for _ in range(MAX_STEPS):
            row = await self._row(vm_id)
            if row is None or row["state"] == "destroyed":
                return
            if not await self._step(row):
                return
        log.warning("VM %s: still not converged after %d steps; it is queued again", vm_id, MAX_STEPS)
        await self.enqueue(vm_id, "more steps")

    async def _step(self, row: dict[str, Any]) -> bool:
        """Do the next thing the VM needs. True: something changed, look again."""
        state, desired = row["state"], row["desired_state"]
        if desired == "destroyed":
            return await self._destroy(row)
        if state in ("requested", "provisioning"):  # requested: a row no step would ever move on otherwise
            return await self._provision(row)
        if state == "restoring":
            return await self._restore(row)
        if state == "suspending":
            return await self._suspend(row)  # finished whatever is wanted now; the next step follows that
        if state == "stopping" or (desired == "stopped" and state in ("running", "starting")):
            return await self._stop(row)
        if desired == "suspended":
            if state == "running":
                return await self._suspend(row)
            if state == "suspended":
                await self._ensure_not_running(row, hard=True)
                return await self._snapshot_work(row)
            return False
        if desired == "running":
            if state == "starting":
                return await self._start(row)
            if state == "running":
                return await self._check_running(row) or await self._snapshot_work(row)
            if state == "stopped":
                return await self._cas(row, "starting") is not None
            if state == "suspended":
                return await self._cas(row, "resuming") is not None
            if state == "resuming":
                return await self._resume(row)
            return False  # error (crashed and given up) waits for the user
        # desired stopped: stopped, or error
        await self._ensure_not_running(row)
        return await self._snapshot_work(row)

    async def _cas(self, row: dict[str, Any], to_state: str, **kwargs: Any) -> dict[str, Any] | None:
        return await set_state(self.app, str(row["id"]), to_state, only_from=(row["state"],), **kwargs)

    async def _audit(self, row: dict[str, Any], action: str, reason: str) -> None:
        async with store.db.cursor(self.pool) as cur:
            await store.audit.record(cur, action=action, outcome="error", user_id=str(row["user_id"]),
                                     vm_id=str(row["id"]), details={"reason": reason})
        self.app[metrics_key].vm_ops.labels(action.removeprefix("vm."), "error").inc()

    async def _provision(self, row: dict[str, Any]) -> bool:
        vm_id = str(row["id"])
        crash_point("create.admitted")
        try:
            template = self.catalog.get(row["template"])
            await self.catalog.verify(template)
            job = row.get("jobspec")
            if not job:
                vm = {**row, "id": vm_id}
                job = self.catalog.render(template, vm, owner=str(row["user_id"]), settings=self.settings)
                async with store.db.cursor(self.pool) as cur:
                    await store.vms.set_jobspec(cur, vm_id, job)
            # A warm job's overlay sits on the template's warm disk layer, a cold one's on the base disk.
            await storage.create_overlay(self.catalog.overlay_base(template, job), Path(row["overlay_path"]),
                                         row["disk_gb"])
        except (ApiError, storage.StorageError, OSError) as exc:
            await self._fail_create(row, exc)
            return False
        crash_point("create.overlay")
        return await self._cas(row, "starting") is not None

    async def _fail_create(self, row: dict[str, Any], exc: BaseException) -> None:
        """A create that cannot finish leaves nothing: no process, no console, no overlay, no quota use."""
        vm_id, reason = str(row["id"]), _reason(exc)
        log.warning("create of VM %s failed: %s", vm_id, reason)
        await self._clean_up(row)
        if await self._cas(row, "error", reason=reason, desired="destroyed") is not None:
            await self._audit(row, "vm.create", reason)

    async def _clean_up(self, row: dict[str, Any]) -> None:
        vm_id = str(row["id"])
        with contextlib.suppress(DriverError):
            await self.driver.destroy(vm_id)
        await self._revoke(vm_id)
        if row["overlay_path"]:
            storage.remove_overlay(Path(row["overlay_path"]))

    async def _revoke(self, vm_id: str, reason: str = "vm stopped") -> None:
        await console_grants.revoke_vm(self.redis, vm_id, reason)

    async def _start(self, row: dict[str, Any]) -> bool:
        vm_id = str(row["id"])
        if row["restart_after"] is not None and row["restart_after"] > now():
            return False  # waiting out the restart delay; the reconciler queues it when due
        first = row["started_at"] is None
        try:
            if not row.get("jobspec") or not row["overlay_path"] or not Path(row["overlay_path"]).exists():
                raise DriverError("the VM's disk is missing")
            template = self.catalog.get(row["template"])
            await self.catalog.verify(template)
            job = row["jobspec"]
            if is_warm(job):
                # Only this first start may restore the saved memory state: once the VM ran, its disk
                # moved on. The cold job is stored before QEMU starts, so a retry or any later start
                # boots from the VM's own disk (docs/LIFECYCLE.md, "Warm starts").
                await self.catalog.verify_warm(template, job)
                async with store.db.cursor(self.pool) as cur:
                    await store.vms.set_jobspec(cur, vm_id, self.catalog.cold(job, self.settings))
            status = await self.driver.start(vm_id, job)
            if status.state != "running":
                raise DriverError(f"the VM stopped as soon as it started: {status.reason or 'no reason given'}")
            if status.vnc is None:
                raise DriverError("the driver reported no VNC endpoint")
        except (ApiError, DriverError, storage.StorageError, OSError) as exc:
            with contextlib.suppress(DriverError):
                if first:
                    await self.driver.destroy(vm_id)
                else:  # the VM keeps its task dir: serial log and exit record say what went wrong
                    await self.driver.stop(vm_id, timeout=0)
            await self._revoke(vm_id)
            if first:
                await self._fail_create(row, exc)
            else:
                reason = f"start failed: {_reason(exc)}"
                if await self._cas(row, "stopped", reason=reason, desired="stopped") is not None:
                    await self._audit(row, "vm.start", reason)
            return False
        crash_point("create.started")
        await console_grants.publish_target(self.redis, vm_id, status.vnc)
        moved = await self._cas(row, "running", extra={"restart_after": None})
        if moved is not None:
            self.app[metrics_key].vm_ops.labels("create" if first else "start", "ok").inc()
        return moved is None  # lost a race (a stop or destroy came in): look again

    async def _check_running(self, row: dict[str, Any]) -> bool:
        vm_id = str(row["id"])
        status = await self.driver.status(vm_id)
        if status.state == "running":
            if status.vnc is not None and not await console_grants.has_target(self.redis, vm_id):
                await console_grants.publish_target(self.redis, vm_id, status.vnc)
                log.info("VM %s: console target published again", vm_id)
            return False
        await self._revoke(vm_id)
        if self.driver.manages_restarts and status.details.get("how") == "pending":
            return await self._cas(row, "starting", reason=f"the cluster is restarting the VM: {status.reason}") \
                is not None
        if status.details.get("returncode") == 0:
            moved = await self._cas(row, "stopped", reason="the guest powered off", desired="stopped")
            return moved is not None
        return await self._crashed(row, status)

    async def _crashed(self, row: dict[str, Any], status: VMStatus) -> bool:
        """QEMU died unexpectedly: restart it following the job's restart block, or give up."""
        policy = restart_policy(row.get("jobspec"), self.settings)
        at = now()
        window = at - dt.timedelta(seconds=policy["interval"])
        crashes = [t for t in (row["crash_times"] or []) if t > window] + [at]
        why = status.reason or "QEMU stopped unexpectedly"
        log.warning("VM %s crashed (%s); %d crash(es) in the last %g s", row["id"], why, len(crashes),
                    policy["interval"])
        manages = self.driver.manages_restarts
        if not manages and len(crashes) <= policy["attempts"]:
            reason = (f"{why}; restart {len(crashes)} of {policy['attempts']} within {policy['interval']:g} s,"
                      f" after {policy['delay']:g} s")
            return await self._cas(row, "starting", reason=reason, extra={
                "crash_times": crashes[-100:], "restart_after": at + dt.timedelta(seconds=policy["delay"])}) is not None
        if not manages and policy["mode"] == "delay":
            resume = min(crashes) + dt.timedelta(seconds=policy["interval"])
            reason = (f"{why}; {policy['attempts']} restarts within {policy['interval']:g} s used up, "
                      f"waiting until {resume.isoformat(timespec='seconds')} (restart mode delay)")
            return await self._cas(row, "starting", reason=reason, extra={
                "crash_times": crashes[-100:], "restart_after": resume}) is not None
        try:
            tail = _serial_tail(await self.driver.logs(str(row["id"]), 8192))
        except DriverError:
            tail = ""
        reason = (f"{why}; gave up after {policy['attempts']} restart(s) within {policy['interval']:g} s"
                  + (f". Last serial output: {tail}" if tail else ""))
        if await self._cas(row, "error", reason=reason, desired="stopped",
                           extra={"crash_times": crashes[-100:]}) is not None:
            await self._audit(row, "vm.crash", reason)
        return False

    async def _stop(self, row: dict[str, Any]) -> bool:
        vm_id = str(row["id"])
        if row["state"] != "stopping":
            moved = await self._cas(row, "stopping")
            if moved is None:
                return True
            row = {**row, **moved}
        crash_point("stop.requested")
        await self._revoke(vm_id)
        if row["suspended_at"] is not None:
            row = await self._wake_to_stop(row)
        try:
            await self.driver.stop(vm_id, timeout=self.settings.stop_timeout)
        except DriverError as exc:
            reason = f"stop failed: {_reason(exc)}"
            if await self._cas(row, "error", reason=reason) is not None:
                await self._audit(row, "vm.stop", reason)
            return False
        moved = await self._cas(row, "stopped", extra={"restart_after": None, "suspended_at": None})
        if moved is not None:
            self.app[metrics_key].vm_ops.labels("stop", "ok").inc()
        return True

    async def _wake_to_stop(self, row: dict[str, Any]) -> dict[str, Any]:
        """A suspended VM that is to stop: load its memory and let the guest power off as any other VM
        does, rather than throw its memory away (its file systems' unwritten data is in there). If the saved
        state cannot be loaded, the VM stops as it is: its disk is as it was when it was suspended."""
        vm_id = str(row["id"])
        try:
            await self.driver.start(vm_id, self._resume_job(row))
            self._drop_suspend_state(row)
        except (ApiError, DriverError, storage.StorageError, OSError) as exc:
            log.warning("VM %s: its saved memory could not be loaded to shut it down: %s", vm_id, _reason(exc))
            with contextlib.suppress(DriverError):
                await self.driver.stop(vm_id, timeout=0)
        async with store.db.cursor(self.pool) as cur:
            await cur.execute("UPDATE vms SET suspended_at = NULL WHERE id = %s", (vm_id,))
        return {**row, "suspended_at": None}

    async def _ensure_not_running(self, row: dict[str, Any], hard: bool = False) -> None:
        """A VM that should not run but does (the user stopped it while the gateway was away...).
        ``hard``: a suspended VM's QEMU is ended without a shutdown (its memory is saved already)."""
        vm_id = str(row["id"])
        status = await self.driver.status(vm_id)
        if status.state == "running":
            log.info("VM %s is %s but QEMU runs; stopping it", vm_id, row["state"])
            await self._revoke(vm_id)
            await self.driver.stop(vm_id, timeout=0 if hard else self.settings.stop_timeout)

    async def _destroy(self, row: dict[str, Any]) -> bool:
        if row["state"] not in ("destroying", "error"):
            moved = await self._cas(row, "destroying")
            if moved is None:
                return True
            row = {**row, **moved}
        try:
            await self._revoke(str(row["id"]), "vm destroyed")
            await activity.forget(self.redis, str(row["id"]))
            await self.driver.destroy(str(row["id"]))
            if row["overlay_path"]:
                storage.remove_overlay(Path(row["overlay_path"]))
            async with store.db.cursor(self.pool) as cur:
                await store.snapshots.forget_snapshots(cur, str(row["id"]), "vm destroyed")
        except (DriverError, OSError) as exc:
            reason = f"destroy failed: {_reason(exc)}"
            if row["state"] != "error" and await self._cas(row, "error", reason=reason) is not None:
                await self._audit(row, "vm.destroy", reason)
            return False
        if row["state"] == "destroying" and await self._cas(row, "destroyed") is not None:
            self.app[metrics_key].vm_ops.labels("destroy", "ok").inc()
        return False

    # ---- suspend and resume (docs/LIFECYCLE.md, "Suspend and resume")

    async def _suspend(self, row: dict[str, Any]) -> bool:
        """Save the VM's memory to ``<vm_id>.state`` beside its overlay and end QEMU."""
        vm_id = str(row["id"])
        if row["state"] != "suspending":
            moved = await self._cas(row, "suspending")
            if moved is None:
                return True
            row = {**row, **moved}
        await self._revoke(vm_id, "vm suspended")
        status = await self.driver.status(vm_id)
        if status.state == "running":
            try:
                size = await self.driver.suspend_to(vm_id, str(storage.state_path(Path(row["overlay_path"]))))
            except DriverError as exc:
                # QEMU goes on (suspend_to resumes it on failure): the VM is running, as before.
                reason = f"suspend failed: {_reason(exc)}"
                log.warning("VM %s: %s", vm_id, reason)
                if await self._cas(row, "running", reason=reason, desired="running") is not None:
                    await self._audit(row, "vm.suspend", reason)
                return True
            reason = f"memory saved ({size >> 20} MiB)"
            crash_point("suspend.saved")
        elif await self._suspend_state_saved(row):
            reason = "memory saved"  # saved, and the worker that saved it died before recording it
        else:
            return await self._cas(row, "stopped", reason="QEMU ended before its memory was saved",
                                   desired="stopped") is not None
        moved = await self._cas(row, "suspended", reason=reason, extra={"suspended_at": now()})
        if moved is not None:
            self.app[metrics_key].vm_ops.labels("suspend", "ok").inc()
        return True

    async def _suspend_state_saved(self, row: dict[str, Any]) -> bool:
        """True when a complete memory state was saved since the VM began suspending (the driver renames it
        into place only once QEMU wrote all of it)."""
        try:
            info = storage.state_path(Path(row["overlay_path"])).stat()
        except (OSError, TypeError):
            return False
        return info.st_size > 0 and info.st_mtime >= row["updated_at"].timestamp() - 1

    def _resume_job(self, row: dict[str, Any]) -> dict[str, Any]:
        return self.catalog.resume(row["jobspec"], storage.state_path(Path(row["overlay_path"])), self.settings)

    async def _resume(self, row: dict[str, Any]) -> bool:
        """Start QEMU from the suspend state (``-loadvm``): the VM runs on where it was."""
        vm_id = str(row["id"])
        try:
            if not row.get("jobspec") or not row["overlay_path"] or not Path(row["overlay_path"]).exists():
                raise DriverError("the VM's disk is missing")
            status = await self.driver.start(vm_id, self._resume_job(row))
            if status.state != "running" or status.vnc is None:
                raise DriverError(f"the VM did not come back: {status.reason or 'no VNC endpoint'}")
            crash_point("resume.started")
        except (ApiError, DriverError, storage.StorageError, OSError) as exc:
            with contextlib.suppress(DriverError):
                await self.driver.stop(vm_id, timeout=0)
            reason = f"resume failed: {_reason(exc)}"
            log.warning("VM %s: %s", vm_id, reason)
            # Still suspended: its saved memory and disk are untouched. Stopping it (or destroying it) works.
            if await self._cas(row, "suspended", reason=reason, desired="suspended") is not None:
                await self._audit(row, "vm.resume", reason)
            return False
        await console_grants.publish_target(self.redis, vm_id, status.vnc)
        moved = await self._cas(row, "running", extra={"suspended_at": None, "restart_after": None})
        if moved is not None:
            self.app[metrics_key].vm_ops.labels("resume", "ok").inc()
            self._drop_suspend_state(row)
        return True

    @staticmethod
    def _drop_suspend_state(row: dict[str, Any]) -> None:
        """Delete the saved memory once the VM runs on from it (or its disk went back to a snapshot): the
        disk has moved on since, so it must never be restored again."""
        storage.remove_state(Path(row["overlay_path"]))

    async def suspend_idle(self, rows: list[dict[str, Any]]) -> list[str]:
        """Queue for suspend every running VM unused for its IDLE_SUSPEND_AFTER; returns their ids."""
        if not self.driver.saves_memory:
            return []
        # VM id -> (row, its template's idle time), for the running VMs whose template suspends at all.
        candidates = {str(r["id"]): (r, self.catalog.idle_suspend_after(r["template"], self.settings))
                      for r in rows if r["state"] == "running" and r["desired_state"] == "running"}
        candidates = {vm_id: pair for vm_id, pair in candidates.items() if pair[1] > 0}
        if not candidates:
            return []
        used = await activity.usage(self.redis, list(candidates))
        at = time.time()
        suspended = []
        for vm_id, (row, idle_after) in candidates.items():
            last, console_open = used.get(vm_id, (0.0, False))
            idle_for = at - max(last, row["updated_at"].timestamp())
            if console_open or idle_for < idle_after:
                continue
            moved = await set_state(self.app, vm_id, "suspending", only_from=("running",), desired="suspended",
                                    reason=f"idle for {idle_for:.0f} s (suspends after {idle_after} s)")
            if moved is not None:
                suspended.append(vm_id)
                await self.queue.put(vm_id, "idle", once=True)
        return suspended

    # ---- snapshots (docs/SNAPSHOTS.md)

    async def _snapshot_work(self, row: dict[str, Any]) -> bool:
        """Make or delete the VM's next pending snapshot. True: one was done (look again)."""
        vm_id = str(row["id"])
        async with store.db.cursor(self.pool) as cur:
            work = [dict(snap) for snap in await store.snapshots.snapshot_work(cur, vm_id)]
        for snap in work:
            if snap["state"] == "creating":
                if row["state"] == "suspended":  # its memory is in the suspend state: resume, then snapshot
                    return await self._cas(row, "resuming", desired="running") is not None
                return await self._make_snapshot(row, snap)
            if row["state"] != "running" or self.driver.saves_memory:
                return await self._delete_snapshot(row, snap)
            # A running VM's disk cannot be changed without its QEMU: deleted once the VM stops.
        return False

    async def _make_snapshot(self, row: dict[str, Any], snap: dict[str, Any]) -> bool:
        vm_id, tag = str(row["id"]), store.snapshots.snapshot_tag(str(snap["id"]))
        try:
            if row["state"] == "running":
                memory = await self.driver.save_state(vm_id, tag)
            else:
                if (await self.driver.status(vm_id)).state == "running":
                    raise DriverError("QEMU runs although the VM is not running; try again")
                await storage.create_snapshot(Path(row["overlay_path"]), tag)
                memory = 0
        except (DriverError, storage.StorageError, OSError) as exc:
            reason = _reason(exc)
            if isinstance(exc, NotSupported):
                reason += "; stop the VM and take the snapshot then"
            log.warning("VM %s: snapshot %s failed: %s", vm_id, snap["id"], reason)
            await self._drop_snapshot_tag(row, tag)
            async with store.db.cursor(self.pool) as cur:
                await store.snapshots.set_snapshot(cur, str(snap["id"]), "error", only_from=("creating",),
                                                   error_reason=reason)
            await self._audit(row, "vm.snapshot", reason)
            return True
        async with store.db.cursor(self.pool) as cur:
            done = await store.snapshots.set_snapshot(cur, str(snap["id"]), "ready", only_from=("creating",),
                                                      has_memory=memory > 0, memory_bytes=memory)
        if done is None:  # deleted (with its VM) while it was being made
            await self._drop_snapshot_tag(row, tag)
        self.app[metrics_key].vm_ops.labels("snapshot", "ok").inc()
        await self.apply_retention()
        return True

    async def _delete_tag(self, row: dict[str, Any], tag: str) -> None:
        """Delete the internal snapshot ``tag`` of the VM's overlay: through its QEMU if it runs (the image is
        open), with qemu-img otherwise."""
        if (await self.driver.status(str(row["id"]))).state == "running":
            await self.driver.delete_state(str(row["id"]), tag)
        else:
            await storage.delete_snapshot(Path(row["overlay_path"]), tag)

    async def _drop_snapshot_tag(self, row: dict[str, Any], tag: str) -> None:
        """``_delete_tag`` for a snapshot that never became ready: best effort."""
        with contextlib.suppress(DriverError, storage.StorageError, OSError):
            await self._delete_tag(row, tag)

    async def _delete_snapshot(self, row: dict[str, Any], snap: dict[str, Any]) -> bool:
        vm_id = str(row["id"])
        try:
            await self._delete_tag(row, store.snapshots.snapshot_tag(str(snap["id"])))
        except (DriverError, storage.StorageError, OSError) as exc:
            log.warning("VM %s: deleting snapshot %s failed: %s; tried again later", vm_id, snap["id"], _reason(exc))
            return False
        async with store.db.cursor(self.pool) as cur:
            await store.snapshots.set_snapshot(cur, str(snap["id"]), "deleted", only_from=("deleting",))
        return True

    async def _restore(self, row: dict[str, Any]) -> bool:
        """Put the VM back to the snapshot ``restore_snapshot``: with its memory, the VM runs on from that
        moment; disk only, the disk goes back and the VM boots from it (or stays stopped)."""
        vm_id = str(row["id"])
        async with store.db.cursor(self.pool) as cur:
            snap = (await store.snapshots.snapshot_by_id(cur, str(row["restore_snapshot"]))
                    if row["restore_snapshot"] else None)
        running = (await self.driver.status(vm_id)).state == "running"
        settled = "running" if running else "stopped"
        clear = {"restore_snapshot": None}
        if snap is None or snap["state"] != "ready":
            return await self._cas(row, settled, reason="restore: the snapshot is gone", desired=settled,
                                   extra=clear) is not None
        tag = store.snapshots.snapshot_tag(str(snap["id"]))
        try:
            if snap["has_memory"]:
                if running:
                    await self.driver.load_state(vm_id, tag)
                    status = await self.driver.status(vm_id)
                else:
                    status = await self.driver.start(vm_id, self.catalog.loadvm(row["jobspec"], tag, self.settings))
                if status.state != "running" or status.vnc is None:
                    raise DriverError(f"the VM did not come back: {status.reason or 'no VNC endpoint'}")
                if row["suspended_at"] is not None:
                    self._drop_suspend_state(row)
                await console_grants.publish_target(self.redis, vm_id, status.vnc)
                to_state, desired = "running", "running"
            else:
                if running:
                    await self._revoke(vm_id, "vm restored")
                    await self.driver.stop(vm_id, timeout=0)  # what runs is being thrown away
                await storage.apply_snapshot(Path(row["overlay_path"]), tag)
                if row["suspended_at"] is not None:
                    self._drop_suspend_state(row)
                to_state = "starting" if row["desired_state"] == "running" else "stopped"
                desired = "running" if to_state == "starting" else "stopped"
        except (ApiError, DriverError, storage.StorageError, OSError) as exc:
            reason = f"restore failed: {_reason(exc)}"
            log.warning("VM %s: %s", vm_id, reason)
            running = (await self.driver.status(vm_id)).state == "running"
            settled = "running" if running else ("suspended" if row["suspended_at"] is not None else "stopped")
            if await self._cas(row, settled, reason=reason, desired=settled, extra=clear) is not None:
                await self._audit(row, "vm.restore", reason)
            return False
        moved = await self._cas(row, to_state, reason=f"restored snapshot {snap['name']!r}", desired=desired,
                                extra={**clear, "suspended_at": None})
        if moved is not None:
            self.app[metrics_key].vm_ops.labels("restore", "ok").inc()
        return True

    async def apply_retention(self) -> list[str]:
        """Mark for deletion the snapshots SNAPSHOT_KEEP and SNAPSHOT_MAX_AGE no longer keep, and queue their VMs."""
        async with store.db.cursor(self.pool) as cur:
            expired = await store.snapshots.expire_snapshots(cur, self.settings.snapshot_keep,
                                                             self.settings.snapshot_max_age)
        for vm_id in sorted({str(snap["vm_id"]) for snap in expired}):
            await self.enqueue(vm_id, "retention")
        return [str(snap["id"]) for snap in expired]

    # ---- the reconciler

    async def reconcile_once(self) -> list[str]:
        """Queue every VM whose row and actual state disagree; returns their ids. One gateway at a time."""
        async with self.pool.acquire() as conn, conn.cursor(cursor_factory=store.db.DictCursor) as cur:
            async with cur.begin():
                await cur.execute("SELECT pg_try_advisory_xact_lock(%s) AS leader", (RECONCILER_LOCK,))
                if not (await cur.fetchone())["leader"]:
                    return []
                rows = [dict(r) for r in await store.vms.live_vms(cur)]
                actual = await self.driver.list_vms()
                queued = await self._needing_work(rows, actual)
                for vm_id in queued:
                    await self.queue.put(vm_id, "reconcile", once=True)
                queued += await self.suspend_idle([r for r in rows if str(r["id"]) not in queued])
        await self.update_metrics(rows)
        return queued

    async def _needing_work(self, rows: list[dict[str, Any]], actual: dict[str, VMStatus]) -> list[str]:
        at = now()
        running_ids = [str(r["id"]) for r in rows if r["state"] == "running"]
        published: list[Any] = []
        if running_ids:
            async with self.redis.pipeline(transaction=False) as pipe:
                for vm_id in running_ids:
                    pipe.exists(redis_keys.vnc_target_key(vm_id))
                published = await pipe.execute()
        has_target = dict(zip(running_ids, published, strict=True))
        needing = []
        self.running_seen = sum(1 for r in rows if r["state"] == "running" and str(r["id"]) in actual
                                and actual[str(r["id"])].state == "running")
        for row in rows:
            vm_id, state, desired = str(row["id"]), row["state"], row["desired_state"]
            runs = vm_id in actual and actual[vm_id].state == "running"
            if state in states.TRANSITIONAL:
                need = row["restart_after"] is None or row["restart_after"] <= at
            elif state == "running":
                need = desired != "running" or not runs or not has_target.get(vm_id)
            elif state in ("stopped", "suspended"):
                need = desired != state or runs
            else:  # error
                need = runs
            need = need or bool(row.get("snapshot_work"))
            if need:
                needing.append(vm_id)
        return needing

    async def update_metrics(self, rows: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        stats = await self.queue.stats()
        metrics = self.app[metrics_key]
        metrics.queue_depth.set(stats["depth"])
        metrics.queue_pending.set(stats["pending"])
        metrics.queue_oldest.set(stats["oldest_age_seconds"] or 0)
        if rows is not None:
            counts: dict[str, int] = {}
            for row in rows:
                counts[row["state"]] = counts.get(row["state"], 0) + 1
            for state in states.ALL:
                if state != "destroyed":
                    metrics.vms_by_state.labels(state).set(counts.get(state, 0))
        return stats

    # ---- the collector

    async def collect_once(self) -> dict[str, list[str]]:
        """Remove what no VM owns and settle VMs stuck past their deadline. Returns what it did."""
        report: dict[str, list[str]] = {"overlays": [], "processes": [], "console_records": [], "stuck": [],
                                        "snapshots": []}
        grace = self.settings.orphan_grace
        async with store.db.cursor(self.pool) as cur:
            rows = {str(r["id"]): dict(r) for r in await store.vms.live_vms(cur)}

        def owned(vm_id: str) -> bool:
            return states.holds_quota(rows.get(vm_id))

        # Overlays: <VMS_ROOT>/users/<user>/<vm>.qcow2 (and .part leftovers of an interrupted create).
        users_dir = self.settings.vms_root / "users"
        candidates = [p for pattern in ("*/*.qcow2", "*/*.qcow2.part", "*/*.state", "*/*.state.part")
                      for p in sorted(users_dir.glob(pattern))]
        for folder in users_dir.glob("*"):
            # Empty user folders (overlays are removed, folders are not: see storage.remove_overlay).
            if folder.is_dir() and _age_of(folder) >= grace:
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only succeeds when empty; a create that races re-makes it
        for path in candidates:
            vm_id = path.name.split(".", 1)[0]
            if owned(vm_id) or _age_of(path) < grace:
                continue
            if not await self._still_orphan(vm_id):
                continue
            storage.remove_overlay(path.with_name(f"{vm_id}.qcow2"))
            report["overlays"].append(str(path))
        # Driver VMs (QEMU processes, Nomad jobs) with no VM.
        for vm_id, status in (await self.driver.list_vms()).items():
            if owned(vm_id):
                continue
            started = status.details.get("started_at_epoch")
            if isinstance(started, int | float) and time.time() - started < grace:
                continue
            if not await self._still_orphan(vm_id):
                continue
            await self.driver.destroy(vm_id)
            report["processes"].append(vm_id)
        report["console_records"] = await self._collect_console_records(rows)
        async with store.db.cursor(self.pool) as cur:
            await cur.execute("DELETE FROM revoked_sessions WHERE expires_at < now()")
        report["stuck"] = await self._settle_stuck(list(rows.values()))
        report["snapshots"] = await self.apply_retention()
        for kind, items in report.items():
            if items:
                log.info("collector: %s: %s", kind, ", ".join(items))
        return report

    async def _still_orphan(self, vm_id: str) -> bool:
        """Look again, in Postgres, just before removing: a create may have begun since the scan."""
        if not store.db.is_uuid(vm_id):
            return True
        async with store.db.cursor(self.pool) as cur:
            return not states.holds_quota(await store.vms.vm_by_id(cur, vm_id))

    async def _collect_console_records(self, rows: dict[str, dict[str, Any]]) -> list[str]:
        removed: list[str] = []
        async for key in self.redis.scan_iter(match=redis_keys.vnc_target_key("*"), count=200):
            name = key.decode() if isinstance(key, bytes) else key
            vm_id = name.rsplit(":", 1)[-1]
            row = rows.get(vm_id)
            if row is None or row["state"] not in states.MAY_HAVE_CONSOLE:
                await self.redis.delete(name)
                removed.append(name)
        for pattern in (redis_keys.vm_tokens_key("*"), redis_keys.user_tokens_key("*")):
            async for key in self.redis.scan_iter(match=pattern, count=200):
                name = key.decode() if isinstance(key, bytes) else key
                for digest in await self.redis.smembers(name):
                    digest = digest.decode() if isinstance(digest, bytes) else digest
                    if not await self.redis.exists(redis_keys.token_key(digest)):
                        await self.redis.srem(name, digest)
                        removed.append(f"{name} {digest[:8]}")
        return removed

    async def _settle_stuck(self, rows: list[dict[str, Any]]) -> list[str]:
        """A VM in a transitional state past its deadline: finish or undo what it was doing."""
        settled = []
        at = now()
        locker = VmLocker(self.settings.postgres_url)
        try:
            for row in rows:
                state = row["state"]
                if state not in states.TRANSITIONAL:
                    continue
                limit = self.settings.transition_timeout + (self.settings.stop_timeout if state == "stopping" else 0)
                since = max(row["updated_at"], row["restart_after"] or row["updated_at"])
                if (at - since).total_seconds() < limit:
                    continue
                async with locker.hold(str(row["id"]), wait=0) as got:
                    if not got:
                        continue  # a worker is on it
                    fresh = await self._row(str(row["id"]))
                    if fresh is None or fresh["state"] != state or fresh["updated_at"] != row["updated_at"]:
                        continue
                    await self._settle(fresh, limit)
                    settled.append(f"{row['id']} ({state})")
        finally:
            await locker.close()
        return settled

    async def _settle(self, row: dict[str, Any], limit: float) -> None:
        vm_id, state = str(row["id"]), row["state"]
        reason = f"{state} for more than {limit:g} s"
        if state in ("provisioning", "starting") and row["started_at"] is None:
            await self._fail_create(row, DriverError(reason))
        elif state in ("starting", "stopping") and row["suspended_at"] is None:
            with contextlib.suppress(DriverError):
                await self.driver.stop(vm_id, timeout=0)
            await self._revoke(vm_id)
            await self._cas(row, "stopped", reason=f"{reason}: stopped", desired="stopped")
        else:  # destroying, suspending, resuming, restoring: each step finishes or undoes itself
            await self.converge(vm_id)


def _age_of(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _is_outage(exc: BaseException) -> bool:
    return store.db.is_db_down(exc) or isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError)


class VmLocker:
    """Per-VM Postgres advisory locks on one dedicated connection (a session lock must not go back
    to a pool). If this process dies, Postgres drops the connection and with it the lock."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.conn: aiopg.Connection | None = None

    async def _cursor(self) -> Any:
        if self.conn is None or self.conn.closed:
            self.conn = await aiopg.connect(self.dsn, timeout=10)
        return await self.conn.cursor(cursor_factory=store.db.DictCursor)

    @contextlib.asynccontextmanager
    async def hold(self, vm_id: str, wait: float) -> AsyncIterator[bool]:
        """Hold the VM's lock; ``wait`` 0 tries once and yields False if another holds it.
        Waiting longer than ``wait`` raises (the job stays queued)."""
        cur = await self._cursor()
        key = f"vmgate:vm:{vm_id}"
        try:
            if wait <= 0:
                await cur.execute("SELECT pg_try_advisory_lock(hashtextextended(%s, 0)) AS got", (key,))
                got = bool((await cur.fetchone())["got"])
            else:
                await cur.execute(f"SET lock_timeout = '{int(wait * 1000)}ms'")
                await cur.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))", (key,))
                got = True
            try:
                yield got
            finally:
                if got:
                    with contextlib.suppress(psycopg2.Error):
                        await cur.execute("SELECT pg_advisory_unlock(hashtextextended(%s, 0))", (key,))
        finally:
            cur.close()

    async def reset(self) -> None:
        """After an error: a fresh connection next time (no lock survives a broken one)."""
        await self.close()

    async def close(self) -> None:
        if self.conn is not None and not self.conn.closed:
            await self.conn.close()
        self.conn = None


# ---- the application's side ------------------------------------------------------------------------

def engine_of(app: web.Application) -> Engine:
    engine = app[ENGINE_KEY]
    assert isinstance(engine, Engine)
    return engine


async def engine_ctx(app: web.Application) -> AsyncIterator[None]:
    """Start the engine with the app: one reconciler pass at once (re-adopting what runs), then the loops."""
    engine = Engine(app)
    app[ENGINE_KEY] = engine
    if app[settings_key].workers:
        try:
            queued = await engine.reconcile_once()
            log.info("start-up: %d running VM(s) re-adopted as they are; %d VM(s) queued for work",
                     engine.running_seen, len(queued))
        except Exception as exc:
            log.warning("first reconciler pass failed: %s; the loop tries again", exc)
    await engine.start()
    try:
        yield
    finally:
        await engine.stop()
