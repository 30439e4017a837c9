"""How a VM's state change becomes known: the compare-and-set on its row (with its history entry), the
event on Redis for live streams (gateway/web/events.py reads the channels named here), a wake-up for requests
of this process that wait for the VM (``watching``), and for an operation the engine finished or gave up on,
the metric and the audit entry.

``Transitions`` is the one way the engine moves a row: every step reads the row, acts, and moves it on
only from the state it read, so a user's request that changed the row meanwhile wins and the step looks
again.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import aiopg
import redis.asyncio as aioredis
import redis.exceptions

from console import redis_keys
from gateway import store
from gateway.engine.deps import now
from gateway.metrics import Metrics
from gateway.states import Desired, VmState

log = logging.getLogger("vmgate.lifecycle")

Row = dict[str, Any]
_watchers: dict[str, set[asyncio.Event]] = {}  # VM id -> the events of the requests of this process waiting on it


@contextlib.contextmanager
def watching(vm_id: str) -> Iterator[asyncio.Event]:
    """An event set whenever this process publishes a change of the VM: a request that waits for the VM to
    settle (gateway/web/vms.py) reads its row again then, rather than at its next poll. A change made by
    another gateway's worker is not seen here; the poll still finds it."""
    event = asyncio.Event()
    _watchers.setdefault(vm_id, set()).add(event)
    try:
        yield event
    finally:
        events = _watchers.get(vm_id, set())
        events.discard(event)
        if not events:
            _watchers.pop(vm_id, None)


def vm_channel(vm_id: str) -> str:
    """The Redis channel of one VM's state changes."""
    return f"{redis_keys.PREFIX}events:vm:{vm_id}"


def user_channel(user_id: str) -> str:
    """The Redis channel of the state changes of all of one user's VMs."""
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
    for event in _watchers.get(str(row["id"]), ()):
        event.set()
    payload = json.dumps(event_of(row))
    try:
        async with redis_client.pipeline(transaction=False) as pipe:
            pipe.publish(vm_channel(str(row["id"])), payload)
            pipe.publish(user_channel(str(row["user_id"])), payload)
            await pipe.execute()
    except (redis.exceptions.RedisError, OSError) as exc:
        log.warning("could not publish the state change of VM %s: %s", row["id"], exc)


class Transitions:
    """Moves VM rows and records the outcome of operations. An operation is named as the metric's
    ``operation`` label (``create``, ``stop``, …); its audit action is ``vm.<operation>``."""

    def __init__(self, *, pool: aiopg.Pool, redis: aioredis.Redis, metrics: Metrics) -> None:
        self.pool = pool
        self.redis = redis
        self.metrics = metrics

    async def move(self, row: Row, to: VmState, *, reason: str | None = None, desired: Desired | None = None,
                   extra: dict[str, Any] | None = None) -> Row | None:
        """Compare-and-set the VM from the state in ``row`` to ``to`` and publish it; None: the row had
        changed meanwhile (nothing done)."""
        async with store.db.cursor(self.pool) as cur:
            moved = await store.vms.transition(cur, str(row["id"]), to, only_from=(row["state"],), reason=reason,
                                               desired=desired, extra=extra)
        if moved is None:
            return None
        await publish(self.redis, moved)
        return dict(moved)

    async def enter(self, row: Row, to: VmState) -> Row | None:
        """The row in the transitional state ``to``: moved there unless it is there already. None: the row
        changed meanwhile."""
        if row["state"] == to:
            return row
        moved = await self.move(row, to)
        return None if moved is None else {**row, **moved}

    async def succeed(self, row: Row, to: VmState, operation: str, *, reason: str | None = None,
                      desired: Desired | None = None, extra: dict[str, Any] | None = None) -> Row | None:
        """``move`` at the end of an operation; when the move wins, the operation counts as done."""
        moved = await self.move(row, to, reason=reason, desired=desired, extra=extra)
        if moved is not None:
            self.succeeded(operation)
        return moved

    def succeeded(self, operation: str) -> None:
        """Count one finished operation."""
        self.metrics.vm_ops.labels(operation, "ok").inc()

    async def fail(self, row: Row, operation: str, reason: str, *, to: VmState | None = None,
                   desired: Desired | None = None, extra: dict[str, Any] | None = None) -> Row | None:
        """An operation failed: move the VM to ``to`` (when given) and, unless that move lost a race (then
        whoever changed the row owns the outcome), write the audit entry and count the failure. Returns
        the moved row, or ``row`` when no move was asked for."""
        moved: Row | None = row
        if to is not None:
            moved = await self.move(row, to, reason=reason, desired=desired, extra=extra)
            if moved is None:
                return None
        async with store.db.cursor(self.pool) as cur:
            await store.audit.record(cur, action=f"vm.{operation}", outcome="error", user_id=str(row["user_id"]),
                           vm_id=str(row["id"]), details={"reason": reason})
        self.metrics.vm_ops.labels(operation, "error").inc()
        return moved
